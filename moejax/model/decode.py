"""Generation with a key/value cache: a prompt fills the cache in one pass, then every new token
is one step over the cache (no re-run of the context).

`extend` appends T new tokens at position `start`: T = the prompt length for the prefill, 1 per
decode step; the same code for both. It computes what the windowed forward
(transformer.loss_fn on the whole context) computes for those positions, on meshes without
pipeline stages (pp=1; tp and dp any), with the training model's own blocks (layers.Block
takes the cache: its attention appends to the keys and values, its MoE routes with training's
router and keeps a routing history, moejax.model.cached_moe; the embedding and the head are the
same too): the caches are split over tp by key/value heads like attention's weights, experts
stay split over tp.

Legend: NB blocks, B batch, W key/value positions (the cache length), T sequence (the new
tokens), D d_model, K key/value heads, H head_dim (Hr rotary), Z latent rank, E experts, P top-k
picks per token, V vocabulary (Vp padded).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moejax.config import ModelConfig
from moejax.model.layers import KV_HEADS, TOKENS, Block, Head
from moejax.parallel import vocab
from moejax.parallel.mesh import constrain


class Cache(NamedTuple):
  k: jax.Array       # [NB, B, W, K, H] keys of every position so far (MLA: latents [NB, B, W, Z])
  v: jax.Array       # [NB, B, W, K, H] values (MLA: rotary keys [NB, B, W, Hr])
  choice: jax.Array  # [NB, P, B, W] int32 experts each position chose (-1 before it is written)
  dense_k: jax.Array | None = None   # [ND, ...] as k, of the dense blocks (model.dense_blocks)
  dense_v: jax.Array | None = None
  lead_k: jax.Array | None = None    # [NB, dense_per_block, ...] as k, of each block's own
  lead_v: jax.Array | None = None    # dense blocks (model.dense_per_block)


def empty_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  """A cache for `batch` sequences of up to `length` tokens (under the active plan)."""
  choice = jnp.full((cfg.num_blocks, cfg.top_k, batch, length), -1, jnp.int32)
  if cfg.latent:   # MLA: the latent and the rotary key of each position, shared by the heads
    kv = lambda blocks, width: constrain(jnp.zeros(blocks + (batch, length, width), cfg.dtype),
                                         (None,) * len(blocks) + ('act_batch', None, None))
    k, v = (cfg.kv_lora_rank, cfg.rope_head_dim)
  else:
    kv = lambda blocks, heads: constrain(jnp.zeros(
        blocks + (batch, length, heads, cfg.head_dim), cfg.dtype), (None,) * len(blocks) + KV_HEADS)
    k = v = cfg.kv_heads
  pair = lambda *blocks: (kv(blocks, k), kv(blocks, v)) if min(blocks) else (None, None)
  return Cache(kv((cfg.num_blocks,), k), kv((cfg.num_blocks,), v), choice,
               *pair(cfg.dense_blocks), *pair(cfg.num_blocks, cfg.dense_per_block))


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

  def scan(x, params, layers, cache, dense=False):
    block = Block(cfg, train=False, dense=dense)
    def layer(x, inputs):
      p, b, *cache = inputs
      return block.apply({'params': p}, x, layer=b, cache=cache, start=start)
    return jax.lax.scan(layer, x, (params, layers) + tuple(cache))

  dense = (None, None)
  if cfg.dense_blocks:
    x, dense = scan(x, params['dense_blocks'], jnp.arange(cfg.dense_blocks),
                    (cache.dense_k, cache.dense_v), dense=True)
  blocks = cache[:3] + ((cache.lead_k, cache.lead_v) if cfg.dense_per_block else ())
  x, (k, v, choice, *lead) = scan(x, params['blocks'],
                                  cfg.block_layer(jnp.arange(cfg.num_blocks)), blocks)
  return (Head(cfg).apply({'params': params['head']}, x),
          Cache(k, v, choice, *dense, *(lead or (None, None))))
