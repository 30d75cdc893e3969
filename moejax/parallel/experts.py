"""Expert parallelism: a shard_map over tp that moves tokens to their experts with all_to_all.

Each tp shard holds whole routing groups of tokens and E/tp experts. It routes its groups,
packs [G_, E, C, D], sends every expert its rows (all_to_all over tp), runs its local experts as
one batched matmul over [E/tp, tp*G_*C, D], returns the rows home (all_to_all) and combines.
Names ending in `_` are shard-local.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from moejax.model import routing
from moejax.parallel import mesh as mesh_lib


class ExpertWeights(NamedTuple):
  router: jax.Array  # [D, E]
  w1: jax.Array      # [E, D, F]
  b1: jax.Array      # [E, F]
  w2: jax.Array      # [E, F, D]
  b2: jax.Array      # [E, D]


WEIGHT_AXES = ExpertWeights(
    router=('embed', None), w1=('experts', 'embed', 'mlp'), b1=('experts', 'mlp'),
    w2=('experts', 'mlp', 'embed'), b2=('experts', 'embed'))
GROUP_AXES = ('act_batch', 'act_groups')  # leading axes of [B, nG, S, D] token groups


def _dispatched_row_ids(b_: int, ng_: int, num_experts: int, capacity: int,
                        axes: tuple[str, ...], group_spec: P) -> jax.Array:
  """Mesh-independent name of every row of the dispatched buffer [E/ep, ep*G_*C]:
  (global group * E + global expert) * C + slot, where a global group is b * nG + g of the
  micro-batch's [B, nG] groups. Computed from axis indices (no collective)."""
  sizes = [jax.lax.axis_size(a) for a in axes]
  size_of = dict(zip(axes, sizes))
  ep = math.prod(sizes)
  src = jnp.arange(ep)                                  # source shards, in all_to_all order
  coord = {a: (src // math.prod(sizes[i + 1:])) % sizes[i] for i, a in enumerate(axes)}

  def offsets(entry, local: int) -> tuple[jax.Array, int]:   # per source shard, and global size
    index, count = jnp.zeros_like(src), 1
    for a in mesh_lib.axes_of(entry):
      index, count = index * size_of[a] + coord[a], count * size_of[a]
    return index * local, count * local

  b0, _ = offsets(group_spec[0], b_)
  g0, ng = offsets(group_spec[1], ng_)
  batch = b0[:, None, None] + jnp.arange(b_)[None, :, None]            # [ep, B_, 1]
  group = g0[:, None, None] + jnp.arange(ng_)[None, None, :]           # [ep, 1, nG_]
  gid = (batch * ng + group).reshape(ep, b_ * ng_)                     # [ep, G_]
  local = num_experts // ep
  expert = jax.lax.axis_index(axes) * local + jnp.arange(local)       # [E/ep] global ids
  ids = ((gid[None, :, :, None] * num_experts + expert[:, None, None, None]) * capacity
         + jnp.arange(capacity))                                       # [E/ep, ep, G_, C]
  return ids.reshape(local, ep * b_ * ng_ * capacity)                  # [E/ep, ep*G_*C]


def _moe_local(w_: ExpertWeights, x_: jax.Array, rng: jax.Array, *, axes: tuple[str, ...],
               group_spec: P, top_k: int, capacity: int, dropout_rate: float, compute_dtype,
               gelu: str, normalize_gates: bool) -> tuple[jax.Array, routing.GroupStats]:
  """Shard-local MoE: x_ [B, nG_, S, D] -> ([B, nG_, S, D], per-group stats)."""
  b, ng_, s, d = x_.shape
  num_experts = w_.router.shape[-1]
  tokens_ = x_.reshape(b * ng_, s, d)                                   # [G_, S, D]
  r, stats = routing.route(tokens_, w_.router, top_k, capacity, normalize_gates)
  buf_ = routing.dispatch(tokens_.astype(compute_dtype), r, num_experts, capacity)  # [G_, E, C, D]
  buf_ = buf_.transpose(1, 0, 2, 3).reshape(num_experts, -1, d)          # [E, G_*C, D]
  with jax.named_scope('moe_all_to_all_dispatch'):
    buf_ = jax.lax.all_to_all(buf_, axes, 0, 1, tiled=True)   # [E/ep, ep*G_*C, D]
  buf_ = checkpoint_name(buf_, 'moe_dispatched')
  keep = None
  if dropout_rate > 0.0:   # a unit's mask follows its token, slot and expert, not the device
    rows = _dispatched_row_ids(b, ng_, num_experts, capacity, axes, group_spec)
    keep = routing.dropout_keep(rng, rows, w_.w1.shape[-1], dropout_rate)   # [E/ep, ep*G_*C, F]
  cast = lambda a: a.astype(compute_dtype)
  out_ = routing.expert_ffn(buf_, cast(w_.w1), cast(w_.b1), cast(w_.w2), cast(w_.b2),
                            gelu=gelu, dropout_rate=dropout_rate, dropout_keep=keep)
  with jax.named_scope('moe_all_to_all_combine'):
    out_ = jax.lax.all_to_all(out_, axes, 1, 0, tiled=True)   # [E, G_*C, D]
  out_ = checkpoint_name(out_, 'moe_returned')
  out_ = out_.reshape(num_experts, b * ng_, capacity, d).transpose(1, 0, 2, 3)  # [G_, E, C, D]
  y_ = routing.combine(out_, r)                                         # [G_, S, D]
  stats = jax.tree.map(lambda a: a.reshape((b, ng_) + a.shape[1:]), stats)
  return y_.reshape(b, ng_, s, d), stats


def moe(weights: ExpertWeights, x: jax.Array, rng: jax.Array, *, group_size: int, top_k: int,
        capacity: int, dropout_rate: float = 0.0, compute_dtype=jnp.float32,
        gelu: str = 'exact', normalize_gates: bool = False
        ) -> tuple[jax.Array, routing.GroupStats]:
  """Expert-parallel MoE over the mesh axes the experts are split over (tp, or dp x tp).

  x: [B, T, D] (sequence split over tp). Returns y [B, T, D] and per-group stats with leading
  axes [B, T/group_size].
  """
  b, t, d = x.shape
  groups = x.reshape(b, t // group_size, group_size, d)                 # [B, T, D] -> [B, nG, S, D]
  groups = mesh_lib.constrain(groups, GROUP_AXES + (None, 'act_embed'))
  w_specs = ExpertWeights(*(mesh_lib.spec(a) for a in WEIGHT_AXES))
  # Expert-parallel axes: those the experts are split over (tp, or dp x tp when folded). The
  # shard_map is manual over them only; specs drop every other (auto) axis, such as dp
  # splitting the batch when experts are not folded.
  axes = mesh_lib.axes_of(mesh_lib.spec(('experts',))[0])
  manual = lambda p: mesh_lib.restrict(p, axes)
  g_spec = manual(mesh_lib.spec(GROUP_AXES))
  stats_specs = routing.GroupStats(g_spec, g_spec, g_spec, g_spec)
  fn = functools.partial(_moe_local, axes=axes, group_spec=g_spec, top_k=top_k,
                         capacity=capacity, dropout_rate=dropout_rate,
                         compute_dtype=compute_dtype, gelu=gelu,
                         normalize_gates=normalize_gates)
  y, stats = jax.shard_map(
      fn, in_specs=(jax.tree.map(manual, w_specs, is_leaf=lambda x: isinstance(x, P)), g_spec,
                    P()),
      out_specs=(g_spec, stats_specs), axis_names=set(axes), check_vma=False)(
          weights, groups, rng)
  return y.reshape(b, t, d), stats                                      # [B, nG, S, D] -> [B, T, D]
