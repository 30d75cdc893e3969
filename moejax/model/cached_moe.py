"""The routed experts over a key/value cache's few new tokens (layers.MoE when decoding): the
router's prefix and gates are training's (routing.choose, routing.gates); what is specific to
stepping a cache is the routing history, which decides capacity as the windowed forward does.

Capacity follows the windowed forward exactly for top-1 routing: a token keeps its expert when
fewer than C earlier tokens of its routing group claimed it (the history remembers every
position's choices). With top_k > 1 the windowed forward lets a later token's first choice
displace an earlier token's second choice; here earlier positions' claims are counted only.

Legend: B batch, W key/value positions (the cache length), T sequence (the new tokens),
D d_model, E experts, P top-k picks per token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.config import ModelConfig
from moejax.model import ffn as ffn_lib, moe as moe_lib, routing


def _claims_before(expert: jax.Array, history: jax.Array, start: jax.Array,
                   group_size: int) -> jax.Array:
  """For each new assignment expert [B, T, P]: claims on the same expert by earlier positions
  of its routing group, and by its own lower ranks. history [P, B, W] holds every position's
  choices, the new ones included."""
  b, t, k = expert.shape
  position = start + jnp.arange(t)                                      # [T]
  first = position // group_size * group_size
  earlier = ((jnp.arange(history.shape[-1])[None, :] >= first[:, None])
             & (jnp.arange(history.shape[-1])[None, :] < position[:, None]))  # [T, W]
  same = jnp.moveaxis(history, 1, 0)[:, None, None] == expert[..., None, None]  # [B, T, P, P', W]
  prior = jnp.sum(same & earlier[None, :, None, None, :], axis=(3, 4))  # [B, T, P]
  lower = jnp.sum(jnp.tril(expert[..., :, None] == expert[..., None, :], -1), axis=-1)
  return prior + lower                                                  # [B, T, P]


def cached_moe(w: moe_lib.ExpertWeights, x: jax.Array, history: jax.Array, start: jax.Array,
               cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Top-k experts of new tokens x [B, T, D] at positions start..start+T-1: y [B, T, D] and
  the history [P, B, W] holding their choices too."""
  _, probs, _, expert = routing.choose(x, w.router, w.router_bias, w.select_bias, cfg.top_k,
                                       routing.Scoring.of(cfg))          # [B, T, E], [B, T, P]
  history = jax.lax.dynamic_update_slice_in_dim(
      history, jnp.moveaxis(expert, -1, 0).astype(jnp.int32), start, 2)  # [P, B, W]
  keep = _claims_before(expert, history, start, cfg.group_size) < cfg.capacity(False)
  gate = routing.gates(probs, expert, keep, cfg.gate_norm, cfg.routed_scale)
  gate = jnp.where(keep, gate, 0.0)                                     # [B, T, P]
  weight = jnp.sum(jax.nn.one_hot(expert, cfg.num_experts) * gate[..., None], axis=2)  # [B, T, E]
  # Every local expert on every new token (few tokens per step: the weights' reads dominate),
  # weighted by the routing; experts stay split over tp, their sum is reduced.
  dt = cfg.dtype
  b, t, d = x.shape
  rows = jnp.broadcast_to(x.astype(dt).reshape(1, b * t, d), (cfg.num_experts, b * t, d))
  y = ffn_lib.expert_ffn(rows, w.ffn(dt), act=ffn_lib.Activation.of(cfg))  # [E, B*T, D]
  y = jnp.einsum('EBTD,BTE->BTD', y.reshape(cfg.num_experts, b, t, d), weight.astype(dt))
  return y, history
