"""Flax Linen layers of the transformer: embedding, attention, MoE feed-forward, block, LM head.

Legend: B batch, T sequence, W key/value positions (the cache length), D d_model, N heads,
K key/value heads, H head_dim (Hr rotary, Hv value), Z latent rank (Zq the query's),
V vocabulary (Vp padded), E experts, F expert hidden, P top-k picks per token. Every parameter
is declared once here with its shape, logical axes and initializer; shardings are derived from
those axes (moejax.parallel.mesh.RULES).
The residual stream [B, T, D] is split over tp along T (sequence parallelism).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from moejax import kernels
from moejax.config import ModelConfig
from moejax.model import cached_moe, cross_entropy, ffn as ffn_lib, routing
from moejax.model import moe as moe_lib
from moejax.model.positions import Yarn, rope
from moejax.parallel import mesh as mesh_lib, remat, vocab
from moejax.parallel.mesh import constrain

RESIDUAL = ('act_batch', 'act_seq', 'act_embed')


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           init) -> jax.Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class LayerNorm(nn.Module):
  """LayerNorm (scale and bias) or RMSNorm (scale only) over the last axis, in float32, on the
  local sequence slice."""
  dtype: str = 'float32'
  kind: str = 'layernorm'
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = _param(self, 'scale', (d,), ('embed',), nn.initializers.ones)
    return _normalize(self, x, scale, self.kind, self.eps).astype(self.dtype)


def _normalize(module: nn.Module, x: jax.Array, scale: jax.Array, kind: str, eps: float,
               axes: tuple[int, ...] = (-1,)) -> jax.Array:
  """x normalised over `axes` in float32 and scaled (LayerNorm adds the module's 'bias')."""
  x32 = x.astype(jnp.float32)
  if kind == 'rmsnorm':
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps) * scale
  bias = _param(module, 'bias', scale.shape, ('embed',), nn.initializers.zeros)
  mean = jnp.mean(x32, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def norm(cfg: ModelConfig, name: str) -> LayerNorm:
  """The model's normalisation layer (cfg.norm, cfg.norm_eps)."""
  return LayerNorm(cfg.dtype, cfg.norm, cfg.norm_eps, name=name)


class Embedder(nn.Module):
  """Token embedding, plus a learned position table unless positions are rotary; the token table
  is vocab-parallel (each shard reads the rows of its vocabulary range, summed into the
  sequence-parallel residual)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """ids [M, B, T] int (positions [M, B, T]: default 0..T-1) -> [M, B, T, D]."""
    c = self.cfg
    tok = _param(self, 'tok', (c.padded_vocab, c.d_model), ('vocab', 'embed'),
                 _normal(c.init_std))
    if c.positions == 'learned':
      pos = _param(self, 'pos', (c.max_len, c.d_model), ('pos', 'embed'), _normal(c.init_std))
    if self.is_initializing():   # init only declares parameters (any example shape will do)
      return jnp.zeros(ids.shape + (c.d_model,), c.dtype)
    x = vocab.lookup(tok.astype(c.dtype), ids, ('act_micro',) + RESIDUAL)  # [M, B, T, D]
    if c.positions == 'learned':
      x = x + (pos[:ids.shape[-1]] if positions is None else
               jnp.take(pos, positions, axis=0)).astype(c.dtype)
    return constrain(x, ('act_micro',) + RESIDUAL)


class KVCache(NamedTuple):
  """One block's keys and values of every position so far, for cached decoding (MLA: its
  normalised latent [B, W, Z] and rotary key [B, W, Hr] instead)."""
  k: jax.Array       # [B, W, K, H]
  v: jax.Array       # [B, W, K, H]


class LatentWeights(NamedTuple):
  """Multi-head latent attention's projections (Attention._latent_weights)."""
  wq: jax.Array | None          # [D, N, H + Hr] (no query latent)
  wq_a: jax.Array | None        # [D, Zq]
  q_norm: jax.Array | None      # [Zq]
  wq_b: jax.Array | None        # [Zq, N, H + Hr]
  wkv_a: jax.Array              # [D, Z + Hr]
  kv_norm: jax.Array            # [Z]
  wkv_b: jax.Array              # [Z, N, H + Hv]


