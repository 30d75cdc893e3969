"""Pipeline parallelism: one lax.scan over ticks inside a shard_map that is manual over pp.

Stage-stacked block parameters have leading axes [S, R, L] (stage, circular repeat, layer in
stage); block b = r*S*L + s*L + l. At tick t, stage s works on iteration i = t - s, i.e.
micro-batch i % M of repeat i // M; then activations move one stage on (collective-permute over
pp). Stage 0 reads micro-batch m from `buf`, which holds the embedded inputs and, for r > 0, what
came back around the ring from the last stage. M + ... ticks: R*M + S - 1; bubble (S-1)/(R*M+S-1).
Micro-batches arrive split over pp and reach stage 0, and outputs leave the last stage, by
point-to-point permutes.
Legend: S pipeline stages, R circular repeats, L layers per stage, M micro-batches, B batch,
T sequence, D d_model.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import precision
from moejax.parallel import mesh as mesh_lib, remat

StageFn = Callable[..., tuple[jax.Array, Any]]


def bubble_fraction(stages: int, repeats: int, micro_batches: int) -> float:
  return (stages - 1) / (repeats * micro_batches + stages - 1)


def _index(tree: Any, i: jax.Array) -> Any:
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _gather_to_first(local: jax.Array, stages: int) -> jax.Array:
  """[M/S, ...] per stage -> all [M, ...] on stage 0 (only stage 0 reads the result)."""
  pieces = [local] + [jax.lax.ppermute(local, mesh_lib.PP, [(j, 0)]) for j in range(1, stages)]
  return jnp.concatenate(pieces, axis=0)


def _scatter_from_last(outs: jax.Array, stages: int) -> jax.Array:
  """[M, ...] valid on the last stage -> stage j holds micro-batches j*M/S ... (j+1)*M/S - 1.

  Point-to-point sends of one chunk each: a reduce-scatter over pp would first gather the
  tp-sharded buffer (a collective in a partially manual region replicates its auto axes).
  """
  chunks = outs.reshape((stages, -1) + outs.shape[1:])                  # [S, M/S, ...]
  last = stages - 1
  stage = jax.lax.axis_index(mesh_lib.PP)
  mine = jnp.where(stage == last, chunks[last], jnp.zeros_like(chunks[last]))
  for j in range(last):
    mine = mine + jax.lax.ppermute(chunks[j], mesh_lib.PP, [(last, j)])  # zeros off stage j
  return mine


def _pipeline_local(params_, xs, rng, side, stage_, *, stage_fn: StageFn, stats_like: Any,
                    stages: int, repeats: int):
  """Per-stage program. params_ [1, R, L, ...], xs [M/S, B, T, D] (this stage's share), side
  [M, ...] (every stage holds all micro-batches' side inputs), stage_ [1]: this stage's index
  (None with one stage)."""
  if stages > 1:
    xs = _gather_to_first(xs, stages)                                   # [M, B, T, D] on stage 0
  params_ = jax.tree.map(lambda a: a[0], params_)                       # [R, L, ...]
  m_count = xs.shape[0]
  total = repeats * m_count
  # With one stage there is no pp axis to be manual over (XLA rejects collectives over a
  # size-1 manual axis in the backward pass): the same schedule runs unpartitioned.
  # The stage's index arrives as its slice of [S] (not jax.lax.axis_index): XLA then sees that
  # the repeat a tick picks is the same on all devices of a stage, and moves the dp all-reduce
  # of a replicated weight's gradient out of the loop (it stays per tick after axis_index).
  stage = stage_[0] if stages > 1 else 0
  ring = [(s, (s + 1) % stages) for s in range(stages)]

  def tick(carry, t):
    state, buf, outs, acc = carry
    i = t - stage                                                       # iteration at this stage
    valid = (i >= 0) & (i < total)
    i = jnp.clip(i, 0, total - 1)
    m, r = i % m_count, i // m_count
    state = jnp.where(stage == 0, jax.lax.dynamic_index_in_dim(buf, m, 0, False), state)
    side_m = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, m, 0, False), side)
    y, stats = stage_fn(params_, state, m, r, stage, rng, side_m)       # y [B, T, D]
    # Bubble ticks contribute nothing to the per-layer stats [R, L, ...].
    acc = jax.tree.map(
        lambda a, v: jax.lax.dynamic_update_index_in_dim(
            a, jax.lax.dynamic_index_in_dim(a, r, 0, False) + jnp.where(valid, v, 0), r, 0),
        acc, stats)
    # Writes go to slot M (scratch) when nothing finishes or comes back, never "y or the
    # old value" into slot m: reading the slot a write replaces makes XLA copy the whole
    # buffer's cotangent at every tick of the backward pass.
    done = valid & (stage == stages - 1) & (r == repeats - 1)
    outs = jax.lax.dynamic_update_index_in_dim(outs, y, jnp.where(done, m, m_count), 0)
    with jax.named_scope('pipeline_shift'):
      nxt = jax.lax.ppermute(y, mesh_lib.PP, ring) if stages > 1 else y  # stage s -> s+1
    if repeats > 1:
      # What stage 0 just received is iteration t - (S-1) of the last stage: keep it for its
      # next repeat.
      j = t - (stages - 1)
      back = (stage == 0) & (j >= 0) & (j // m_count < repeats - 1)
      jm = jnp.clip(j, 0, total - 1) % m_count
      buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, jnp.where(back, jm, m_count), 0)
    return (nxt, buf, outs, acc), None

  acc0 = jax.tree.map(lambda s: jnp.zeros((repeats,) + s.shape, s.dtype), stats_like)
  slots = jnp.zeros((m_count + 1,) + xs.shape[1:], xs.dtype)           # [M + 1, B, T, D]
  buf0 = slots.at[:m_count].set(xs) if repeats > 1 else xs             # slot M: scratch
  carry0 = (jnp.zeros_like(xs[0]), buf0, slots, acc0)
  (_, _, outs, acc), _ = jax.lax.scan(tick, carry0, jnp.arange(total + stages - 1))
  outs = outs[:m_count]                                                 # [M, B, T, D]
  if stages > 1:
    outs = _scatter_from_last(outs, stages)                             # [M/S, B, T, D]
  return outs, jax.tree.map(lambda a: a[None], acc)                     # acc [1, R, L, ...]


def pipeline(stage_fn: StageFn, stage_params: Any, xs: jax.Array, rng: jax.Array, *,
             stages: int, repeats: int, remat_policy: str, side: Any = None,
             cast_once: Any = None, split_layers: bool = False) -> tuple[jax.Array, Any]:
  """Runs all micro-batches through all stages.

  stage_fn(params, x [B, T, D], micro, repeat, stage, rng, side) -> (y [B, T, D], stats) with
  per-layer stats of leading axis L; params is one tree of [L, ...] leaves, or with
  split_layers a tuple of L per-layer trees. xs: [M, B, T, D]. side: None or a tree of
  [M, ...] arrays (e.g. packed rows' positions); stage_fn gets micro-batch m's. cast_once: None,
  or a tree like stage_params of dtype names ('' for as they are): those leaves reach stage_fn
  as moejax.precision.Cast (the param and its copy in that dtype), cast once per call instead
  of at every tick (and again in the backward's recomputation); their gradients accumulate
  over the ticks in the params' dtype. With split_layers each layer's leaf is an array of its
  own, so no tick copies a layer's slice out of a stack (nor pads its gradient into one): the
  cast leaves always, every leaf where the batch is split over dp (the gradient of a weight
  replicated over dp is then a sum over the ticks, which XLA all-reduces once after the loop
  instead of at every tick).
  Returns outputs [M, B, T, D] (M split over pp) and the stats summed over micro-batches,
  stacked [S, R, L, ...].
  """
  policy = remat.policy(remat_policy)
  per_stage = jax.tree.leaves(stage_params)[0].shape[2]
  cast = lambda a, dt: precision.Cast(a, jax.lax.stop_gradient(a.astype(dt))) if dt else a
  if cast_once is None:
    cast_once = jax.tree.map(lambda _: '', stage_params)
  mesh = jax.sharding.get_abstract_mesh()
  dp_split = not mesh.empty and dict(mesh.shape).get(mesh_lib.DP, 1) > 1
  # Each leaf: [S, R, L, ...], Cast of it, or L x [S, R, ...] (or Casts of them): with
  # split_layers the cast leaves, and where the batch is split over dp every leaf (only there:
  # on the shipped dp=1 layout splitting every leaf moved no reduction and cost 0.8 ms of copies).
  stage_params = jax.tree.map(
      lambda a, dt: (tuple(cast(a[:, :, l], dt) for l in range(per_stage))
                     if split_layers and (dt or dp_split) else cast(a, dt)),
      stage_params, cast_once)
  per_layer = lambda x: isinstance(x, tuple)

  # The repeat is picked inside the checkpoint: its inputs are then the loop-invariant
  # [R, L, ...] params (hoisted out of the scan) rather than a per-tick slice the scan would
  # stack for the backward pass (a copy of the stage's weights per tick).
  def run_stage(p, x, m, r, s, k, d):
    p = _index(p, r)                                        # [L, ...] (or L x [...]) leaves
    if split_layers:
      p = tuple(jax.tree.map(lambda a: a[l], p, is_leaf=per_layer) for l in range(per_stage))
    return stage_fn(p, x, m, r, s, k, d)
  fn = jax.checkpoint(run_stage, policy=policy)
  stats_like = jax.eval_shape(                                   # one stage's params [R, L, ...]
      lambda p, x, d: run_stage(p, x, 0, 0, 0, rng, d)[1],
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stage_params),
      xs[0], jax.tree.map(lambda a: a[0], side))
  params_spec = jax.tree.map(lambda _: P(mesh_lib.PP), stage_params)
  local = lambda p, x, k, d, s: _pipeline_local(p, x, k, d, s, stage_fn=fn, stats_like=stats_like,
                                                stages=stages, repeats=repeats)
  if stages == 1:
    return local(stage_params, xs, rng, side, None)
  run = jax.shard_map(
      local, in_specs=(params_spec, P(mesh_lib.PP), P(), jax.tree.map(lambda _: P(), side),
                       P(mesh_lib.PP)),
      out_specs=(P(mesh_lib.PP), P(mesh_lib.PP)), axis_names={mesh_lib.PP}, check_vma=False)
  return run(stage_params, xs, rng, side, jnp.arange(stages, dtype=jnp.int32))   # [S]


def each_micro_batch(fn: Callable[[Any, Any], Any], params: Any, xs: Any, stages: int) -> Any:
  """fn(params, x) on every micro-batch of xs (a tree of [M, ...] arrays, M split over pp):
  each pp shard runs its own M/pp micro-batches one after another (as the pipeline's ticks do:
  the same shapes, and batching rules some kernels lack, e.g. ragged_dot's, are not needed),
  nobody waits on another stage; params are replicated over pp (other axes as they lie). Every
  output leads with [M]."""
  run = lambda p, xs: jax.lax.map(lambda x: fn(p, x), xs)
  if stages == 1:
    return run(params, xs)
  return jax.shard_map(run, in_specs=(P(), P(mesh_lib.PP)), out_specs=P(mesh_lib.PP),
                       axis_names={mesh_lib.PP}, check_vma=False)(params, xs)
