"""Generation with a key/value cache: a prompt fills the cache in one pass, then every new token
is one step over the cache (no re-run of the context).

`extend` appends T new tokens at position `start`: T = the prompt length for the prefill, 1 per
decode step; the same code for both. It computes what the windowed forward
(transformer.loss_fn on the whole context) computes for those positions, on meshes without
pipeline stages (pp=1; tp and dp any), with the training model's own layers (layers.Attention
takes the cache; the norms, the embedding and the head are the same modules): the caches are
split over tp by key/value heads like attention's weights, experts stay split over tp. What is
specific to stepping a cache lives here: the routing history and the MoE over few tokens.

Capacity at generation follows the windowed forward exactly for top-1 routing: a token keeps its
expert when fewer than C earlier tokens of its routing group claimed it (the cache remembers every
position's choices). With top_k > 1 the windowed forward lets a later token's first choice
displace an earlier token's second choice; generation counts earlier positions' claims only.

Legend: NB blocks, B batch, L cache length, T new tokens, D d_model, K key/value heads, H
head_dim, E experts, K_ top-k, V padded vocab.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moejax.config import ModelConfig
from moejax.model import ffn as ffn_lib, moe as moe_lib, routing
from moejax.model.layers import (KV_HEADS, TOKENS, Attention, DenseMLP, Head, KVCache,
                                 dense_ffn, norm)
from moejax.parallel import vocab
from moejax.parallel.mesh import constrain


class Cache(NamedTuple):
  k: jax.Array       # [NB, B, L, K, H] keys of every position so far (MLA: latents [NB, B, L, R])
  v: jax.Array       # [NB, B, L, K, H] values (MLA: rotary keys [NB, B, L, Hr])
  choice: jax.Array  # [NB, K_, B, L] int32 experts each position chose (-1 before it is written)
  dense_k: jax.Array | None = None   # [ND, ...] as k, of the dense blocks (model.dense_blocks)
  dense_v: jax.Array | None = None


def empty_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  """A cache for `batch` sequences of up to `length` tokens (under the active plan)."""
  choice = jnp.full((cfg.num_blocks, cfg.top_k, batch, length), -1, jnp.int32)
  if cfg.latent:   # MLA: the latent and the rotary key of each position, shared by the heads
    kv = lambda blocks, width: constrain(jnp.zeros((blocks, batch, length, width), cfg.dtype),
                                         (None, 'act_batch', None, None))
    k, v = (cfg.kv_lora_rank, cfg.rope_head_dim)
  else:
    kv = lambda blocks, heads: constrain(jnp.zeros(
        (blocks, batch, length, heads, cfg.head_dim), cfg.dtype), (None,) + KV_HEADS)
    k = v = cfg.kv_heads
  dense = (kv(cfg.dense_blocks, k), kv(cfg.dense_blocks, v)) if cfg.dense_blocks else (None,) * 2
  return Cache(kv(cfg.num_blocks, k), kv(cfg.num_blocks, v), choice, *dense)


def _claims_before(expert: jax.Array, history: jax.Array, start: jax.Array,
                   group_size: int) -> jax.Array:
  """For each new assignment expert [B, T, K_]: claims on the same expert by earlier positions
  of its routing group, and by its own lower ranks. history [K_, B, L] holds every position's
  choices, the new ones included."""
  b, t, k = expert.shape
  position = start + jnp.arange(t)                                      # [T]
  first = position // group_size * group_size
  earlier = ((jnp.arange(history.shape[-1])[None, :] >= first[:, None])
             & (jnp.arange(history.shape[-1])[None, :] < position[:, None]))  # [T, L]
  same = jnp.moveaxis(history, 1, 0)[:, None, None] == expert[..., None, None]  # [B, T, K_, K_', L]
  prior = jnp.sum(same & earlier[None, :, None, None, :], axis=(3, 4))  # [B, T, K_]
  lower = jnp.sum(jnp.tril(expert[..., :, None] == expert[..., None, :], -1), axis=-1)
  return prior + lower                                                  # [B, T, K_]


def _gates(cfg: ModelConfig, probs: jax.Array, expert: jax.Array, keep: jax.Array) -> jax.Array:
  """Gates [B, T, K_] of the chosen experts, renormalised as routing.route does."""
  gate = jnp.take_along_axis(probs, expert, axis=-1)                   # [B, T, K_]
  if cfg.gate_norm == 'top_k':
    gate = gate / jnp.maximum(jnp.sum(gate, axis=-1, keepdims=True), 1e-9)
  gate = jnp.where(keep, gate, 0.0)
  if cfg.gate_norm == 'kept':
    gate = gate / jnp.maximum(jnp.sum(gate, axis=-1, keepdims=True), 1e-9)
  return gate * cfg.routed_scale


def _moe(p: dict, x: jax.Array, history: jax.Array, start: jax.Array, cfg: ModelConfig
         ) -> tuple[jax.Array, jax.Array]:
  """Top-k experts of new tokens x [B, T, D]; returns y [B, T, D] and the updated choices."""
  _, probs, _, expert = routing.choose(x, p['router'], p.get('router_bias'),
                                       p.get('select_bias'), cfg.top_k,
                                       routing.Scoring.of(cfg))          # [B, T, E], [B, T, K_]
  history = jax.lax.dynamic_update_slice_in_dim(
      history, jnp.moveaxis(expert, -1, 0).astype(jnp.int32), start, 2)  # [K_, B, L]
  keep = _claims_before(expert, history, start, cfg.group_size) < cfg.capacity(False)
  gate = _gates(cfg, probs, expert, keep)
  weight = jnp.sum(jax.nn.one_hot(expert, cfg.num_experts) * gate[..., None], axis=2)  # [B, T, E]
  # Every local expert on every new token (few tokens per step: the weights' reads dominate),
  # weighted by the routing; experts stay split over tp, their sum is reduced.
  dt = cfg.dtype
  b, t, d = x.shape
  rows = jnp.broadcast_to(x.astype(dt).reshape(1, b * t, d), (cfg.num_experts, b * t, d))
  w = moe_lib.ExpertWeights(**{k: p.get(k) for k in moe_lib.ExpertWeights._fields})
  y = ffn_lib.expert_ffn(rows, w.ffn(dt), act=ffn_lib.Activation.of(cfg))                # [E, B*T, D]
  y = jnp.einsum('EBTD,BTE->BTD', y.reshape(cfg.num_experts, b, t, d), weight.astype(dt))
  shared = ffn_lib.SharedWeights.of(p)
  if shared is not None:
    y = y + dense_ffn(shared, x, cfg, TOKENS)
  return constrain(y, TOKENS), history


def _block(x: jax.Array, p: dict, cache: tuple, start: jax.Array, layer: jax.Array,
           cfg: ModelConfig):
  """layers.Block over a cache: x [B, T, D] of new tokens (a dense block: cache without the
  routing history)."""
  k_cache, v_cache, *history = cache
  h = norm(cfg, 'ln1').apply({'params': p['ln1']}, x)
  y, kv = Attention(cfg).apply({'params': p['attn']}, h, cache=KVCache(k_cache, v_cache),
                               start=start, layer=layer)
  x = x + y
  h = norm(cfg, 'ln2').apply({'params': p['ln2']}, x)
  if not history:
    return constrain(x + DenseMLP(cfg).apply({'params': p['mlp']}, h), TOKENS), (kv.k, kv.v)
  y, history = _moe(p['moe'], h, history[0], start, cfg)
  return constrain(x + y, TOKENS), (kv.k, kv.v, history)


def extend(params: dict[str, Any], cache: Cache, ids: jax.Array, start: jax.Array, *,
           cfg: ModelConfig) -> tuple[jax.Array, Cache]:
  """New tokens ids [B, T] at positions start..start+T-1 -> their next-token logits
  [B, T, V] (float32, padded ids masked) and the cache holding them. params: canonical
  (blocks [NB, ...])."""
  emb = params['embed']
  x = vocab.lookup(emb['tok'].astype(cfg.dtype), ids, TOKENS)            # [B, T, D]
  if cfg.positions == 'learned':
    x = x + jax.lax.dynamic_slice_in_dim(emb['pos'], start, ids.shape[1]).astype(cfg.dtype)
  x = constrain(x, TOKENS)

  def layer(x, inputs):
    p, b, *cache = inputs
    return _block(x, p, cache, start, b, cfg)

  dense = (None, None)
  if cfg.dense_blocks:
    x, dense = jax.lax.scan(layer, x, (params['dense_blocks'], jnp.arange(cfg.dense_blocks),
                                       cache.dense_k, cache.dense_v))
  blocks = cfg.dense_blocks + jnp.arange(cfg.num_blocks)
  x, (k, v, choice) = jax.lax.scan(layer, x, (params['blocks'], blocks) + tuple(cache[:3]))
  return Head(cfg).apply({'params': params['head']}, x), Cache(k, v, choice, *dense)