HEADS = ('act_batch', None, 'act_heads', None)          # [B, T, N, H] split by heads over tp
KV_HEADS = ('act_batch', None, 'act_kv_heads', None)    # [B, T, K, H] (replicated if tp > K)
TOKENS = ('act_batch', None, 'act_embed')               # [B, T, D] whole on every tp shard


class Attention(nn.Module):
  """Causal self-attention with grouped-query heads (K key/value heads shared by N/K query
  heads each; K = N is multi-head): q/k/v split by heads over tp, output row-split.

  With cfg.attn_bias, q/k/v carry biases (split like their heads) and, with cfg.attn_out_bias,
  the output projection a bias [D] (replicated), as Megatron's Column/RowParallelLinear do by
  default. cfg.qk_norm
  RMS-normalises queries and keys before the rotation: over each whole projection ('full',
  OLMoE: the statistics span every head, wherever tp puts them) or over each head ('head',
  Qwen3). Training and evaluation attend within the given tokens; cached decoding (`cache`)
  appends them to the cache and attends over everything in it. cfg.attn_sinks: a learned logit
  per head [N] joins each softmax over the keys and takes its share of the weight to no value
  (GPT-OSS). In blocks cfg.windowed marks, a query sees the cfg.sliding_window positions up to
  its own (in the cache too).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array | None = None,
               segments: jax.Array | None = None, cache: KVCache | None = None,
               start: jax.Array | int = 0, layer: jax.Array | int = 0):
    """x [B, T, D] -> y [B, T, D] (with a cache: (y, the cache holding these tokens too)).
    positions [B, T] (default start..start+T-1) rotate q/k with rotary positions; segments
    [B, T] (packed documents) keep attention within a document; start: the position of x's
    first token in the cache; layer: this block's index (whether it is windowed)."""
    c = self.cfg
    dt = c.dtype
    # Sequence parallelism: gather the sequence once, then every head-split matmul is local.
    x = constrain(x.astype(dt), TOKENS)                                  # [B, T, D]
    x = checkpoint_name(x, remat.ATTN_GATHERED)
    # Weights first, biases after: Linen draws init keys in declaration order (the seed's).
    weights = None if c.latent else self._weights()
    latent = self._latent_weights() if c.latent else None
    wo = _param(self, 'wo', (c.num_heads, c.value_head_dim, c.d_model),
                ('heads', 'head_dim', 'embed'), _normal(c.init_std / (2 * c.num_blocks) ** 0.5))
    at = start + jnp.arange(x.shape[1])                                 # [T] new tokens' places
    if positions is None:
      positions = jnp.broadcast_to(at, x.shape[:2])                     # [B, T]
    rotate = lambda a: rope(a, positions, c.rope_base, Yarn.of(c))
    if c.latent:
      q, k, v, compressed = self._latent_project(x, latent, rotate)
    else:
      q, k, v = self._project(x, weights)                               # [B, T, N|K, H]
      if c.qk_norm != 'none':
        q, k = self._qk_norm('q_norm', q), self._qk_norm('k_norm', k)
      if c.positions == 'rope':
        q, k = rotate(q), rotate(k)
    sinks = (_param(self, 'sinks', (c.num_heads,), ('heads',), _normal(c.init_std))
             if c.attn_sinks else None)
    if cache is None:
      mask = None if segments is None else (
          segments[:, None, :, None] == segments[:, None, None, :])    # [B, 1, T, T]
      if c.sliding_window:
        mask = _and(mask, self._window(positions, positions, layer))
      kernel, _ = kernels.attention(c, mesh_lib.platform(), packed=segments is not None)
      o = _attend(q, k, v, mask, causal=True, kernel=kernel, sinks=sinks,
                  scale=c.softmax_scale)                                # [B, T, N, Hv]
    else:
      keys = jnp.arange(cache.k.shape[1])                                # [W]
      mask = (keys[None, :] <= at[:, None])[None, None]                  # [1, 1, T, W]
      if c.sliding_window:
        mask = _and(mask, self._window(at[None], keys[None], layer))
      new = compressed if c.latent else (k, v)
      cache = KVCache(*(jax.lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype), start, 1)
                        for a, b in zip(cache, new)))   # [B, W, K, H]; MLA [B, W, Z], [B, W, Hr]
      if c.latent:   # attend in latent space: keys and values never expanded per position
        o = _latent_attend(q, cache, latent.wkv_b.astype(dt), c.head_dim, mask, c.softmax_scale)
      else:
        o = _attend(q, cache.k, cache.v, mask, causal=False, sinks=sinks, scale=c.softmax_scale)
    y = jnp.einsum('BTNH,NHD->BTD', constrain(o, HEADS), wo.astype(dt))  # reduce(-scatter) over N
    y = constrain(y, RESIDUAL if cache is None else TOKENS)
    if c.attn_bias and c.attn_out_bias:
      # Replicated and added once, after the reduction over heads (not once per tp shard).
      y = y + _param(self, 'bo', (c.d_model,), ('embed',), nn.initializers.zeros).astype(dt)
    y = checkpoint_name(y, remat.ATTN_REDUCED)
    return y if cache is None else (y, cache)

  def _latent_weights(self) -> LatentWeights:
    """MLA's projections (declared in this order): the query's (wq [D, N, H + Hr], or wq_a
    [D, Zq], its norm's scale [Zq] and wq_b [Zq, N, H + Hr]), wkv_a [D, Z + Hr] (the latent and
    the rotary key), the latent norm's scale [Z], wkv_b [Z, N, H + Hv]."""
    c = self.cfg
    n, hq, hr = c.num_heads, c.qk_head_dim, c.rope_head_dim
    r, rq = c.kv_lora_rank, c.q_lora_rank
    init = _normal(c.init_std)
    heads = ('heads', 'head_dim')
    if rq:
      wq = None
      wq_a = _param(self, 'wq_a', (c.d_model, rq), ('embed', 'latent'), init)
      q_norm = _param(self, 'q_a_norm', (rq,), ('latent',), nn.initializers.ones)
      wq_b = _param(self, 'wq_b', (rq, n, hq), ('latent',) + heads, init)
    else:
      wq = _param(self, 'wq', (c.d_model, n, hq), ('embed',) + heads, init)
      wq_a = q_norm = wq_b = None
    return LatentWeights(
        wq=wq, wq_a=wq_a, q_norm=q_norm, wq_b=wq_b,
        wkv_a=_param(self, 'wkv_a', (c.d_model, r + hr), ('embed', 'latent'), init),
        kv_norm=_param(self, 'kv_a_norm', (r,), ('latent',), nn.initializers.ones),
        wkv_b=_param(self, 'wkv_b', (r, n, c.head_dim + c.value_head_dim), ('latent',) + heads,
                     init))

  def _latent_project(self, x: jax.Array, w: LatentWeights, rotate
                      ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """MLA of x [B, T, D]: q and k [B, T, N, H + Hr] (rotary features last, rotated), v
    [B, T, N, Hv], and what a cache keeps: the normalised latent [B, T, Z] and the rotary key
    [B, T, Hr] (one per token, every head's)."""
    c = self.cfg
    dt, h, r = c.dtype, c.head_dim, c.kv_lora_rank
    rms = lambda a, scale: _normalize(self, a, scale, 'rmsnorm', c.norm_eps).astype(dt)
    if w.wq is not None:
      q = jnp.einsum('BTD,DNH->BTNH', x, w.wq.astype(dt))
    else:
      q_latent = rms(jnp.einsum('BTD,DZ->BTZ', x, w.wq_a.astype(dt)), w.q_norm)   # [B, T, Zq]
      q = jnp.einsum('BTR,RNH->BTNH', q_latent, w.wq_b.astype(dt))
    q = constrain(q, HEADS)                                             # [B, T, N, H + Hr]
    kv = jnp.einsum('BTD,DZ->BTZ', x, w.wkv_a.astype(dt))              # [B, T, Z + Hr]
    latent = rms(kv[..., :r], w.kv_norm)                                # [B, T, Z]
    k_rope = rotate(kv[..., None, r:])[:, :, 0]                         # [B, T, Hr]
    q = jnp.concatenate([q[..., :h], rotate(q[..., h:])], axis=-1)
    kv = constrain(jnp.einsum('BTR,RNH->BTNH', latent, w.wkv_b.astype(dt)), HEADS)
    shared = jnp.broadcast_to(k_rope[:, :, None], kv.shape[:3] + k_rope.shape[-1:])
    k = jnp.concatenate([kv[..., :h], shared], axis=-1)                 # [B, T, N, H + Hr]
    return q, constrain(k, HEADS), kv[..., h:], (latent, k_rope)

  def _window(self, q_at: jax.Array, k_at: jax.Array, layer: jax.Array | int) -> jax.Array:
    """[B|1, 1, T, W] True where key position k_at [B|1, W] lies within the sliding window of
    query position q_at [B|1, T], or everywhere in a block that is not windowed."""
    c = self.cfg
    near = (q_at[:, :, None] - k_at[:, None, :]) < c.sliding_window      # [B|1, T, W]
    flags = [c.windowed(i) for i in range(len(c.window_pattern or 'S'))]   # one period
    windowed = flags[0] if len(set(flags)) == 1 else jnp.asarray(flags)[layer % len(flags)]
    return (near | jnp.logical_not(windowed))[:, None]

  def _weights(self) -> tuple[jax.Array, ...]:
    """(wqkv [3, D, N, H],) with as many key/value heads as query heads (one matmul, and one
    partial input gradient to reduce over tp instead of three), else (wq [D, N, H],
    wkv [2, D, K, H])."""
    c = self.cfg
    n, kv, h, d = c.num_heads, c.kv_heads, c.head_dim, c.d_model
    if kv == n:
      return (_param(self, 'wqkv', (3, d, n, h), (None, 'embed', 'heads', 'head_dim'),
                     _normal(c.init_std)),)
    return (_param(self, 'wq', (d, n, h), ('embed', 'heads', 'head_dim'), _normal(c.init_std)),
            _param(self, 'wkv', (2, d, kv, h), (None, 'embed', 'kv_heads', 'head_dim'),
                   _normal(c.init_std)))

  def _project(self, x: jax.Array, weights: tuple[jax.Array, ...]
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, N, H], k and v [B, T, K, H] of x [B, T, D] (biases declared here)."""
    c = self.cfg
    n, kv, h = c.num_heads, c.kv_heads, c.head_dim
    if len(weights) == 1:
      qkv = jnp.einsum('BTD,CDNH->CBTNH', x, weights[0].astype(c.dtype))  # [3, B, T, N, H]
      if c.attn_bias:
        qkv = qkv + _param(self, 'bqkv', (3, n, h), (None, 'heads', 'head_dim'),
                           nn.initializers.zeros)[:, None, None].astype(c.dtype)
      qkv = constrain(qkv, (None,) + HEADS)
      return qkv[0], qkv[1], qkv[2]
    wq, wkv = weights
    q = jnp.einsum('BTD,DNH->BTNH', x, wq.astype(c.dtype))              # [B, T, N, H]
    kv_ = jnp.einsum('BTD,CDKH->CBTKH', x, wkv.astype(c.dtype))         # [2, B, T, K, H]
    if c.attn_bias:
      q = q + _param(self, 'bq', (n, h), ('heads', 'head_dim'), nn.initializers.zeros).astype(c.dtype)
      kv_ = kv_ + _param(self, 'bkv', (2, kv, h), (None, 'kv_heads', 'head_dim'),
                         nn.initializers.zeros)[:, None, None].astype(c.dtype)
    kv_ = constrain(kv_, (None,) + KV_HEADS)
    return constrain(q, HEADS), kv_[0], kv_[1]

  def _qk_norm(self, name: str, x: jax.Array) -> jax.Array:
    """RMSNorm of x [B, T, N, H] over all heads ('full') or each head ('head'), float32."""
    c = self.cfg
    if c.qk_norm == 'full':
      heads = 'heads' if x.shape[2] == c.num_heads else 'kv_heads'
      scale = _param(self, name, x.shape[2:], (heads, 'head_dim'), nn.initializers.ones)
      y = _normalize(self, x, scale, 'rmsnorm', c.norm_eps, axes=(-2, -1))
    else:
      scale = _param(self, name, x.shape[3:], ('head_dim',), nn.initializers.ones)
      y = _normalize(self, x, scale, 'rmsnorm', c.norm_eps)
    return y.astype(x.dtype)


def _and(mask: jax.Array | None, more: jax.Array) -> jax.Array:
  return more if mask is None else mask & more


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
            causal: bool, kernel: str = 'xla', sinks: jax.Array | None = None,
            scale: float | None = None) -> jax.Array:
  """Softmax attention of q [B, T, N, H] over k [B, W, K, H], v [B, W, K, Hv]: each key/value
  head serves N/K query heads (repeated to N heads, split over tp like the queries). kernel:
  'xla' or 'cudnn' (moejax.kernels.attention). sinks [N]: a logit per head in every softmax, with no
  value. scale: of the logits (default 1/sqrt(H))."""
  n, kv = q.shape[2], k.shape[2]
  if kv != n:
    k, v = (constrain(jnp.repeat(a, n // kv, axis=2), HEADS) for a in (k, v))  # [B, W, N, H]
  if scale is not None and abs(scale - q.shape[-1] ** -0.5) <= 1e-12 * scale:
    scale = None                                                        # the default
  if kernel == 'cudnn':
    return constrain(_cudnn_attention(q, k, v, causal), HEADS)         # [B, T, N, H]
  if sinks is None and v.shape[-1] == q.shape[-1]:
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, scale=scale)
  else:
    o = _softmax_attention(q, k, v, mask, causal, sinks, scale)
  return constrain(o, HEADS)                                            # [B, T, N, Hv]


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                       causal: bool, sinks: jax.Array | None, scale: float | None) -> jax.Array:
  """Softmax attention written out (float32 scores), for what jax.nn.dot_product_attention
  does not take: values of another width than keys (MLA), and a sink logit per head [N] in
  every row's softmax. q [B, T, N, H], k [B, W, N, H], v [B, W, N, Hv] -> [B, T, N, Hv]."""
  t, length = q.shape[1], k.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  scores = jnp.einsum('BTNH,BLNH->BNTL', q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    mask = _and(mask, jnp.tril(jnp.ones((t, length), bool), length - t)[None, None])
  return _softmax_values(scores, v, 'BNTL,BLNH->BTNH', mask, sinks)


def _softmax_values(scores: jax.Array, values: jax.Array, spec: str, mask: jax.Array | None,
                    sinks: jax.Array | None) -> jax.Array:
  """softmax(scores [B, N, T, W] where mask; with a sink logit per head [N] when given) applied
  to values by einsum `spec`."""
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)                          # [B, N, T, W]
  top = jnp.max(scores, axis=-1, keepdims=True)                         # [B, N, T, 1]
  extra = 0.0
  if sinks is not None:
    sink = sinks.astype(jnp.float32)[None, :, None, None]               # [1, N, 1, 1]
    top = jnp.maximum(top, sink)
    extra = jnp.exp(sink - top)
  weights = jnp.exp(scores - top)
  weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + extra)
  return jnp.einsum(spec, weights.astype(values.dtype), values)


