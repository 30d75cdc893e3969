"""Every random stream of a run, named in one place. Each is a pure function of the run's seed
and the names below, never of the mesh or the device, so every mesh and every resume draws the
same numbers.

  params   init: embed / head / the block template from (seed); block b from (seed, b)
  dropout  expert dropout of step s: (seed, s), then micro-batch m, then block b, then the row
  data     numpy generators of the token sources: (seed, step, micro, row) (synthetic) and
           (seed, epoch) (the token-file permutation); they live in moejax.data
"""
from __future__ import annotations

import jax

# fold_in tags under the run's key; the numbers are part of the checkpoint format of a run (a
# resumed run must draw what the straight one drew), so they never change.
_EMBED, _BLOCK_TEMPLATE, _HEAD, _DROPOUT = 0, 1, 2, 7
_BLOCKS, _DENSE_BLOCKS, _MTP = 1000, 2000, 3000


def embed_init(key: jax.Array) -> jax.Array:
  return jax.random.fold_in(key, _EMBED)


def block_template_init(key: jax.Array) -> jax.Array:
  """The key of the (shape-only) block initialised beside the embedder and head."""
  return jax.random.fold_in(key, _BLOCK_TEMPLATE)


def head_init(key: jax.Array) -> jax.Array:
  return jax.random.fold_in(key, _HEAD)


def block_inits(key: jax.Array, num_blocks: int) -> jax.Array:
  """[NB] keys, one per block in block order."""
  return jax.random.split(jax.random.fold_in(key, _BLOCKS), num_blocks)


def dense_block_inits(key: jax.Array, num_blocks: int) -> jax.Array:
  """[K] keys, one per dense block (model.dense_blocks) in block order."""
  return jax.random.split(jax.random.fold_in(key, _DENSE_BLOCKS), num_blocks)


def mtp_inits(key: jax.Array, depth: int) -> jax.Array:
  """[mtp_depth] keys, one per multi-token-prediction depth."""
  return jax.random.split(jax.random.fold_in(key, _MTP), depth)


def dropout_step(seed: int, step: jax.Array) -> jax.Array:
  """The dropout key of one train step."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DROPOUT), step)


def dropout_block(step_key: jax.Array, micro: jax.Array, block: jax.Array) -> jax.Array:
  """The dropout key of one block on one micro-batch (rows fold in below it)."""
  return jax.random.fold_in(jax.random.fold_in(step_key, micro), block)
