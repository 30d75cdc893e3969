"""Flax Linen layers of the transformer: embedding, attention, MoE feed-forward, block, LM head.

Legend: B batch, T sequence, D d_model, N heads, H head_dim, V padded vocabulary, E experts,
F expert hidden. Every parameter is declared once here with its shape, logical axes and
initializer; shardings are derived from those axes (moejax.parallel.mesh.RULES).
The residual stream [B, T, D] is split over tp along T (sequence parallelism).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moejax.config import ModelConfig
from moejax.model import routing
from moejax.model import moe as moe_lib
from moejax.model.positions import rope
from moejax.parallel import remat, vocab
from moejax.parallel.mesh import constrain

RESIDUAL = ('act_batch', 'act_seq', 'act_embed')


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           init) -> jax.Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class LayerNorm(nn.Module):
  """LayerNorm over D in float32, on the local sequence slice."""
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = _param(self, 'scale', (d,), ('embed',), nn.initializers.ones)
    bias = _param(self, 'bias', (d,), ('embed',), nn.initializers.zeros)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
    return y.astype(self.dtype)


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


class Attention(nn.Module):
  """Causal multi-head self-attention: q/k/v split by heads over tp, output row-split.

  With cfg.attn_bias, q/k/v carry biases [3, N, H] (split like their heads) and the output
  projection a bias [D] (replicated), as Megatron's Column/RowParallelLinear do by default.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array | None = None,
               segments: jax.Array | None = None) -> jax.Array:  # [B, T, D] -> [B, T, D]
    """positions [B, T] (default 0..T-1) rotate q/k with rotary positions; segments [B, T]
    (packed documents) keep attention within a document."""
    c = self.cfg
    out_std = c.init_std / (2 * c.num_blocks) ** 0.5
    # q, k and v in one weight [3, D, N, H]: one matmul, and in the backward pass one partial
    # input gradient to reduce over tp instead of three.
    wqkv = _param(self, 'wqkv', (3, c.d_model, c.num_heads, c.head_dim),
                  (None, 'embed', 'heads', 'head_dim'), _normal(c.init_std))
    wo = _param(self, 'wo', (c.num_heads, c.head_dim, c.d_model), ('heads', 'head_dim', 'embed'),
                _normal(out_std))
    heads = ('act_batch', None, 'act_heads', None)
    # Sequence parallelism: gather the sequence once, then every head-split matmul is local.
    x = constrain(x.astype(c.dtype), ('act_batch', None, 'act_embed'))  # [B, T, D]
    x = checkpoint_name(x, remat.ATTN_GATHERED)
    qkv = jnp.einsum('BTD,CDNH->CBTNH', x, wqkv.astype(c.dtype))       # [3, B, T, N, H]
    if c.attn_bias:
      bqkv = _param(self, 'bqkv', (3, c.num_heads, c.head_dim), (None, 'heads', 'head_dim'),
                    nn.initializers.zeros)
      qkv = qkv + bqkv[:, None, None].astype(c.dtype)                   # split by heads like wqkv
    qkv = constrain(qkv, (None,) + heads)
    q, k, v = qkv[0], qkv[1], qkv[2]                                    # [B, T, N, H]
    if c.positions == 'rope':
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])  # [B, T]
      q, k = rope(q, positions), rope(k, positions)
    mask = None if segments is None else (
        segments[:, None, :, None] == segments[:, None, None, :])      # [B, 1, T, T]
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)  # [B, T, N, H]
    o = constrain(o, heads)
    y = jnp.einsum('BTNH,NHD->BTD', o, wo.astype(c.dtype))              # reduce-scatter over T
    y = constrain(y, RESIDUAL)
    if c.attn_bias:
      # Replicated and added once, after the reduction over heads (not once per tp shard).
      y = y + _param(self, 'bo', (c.d_model,), ('embed',), nn.initializers.zeros).astype(c.dtype)
    return checkpoint_name(y, remat.ATTN_REDUCED)


class MoE(nn.Module):
  """Top-k Mixture-of-Experts feed-forward, expert-parallel over tp.

  Returns (y [B, T, D], per-group stats with leading axes [B, T/group_size]).
  """
  cfg: ModelConfig
  train: bool

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None
               ) -> tuple[jax.Array, routing.GroupStats]:
    """valid [B, T] (packed rows): padding takes no capacity and no part in the stats."""
    c = self.cfg
    e, d, f = c.num_experts, c.d_model, c.d_ff
    ax = moe_lib.WEIGHT_AXES
    w = moe_lib.ExpertWeights(
        router=_param(self, 'router', (d, e), ax.router, _normal(c.init_std)),
        w1=_param(self, 'w1', (e, d, f), ax.w1, _normal(c.init_std)),
        b1=_param(self, 'b1', (e, f), ax.b1, nn.initializers.zeros),
        w2=_param(self, 'w2', (e, f, d), ax.w2, _normal(c.init_std / (2 * c.num_blocks) ** 0.5)),
        b2=_param(self, 'b2', (e, d), ax.b2, nn.initializers.zeros),
        select_bias=_param(self, 'select_bias', (e,), ax.select_bias, nn.initializers.zeros)
        if c.bias_update_rate > 0 else None)
    if self.is_initializing():
      # init only declares parameters (outputs are discarded); skipping the expert shard_map
      # keeps init independent of how the example input divides over the mesh.
      return jnp.zeros_like(x), None
    rate = c.expert_dropout if self.train else 0.0
    rng = self.make_rng('dropout') if rate > 0.0 else jax.random.key(0)
    return moe_lib.moe(w, x, rng, group_size=c.group_size, top_k=c.top_k,
                       capacity=c.capacity(self.train), dropout_rate=rate,
                       compute_dtype=jnp.dtype(c.dtype), gelu=c.gelu,
                       normalize_gates=c.normalize_gates, dispatch=c.dispatch, valid=valid,
                       sinkhorn_iters=c.sinkhorn_iters if self.train else 0)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x += attn(ln(x)); x += moe(ln(x))."""
  cfg: ModelConfig
  train: bool

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array | None = None,
               segments: jax.Array | None = None) -> tuple[jax.Array, routing.GroupStats]:
    """x [B, T, D]; positions, segments [B, T] of packed documents (segment 0: padding)."""
    c = self.cfg
    with jax.named_scope('attention'):
      x = x + Attention(c, name='attn')(LayerNorm(c.dtype, name='ln1')(x), positions, segments)
    valid = None if segments is None else segments != 0
    with jax.named_scope('moe'):
      y, stats = MoE(c, self.train, name='moe')(LayerNorm(c.dtype, name='ln2')(x), valid)
    return constrain(x + y, RESIDUAL), stats


class Head(nn.Module):
  """Final LayerNorm and the vocab-parallel LM head; padded vocab entries get -inf logits."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [..., T, D] -> [..., T, V] float32
    c = self.cfg
    x = LayerNorm(c.dtype, name='ln_f')(x)
    w = _param(self, 'w', (c.d_model, c.padded_vocab), ('embed', 'vocab'), _normal(c.init_std))
    logits = jnp.einsum('...D,DV->...V', x, w.astype(c.dtype)).astype(jnp.float32)
    vocab_ids = jnp.arange(c.padded_vocab)
    return jnp.where(vocab_ids < c.vocab_size, logits, -1e30)