def _latent_attend(q: jax.Array, cache: KVCache, wkv_b: jax.Array, h: int,
                   mask: jax.Array, scale: float) -> jax.Array:
  """MLA over a cache of latents: q [B, T, N, H + Hr] against the cached latent [B, W, Z] and
  rotary key [B, W, Hr], wkv_b [Z, N, H + Hv] folded into the query and the output (keys and
  values never expanded per position) -> [B, T, N, Hv]."""
  latent, k_rope = cache
  q_latent = jnp.einsum('BTNH,ZNH->BTNZ', q[..., :h], wkv_b[..., :h])   # [B, T, N, Z]
  scores = (jnp.einsum('BTNR,BLR->BNTL', q_latent, latent, preferred_element_type=jnp.float32)
            + jnp.einsum('BTNH,BLH->BNTL', q[..., h:], k_rope,
                         preferred_element_type=jnp.float32)) * scale  # [B, N, T, W]
  o_latent = _softmax_values(scores, latent, 'BNTW,BWZ->BTNZ', mask, None)  # [B, T, N, Z]
  return jnp.einsum('BTNR,RNH->BTNH', o_latent, wkv_b[..., h:])


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
  """cuDNN's fused attention of q, k, v [B, T, N, H] on each shard's sequences and heads (a
  shard_map manual over every mesh axis not manual yet): jax 0.10's partitioner of the cuDNN call
  fails where any mesh axis is automatic, and nothing here needs partitioning. A dimension its
  mesh axes do not divide (a one-sequence template batch under dp) stays whole on each shard."""
  attend = lambda q_, k_, v_: jax.nn.dot_product_attention(q_, k_, v_, is_causal=causal,
                                                           implementation='cudnn')
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
  if not axes:
    return attend(q, k, v)
  split = lambda entry: math.prod(mesh.shape[a] for a in mesh_lib.axes_of(entry))
  spec = P(*(entry if all(a.shape[i] % split(entry) == 0 for a in (q, k, v)) else None
             for i, entry in enumerate(mesh_lib.restrict(mesh_lib.spec(HEADS), axes))))
  return jax.shard_map(attend, in_specs=(spec,) * 3, out_specs=spec, axis_names=set(axes),
                       check_vma=False)(q, k, v)


