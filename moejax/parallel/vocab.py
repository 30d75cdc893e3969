"""Vocab-parallel embedding lookup: each shard reads the rows of its own vocabulary range.

Megatron's VocabParallelEmbedding without a one-hot matmul: an id outside a shard's range reads
zero, and the sum over the shards lands directly in the sequence-parallel residual (a
reduce-scatter over the sequence). The backward pass is the all-gather of the cotangent and a
scatter-add into the local rows. Names ending in `_` are shard-local.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.parallel import mesh as mesh_lib


def lookup(table: jax.Array, ids: jax.Array, out_logical: Sequence[str | None]) -> jax.Array:
  """Rows of table [V, D] (split by the 'vocab' rule) for ids [..., T] -> [..., T, D], laid
  out as `out_logical`; ids are laid out like the output without the vocab split."""
  abstract = jax.sharding.get_abstract_mesh()
  axes = () if abstract.empty else mesh_lib.axes_of(mesh_lib.spec(('vocab',))[0])
  if math.prod(abstract.shape[a] for a in axes) <= 1:
    return jnp.take(table, ids, axis=0)                                 # one shard holds all
  out_spec = mesh_lib.spec(out_logical)
  others = tuple(a for a in abstract.axis_names if a not in axes)
  ids_spec = mesh_lib.restrict(P(*out_spec[:-1]), others)
  vocab_entry = mesh_lib.spec(('vocab',))[0]
  # The output dimension split over the vocab axes (the sequence, under sequence parallelism)
  # receives a reduce-scatter; with none, every shard gets the full sum.
  scatter = next((i for i, e in enumerate(out_spec) if e == vocab_entry), None)

  def local(table_, ids_):   # table_ [V/tp, D], ids_ [..., T] (this device's sequences)
    rows = table_.shape[0]
    local_ids = ids_ - jax.lax.axis_index(axes) * rows
    inside = (local_ids >= 0) & (local_ids < rows)
    x_ = jnp.take(table_, jnp.where(inside, local_ids, 0), axis=0)     # [..., T, D]
    x_ = jnp.where(inside[..., None], x_, jnp.zeros((), x_.dtype))
    if scatter is None:
      return jax.lax.psum(x_, axes)
    return jax.lax.psum_scatter(x_, axes, scatter_dimension=scatter, tiled=True)  # [.., T/tp, D]

  # Manual over every mesh axis: a collective in a partially manual region would replicate the
  # auto axes (here the micro-batches split over pp), moving pp times the bytes.
  return jax.shard_map(local, in_specs=(P(vocab_entry), ids_spec), out_specs=out_spec,
                       check_vma=False)(table, ids)
