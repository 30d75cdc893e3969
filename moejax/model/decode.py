"""Generation with a key/value cache: a prompt fills the cache in one pass, then every new token
is one step over the cache (no re-run of the context).

`extend` appends T new tokens at position `start`: T = the prompt length for the prefill, 1 per
decode step; the same code for both. It computes what the windowed forward
(transformer.loss_fn on the whole context) computes for those positions, on meshes without
pipeline stages (pp=1; tp and dp any): the caches are split over tp by heads like attention's
weights, experts stay split over tp, the vocab-parallel embedding and head are reused.

Capacity at generation follows the windowed forward exactly for top-1 routing: a token keeps its
expert when fewer than C earlier tokens of its routing group claimed it (the cache remembers every
position's choices). With top_k > 1 the windowed forward lets a later token's first choice
displace an earlier token's second choice; generation counts earlier positions' claims only.

Legend: NB blocks, B batch, L cache length, T new tokens, D d_model, N heads, H head_dim,
E experts, K top-k, F expert hidden, V padded vocab.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moejax.config import ModelConfig
from moejax.model import routing
from moejax.model.layers import Head, LayerNorm
from moejax.model.positions import rope
from moejax.parallel import vocab
from moejax.parallel.mesh import constrain

HEADS = ('act_batch', None, 'act_heads', None)      # [B, L, N, H] split by heads over tp
TOKENS = ('act_batch', None, 'act_embed')            # [B, T, D] whole on every tp shard


class Cache(NamedTuple):
  k: jax.Array       # [NB, B, L, N, H] keys of every position so far
  v: jax.Array       # [NB, B, L, N, H] values
  choice: jax.Array  # [NB, K, B, L] int32 experts each position chose (-1 before it is written)


def empty_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  """A cache for `batch` sequences of up to `length` tokens (under the active plan)."""
  shape = (cfg.num_blocks, batch, length, cfg.num_heads, cfg.head_dim)
  kv = lambda: constrain(jnp.zeros(shape, cfg.dtype), (None,) + HEADS)
  return Cache(kv(), kv(), jnp.full((cfg.num_blocks, cfg.top_k, batch, length), -1, jnp.int32))


def _attention(p: dict, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
               start: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Causal attention of new tokens x [B, T, D] at positions start.. over the cache."""
  dt = cfg.dtype
  qkv = jnp.einsum('BTD,CDNH->CBTNH', x.astype(dt), p['wqkv'].astype(dt))  # [3, B, T, N, H]
  if cfg.attn_bias:
    qkv = qkv + p['bqkv'][:, None, None].astype(dt)
  qkv = constrain(qkv, (None,) + HEADS)
  q, k, v = qkv[0], qkv[1], qkv[2]                                    # [B, T, N, H]
  t = x.shape[1]
  if cfg.positions == 'rope':
    positions = jnp.broadcast_to(start + jnp.arange(t), x.shape[:2])    # [B, T]
    q, k = rope(q, positions), rope(k, positions)
  k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
  v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
  length = k_cache.shape[1]
  visible = jnp.arange(length)[None, :] <= start + jnp.arange(t)[:, None]  # [T, L]
  o = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=visible[None, None])  # [B, T, N, H]
  y = jnp.einsum('BTNH,NHD->BTD', constrain(o, HEADS), p['wo'].astype(dt))
  if cfg.attn_bias:
    y = y + p['bo'].astype(dt)
  return constrain(y, TOKENS), k_cache, v_cache


def _claims_before(expert: jax.Array, history: jax.Array, start: jax.Array,
                   group_size: int) -> jax.Array:
  """For each new assignment expert [B, T, K]: claims on the same expert by earlier positions of
  its routing group, and by its own lower ranks. history [K, B, L] holds every position's
  choices, the new ones included."""
  b, t, k = expert.shape
  position = start + jnp.arange(t)                                      # [T]
  first = position // group_size * group_size
  earlier = ((jnp.arange(history.shape[-1])[None, :] >= first[:, None])
             & (jnp.arange(history.shape[-1])[None, :] < position[:, None]))  # [T, L]
  same = jnp.moveaxis(history, 1, 0)[:, None, None] == expert[..., None, None]  # [B, T, K, K', L]
  prior = jnp.sum(same & earlier[None, :, None, None, :], axis=(3, 4))  # [B, T, K]
  lower = jnp.sum(jnp.tril(expert[..., :, None] == expert[..., None, :], -1), axis=-1)
  return prior + lower                                                  # [B, T, K]


def _moe(p: dict, x: jax.Array, history: jax.Array, start: jax.Array, cfg: ModelConfig
         ) -> tuple[jax.Array, jax.Array]:
  """Top-k experts of new tokens x [B, T, D]; returns y [B, T, D] and the updated choices."""
  logits = jnp.einsum('BTD,DE->BTE', x.astype(jnp.float32), p['router'].astype(jnp.float32))
  probs = jax.nn.softmax(logits, axis=-1)                               # [B, T, E]
  select = logits if 'select_bias' not in p else logits + p['select_bias'].astype(jnp.float32)
  _, expert = jax.lax.top_k(select, cfg.top_k)                          # [B, T, K]
  gate = jnp.take_along_axis(probs, expert, axis=-1)
  history = jax.lax.dynamic_update_slice_in_dim(
      history, jnp.moveaxis(expert, -1, 0).astype(jnp.int32), start, 2)  # [K, B, L]
  keep = _claims_before(expert, history, start, cfg.group_size) < cfg.capacity(False)
  gate = jnp.where(keep, gate, 0.0)
  if cfg.normalize_gates:
    gate = gate / jnp.maximum(jnp.sum(gate, axis=-1, keepdims=True), 1e-9)
  weight = jnp.sum(jax.nn.one_hot(expert, cfg.num_experts) * gate[..., None], axis=2)  # [B, T, E]
  # Every local expert (routing.expert_ffn) on every new token (few tokens per step: the
  # weights' reads dominate), weighted by the routing; experts stay split over tp, their sum is
  # reduced.
  dt = cfg.dtype
  b, t, d = x.shape
  rows = jnp.broadcast_to(x.astype(dt).reshape(1, b * t, d), (cfg.num_experts, b * t, d))
  cast = lambda a: a.astype(dt)
  y = routing.expert_ffn(rows, cast(p['w1']), cast(p['b1']), cast(p['w2']), cast(p['b2']),
                         gelu=cfg.gelu)                                 # [E, B*T, D]
  y = jnp.einsum('EBTD,BTE->BTD', y.reshape(cfg.num_experts, b, t, d), weight.astype(dt))
  return constrain(y, TOKENS), history


def _block(x: jax.Array, p: dict, cache: tuple, start: jax.Array, cfg: ModelConfig):
  k_cache, v_cache, history = cache
  h = LayerNorm(cfg.dtype).apply({'params': p['ln1']}, x)
  y, k_cache, v_cache = _attention(p['attn'], h, k_cache, v_cache, start, cfg)
  x = x + y
  h = LayerNorm(cfg.dtype).apply({'params': p['ln2']}, x)
  y, history = _moe(p['moe'], h, history, start, cfg)
  return constrain(x + y, TOKENS), (k_cache, v_cache, history)


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
    p, k_cache, v_cache, history = inputs
    x, (k_cache, v_cache, history) = _block(x, p, (k_cache, v_cache, history), start, cfg)
    return x, (k_cache, v_cache, history)

  x, (k, v, choice) = jax.lax.scan(layer, x, (params['blocks'],) + tuple(cache))
  return Head(cfg).apply({'params': params['head']}, x), Cache(k, v, choice)