class MoE(nn.Module):
  """Top-k Mixture-of-Experts feed-forward, expert-parallel over tp.

  Returns (y [B, T, D], per-part routing stats with leading axes [B', nG]: moe.moe's parts);
  decoding over a cache (`history`), (y, the history holding these tokens' choices too).
  """
  cfg: ModelConfig
  train: bool

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None,
               history: jax.Array | None = None, start: jax.Array | int = 0):
    """valid [B, T] (packed rows): padding takes no capacity and no part in the stats.
    history [P, B, W]: every cached position's choices (cached_moe); start: x's first
    position in it."""
    c = self.cfg
    e, d, f = c.num_experts, c.d_model, c.d_ff
    ax = moe_lib.WEIGHT_AXES
    bias = lambda name, shape: (_param(self, name, shape, getattr(ax, name), nn.initializers.zeros)
                                if c.expert_bias else None)
    swiglu = c.ffn != 'gelu'   # an up projection w3 (SwiGLU, clamped or not)
    w = moe_lib.ExpertWeights(
        router=_param(self, 'router', (d, e), ax.router, _normal(c.init_std)),
        w1=_param(self, 'w1', (e, d, f), ax.w1, _normal(c.init_std)),
        b1=bias('b1', (e, f)),
        w2=_param(self, 'w2', (e, f, d), ax.w2, _normal(c.init_std / (2 * c.num_blocks) ** 0.5)),
        b2=bias('b2', (e, d)),
        select_bias=_param(self, 'select_bias', (e,), ax.select_bias, nn.initializers.zeros)
        if c.bias_update_rate > 0 or c.selection_bias else None,
        w3=_param(self, 'w3', (e, d, f), ax.w3, _normal(c.init_std)) if swiglu else None,
        b3=bias('b3', (e, f)) if swiglu else None,
        router_bias=_param(self, 'router_bias', (e,), ax.router_bias, nn.initializers.zeros)
        if c.router_bias else None)
    shared = self._shared_weights()
    if self.is_initializing():
      # init only declares parameters (outputs are discarded); skipping the expert shard_map
      # keeps init independent of how the example input divides over the mesh.
      return jnp.zeros_like(x), None
    if history is not None:
      y, out = cached_moe.cached_moe(w, x, history, start, c)
    else:
      settings = moe_lib.MoESettings.of(c, self.train)
      rng = self.make_rng('dropout') if settings.dropout_rate > 0.0 else jax.random.key(0)
      y, out = moe_lib.moe(w, x, rng, settings, valid)
    if shared is not None:
      y = y + dense_ffn(shared, x, c, RESIDUAL if history is None else TOKENS)
    return y, out

  def _shared_weights(self) -> ffn_lib.SharedWeights | None:
    """The shared expert's weights (None without one), declared after the routed experts'."""
    c = self.cfg
    if not c.shared_d_ff:
      return None
    d, f = c.d_model, c.shared_d_ff
    col, row = ('embed', 'shared_mlp'), ('shared_mlp', 'embed')
    return ffn_lib.SharedWeights(
        w1=_param(self, 'shared_w1', (d, f), col, _normal(c.init_std)),
        w3=_param(self, 'shared_w3', (d, f), col, _normal(c.init_std))
        if c.ffn != 'gelu' else None,
        w2=_param(self, 'shared_w2', (f, d), row,
                  _normal(c.init_std / (2 * c.num_blocks) ** 0.5)),
        gate=_param(self, 'shared_gate', (d, 1), ('embed', None), _normal(c.init_std))
        if c.shared_gate else None)


