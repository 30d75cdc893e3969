"""The Mixture-of-Experts layer: route, dispatch, expert FFN, combine, on each shard of the
expert-parallel axes (moejax.parallel.experts moves the rows between shards).

Legend: B batch, T seq, D d_model, nG groups per sequence, S tokens per group, G_ local groups,
E experts, C capacity, F expert hidden. Names ending in `_` are shard-local.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.model import routing
from moejax.parallel import experts as ep_lib, mesh as mesh_lib


class ExpertWeights(NamedTuple):
  router: jax.Array  # [D, E]
  w1: jax.Array      # [E, D, F]
  b1: jax.Array      # [E, F]
  w2: jax.Array      # [E, F, D]
  b2: jax.Array      # [E, D]
  select_bias: jax.Array | None = None  # [E] aux-loss-free balancing (not trained by gradient)


WEIGHT_AXES = ExpertWeights(
    router=('embed', None), w1=('experts', 'embed', 'mlp'), b1=('experts', 'mlp'),
    w2=('experts', 'mlp', 'embed'), b2=('experts', 'embed'), select_bias=(None,))
GROUP_AXES = ('act_batch', 'act_groups')  # leading axes of [B, nG, S, D] token groups


def _dispatched_row_ids(b_: int, ng_: int, num_experts: int, capacity: int,
                        axes: tuple[str, ...], group_spec: P) -> jax.Array:
  """Mesh-independent name of every row of the dispatched buffer [E/ep, ep*G_*C]:
  (global group * E + global expert) * C + slot, a global group being b * nG + g of the
  micro-batch's [B, nG] groups."""
  (b0, _), (g0, ng) = ep_lib.source_offsets(group_spec, (b_, ng_), axes)
  ep = b0.shape[0]
  batch = b0[:, None, None] + jnp.arange(b_)[None, :, None]            # [ep, B_, 1]
  group = g0[:, None, None] + jnp.arange(ng_)[None, None, :]           # [ep, 1, nG_]
  gid = (batch * ng + group).reshape(ep, b_ * ng_)                     # [ep, G_]
  local = num_experts // ep
  expert = jax.lax.axis_index(axes) * local + jnp.arange(local)       # [E/ep] global ids
  ids = ((gid[None, :, :, None] * num_experts + expert[:, None, None, None]) * capacity
         + jnp.arange(capacity))                                       # [E/ep, ep, G_, C]
  return ids.reshape(local, ep * b_ * ng_ * capacity)                  # [E/ep, ep*G_*C]


def _moe_local(w_: ExpertWeights, x_: jax.Array, rng: jax.Array, *, axes: tuple[str, ...],
               token_spec: P, top_k: int, capacity: int, dropout_rate: float, compute_dtype,
               gelu: str, normalize_gates: bool) -> tuple[jax.Array, routing.GroupStats]:
  """Shard-local MoE: x_ [B, nG_, S, D] -> ([B, nG_, S, D], per-group stats)."""
  b, ng_, s, d = x_.shape
  num_experts = w_.router.shape[-1]
  tokens_ = x_.reshape(b * ng_, s, d)                                   # [G_, S, D]
  r, stats = routing.route(tokens_, w_.router, top_k, capacity, normalize_gates,
                           w_.select_bias)
  buf_ = routing.dispatch(tokens_.astype(compute_dtype), r, num_experts, capacity)  # [G_, E, C, D]
  buf_ = buf_.transpose(1, 0, 2, 3).reshape(num_experts, -1, d)          # [E, G_*C, D]
  keep = None
  if dropout_rate > 0.0:   # a unit's mask follows its token, slot and expert, not the device
    rows = _dispatched_row_ids(b, ng_, num_experts, capacity, axes, token_spec)
    keep = routing.dropout_keep(rng, rows, w_.w1.shape[-1], dropout_rate)   # [E/ep, ep*G_*C, F]
  cast = lambda a: a.astype(compute_dtype)
  local_experts = lambda rows_: routing.expert_ffn(                     # [E/ep, ep*G_*C, D]
      rows_, cast(w_.w1), cast(w_.b1), cast(w_.w2), cast(w_.b2), gelu=gelu,
      dropout_rate=dropout_rate, dropout_keep=keep)
  out_ = ep_lib.exchange(buf_, local_experts, axes)                     # [E, G_*C, D]
  out_ = out_.reshape(num_experts, b * ng_, capacity, d).transpose(1, 0, 2, 3)  # [G_, E, C, D]
  y_ = routing.combine(out_, r)                                         # [G_, S, D]
  stats = jax.tree.map(lambda a: a.reshape((b, ng_) + a.shape[1:]), stats)
  return y_.reshape(b, ng_, s, d), stats


def moe(weights: ExpertWeights, x: jax.Array, rng: jax.Array, *, group_size: int, top_k: int,
        capacity: int, dropout_rate: float = 0.0, compute_dtype=jnp.float32,
        gelu: str = 'exact', normalize_gates: bool = False
        ) -> tuple[jax.Array, routing.GroupStats]:
  """Expert-parallel MoE. x: [B, T, D] (sequence split over tp). Returns y [B, T, D] and
  per-group stats with leading axes [B, T/group_size]."""
  b, t, d = x.shape
  groups = x.reshape(b, t // group_size, group_size, d)                 # [B, T, D] -> [B, nG, S, D]
  groups = mesh_lib.constrain(groups, GROUP_AXES + (None, 'act_embed'))
  fn = functools.partial(_moe_local, top_k=top_k, capacity=capacity, dropout_rate=dropout_rate,
                         compute_dtype=compute_dtype, gelu=gelu, normalize_gates=normalize_gates)
  axes = WEIGHT_AXES if weights.select_bias is not None else WEIGHT_AXES._replace(select_bias=None)
  y, stats = ep_lib.expert_parallel(fn, weights, axes, groups, GROUP_AXES, rng)
  return y.reshape(b, t, d), stats                                      # [B, nG, S, D] -> [B, T, D]


def select_bias_step(assigned: jax.Array, rate: float) -> jax.Array:
  """One aux-loss-free balancing update (DeepSeek-V3) of the selection biases [..., E]: `rate`
  toward under-loaded experts, by the sign of (mean load - load). assigned [..., E]: the step's
  token assignments per expert (identical on every mesh)."""
  mean = jnp.mean(assigned, axis=-1, keepdims=True)
  return rate * jnp.sign(mean - assigned).astype(jnp.float32)