class DenseMLP(nn.Module):
  """A dense block's MLP (model.dense_blocks): the experts' activation over dense_d_ff hidden
  units split over tp, no biases."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:                        # [B, T, D] -> [B, T, D]
    c = self.cfg
    d, f = c.d_model, c.dense_d_ff
    col, row = ('embed', 'dense_mlp'), ('dense_mlp', 'embed')
    w = ffn_lib.SharedWeights(
        w1=_param(self, 'w1', (d, f), col, _normal(c.init_std)),
        w3=_param(self, 'w3', (d, f), col, _normal(c.init_std)) if c.ffn != 'gelu' else None,
        w2=_param(self, 'w2', (f, d), row, _normal(c.init_std / (2 * c.num_blocks) ** 0.5)),
        gate=None)
    return dense_ffn(w, x, c, RESIDUAL, 'act_dense_mlp')


def dense_ffn(w: ffn_lib.SharedWeights, x: jax.Array, cfg: ModelConfig, out_axes: tuple,
              hidden_axis: str = 'act_shared_mlp') -> jax.Array:
  """A dense FFN on every token (the shared expert; a dense block's MLP): x [B, T, D] ->
  [B, T, D] laid out as `out_axes`. Its hidden units are split over tp (logical `hidden_axis`;
  the sequence gathered first, as attention does), the output reduced over them."""
  dt = cfg.dtype
  x = constrain(x.astype(dt), TOKENS)                                    # [B, T, D]
  hidden = lambda m: constrain(jnp.einsum('BTD,DF->BTF', x, m.astype(dt)),
                               ('act_batch', None, hidden_axis))       # [B, T, F] over tp
  h = ffn_lib.activation(hidden(w.w1), None if w.w3 is None else hidden(w.w3),
                        ffn_lib.Activation.of(cfg))
  y = jnp.einsum('BTF,FD->BTD', h, w.w2.astype(dt))                      # [B, T, D] over F
  if w.gate is not None:
    y = y * jax.nn.sigmoid(jnp.einsum('BTD,DO->BTO', x, w.gate.astype(dt)))
  return constrain(y, out_axes)


class Block(nn.Module):
  """Pre-norm transformer block: x += attn(norm(x)); x += moe(norm(x)) (a dense block: x +=
  mlp(norm(x)), and no routing stats), after `leading` dense blocks of its own (None:
  model.dense_per_block). Training, evaluation and cached decoding run it."""
  cfg: ModelConfig
  train: bool
  dense: bool = False
  leading: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array | None = None,
               segments: jax.Array | None = None, layer: jax.Array | int = 0,
               cache: tuple | None = None, start: jax.Array | int = 0):
    """x [B, T, D]; positions, segments [B, T] of packed documents (segment 0: padding);
    layer: the model's index of the block's first layer (ModelConfig.block_layer). Returns (y,
    routing stats; None for a dense block). Decoding: cache (keys, values[, routing history[,
    the leading dense blocks' keys and values [dense_per_block, ...]]]) of positions before
    `start`, and returns (y, that cache holding x's tokens too)."""
    c = self.cfg
    layout = RESIDUAL if cache is None else TOKENS
    lead = 0 if self.dense else c.dense_per_block if self.leading is None else self.leading
    lead_kv = []
    for i in range(lead):
      x, kv = Block(c, self.train, dense=True, name=f'dense_{i}')(
          x, positions, segments, layer + i, None if cache is None else
          (cache[3][i], cache[4][i]), start)
      lead_kv.append(kv)
    layer = layer + lead
    with jax.named_scope('attention'):
      h = norm(c, 'ln1')(x)
      if cache is None:
        x = x + Attention(c, name='attn')(h, positions, segments, layer=layer)
      else:
        y, kv = Attention(c, name='attn')(h, cache=KVCache(*cache[:2]), start=start, layer=layer)
        x = x + y
    h = norm(c, 'ln2')(x)
    if self.dense:
      with jax.named_scope('mlp'):
        x = constrain(x + DenseMLP(c, name='mlp')(h), layout)
      return x, (None if cache is None else tuple(kv))
    valid = None if segments is None else segments != 0
    with jax.named_scope('moe'):
      y, out = MoE(c, self.train, name='moe')(h, valid, *([] if cache is None else
                                                           [cache[2], start]))
    if cache is not None:
      out = tuple(kv) + (out,) + tuple(jnp.stack(a) for a in zip(*lead_kv))
    return constrain(x + y, layout), out


class MtpDepth(nn.Module):
  """One multi-token-prediction depth (model.mtp_depth): h' = Block(proj([norm(emb); norm(h)])).
  It declares its own final norm `ln_f`, which the loss applies with the shared LM head's matrix
  (DeepSeek-V3's enorm, hnorm, eh_proj with the embedding half first, shared_head.norm)."""
  cfg: ModelConfig
  train: bool

  @nn.compact
  def __call__(self, h: jax.Array, emb: jax.Array, positions: jax.Array | None = None,
               segments: jax.Array | None = None, layer: jax.Array | int = 0
               ) -> tuple[jax.Array, routing.GroupStats]:
    """h, emb [B, T, D] -> (h' [B, T, D], the block's routing stats)."""
    c = self.cfg
    w = _param(self, 'proj', (2, c.d_model, c.d_model), (None, 'embed', 'mlp'),
               _normal(c.init_std)).astype(c.dtype)
    joined = (jnp.einsum('btd,de->bte', norm(c, 'enorm')(emb), w[0]) +
              jnp.einsum('btd,de->bte', norm(c, 'hnorm')(h), w[1]))        # [B, T, D]
    y, stats = Block(c, self.train, leading=0, name='block')(constrain(joined, RESIDUAL),
                                                             positions, segments, layer)
    if self.is_initializing():
      norm(c, 'ln_f')(y)                                                 # declared only
    return y, stats


class Head(nn.Module):
  """Final norm and the vocab-parallel LM head; padded vocab entries get -inf logits."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None = None,
               logits_axes: Sequence[str | None] = (), keep: bool = True) -> jax.Array:
    """x [..., T, D] -> logits [..., T, V] float32; given labels [..., T] (-1: not predicted),
    their cross-entropy summed over tokens instead, the logits laid out as `logits_axes`, the
    backward pass reading the gradient the forward pass kept (keep) or recomputing the logits
    (moejax.model.cross_entropy)."""
    c = self.cfg
    x = norm(c, 'ln_f')(x)
    w = _param(self, 'w', (c.d_model, c.padded_vocab), ('embed', 'vocab'), _normal(c.init_std))
    if labels is None:
      return cross_entropy.logits(x, w, c.vocab_size, c.dtype)
    return cross_entropy.cross_entropy_sum(x, w, labels, vocab_size=c.vocab_size, dtype=c.dtype,
                                           logits_axes=logits_axes, keep=keep)
