"""The experts' feed-forward networks: a GELU MLP (the seed's, with biases), SwiGLU (the Llama
family's: silu(x w1) * (x w3), then w2; biases optional) or GPT-OSS's clamped SwiGLU, on fixed
buffers or on ragged rows.

Legend: E experts, C capacity (rows per expert), Y rows in any order, D d_model, F expert hidden.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moejax import precision
from moejax.model import gather, grouped_matmul
from moejax.parallel import remat


class FFNWeights(NamedTuple):
  w1: jax.Array               # [E, D, F] input projection (SwiGLU: the gate)
  b1: jax.Array | None        # [E, F]
  w2: jax.Array               # [E, F, D] output projection
  b2: jax.Array | None        # [E, D]
  w3: jax.Array | None = None  # [E, D, F] SwiGLU's up projection (None: GELU MLP)
  b3: jax.Array | None = None  # [E, F]

  def cast(self, dtype) -> 'FFNWeights':
    """In the compute dtype (a moejax.precision.Cast in it stays one)."""
    return FFNWeights(*(None if a is None else a.astype(dtype) for a in self))

  def arrays(self) -> 'FFNWeights':
    """Each weight one array (a Cast's copy)."""
    return FFNWeights(*(None if a is None else precision.array(a) for a in self))


def _bias(h: jax.Array, b: jax.Array | None) -> jax.Array:
  return h if b is None else h + b


class Activation(NamedTuple):
  """How the input projection(s) become the hidden units."""
  gelu: str = 'exact'      # GELU MLP (no up projection): 'exact' (erf) or 'tanh'
  limit: float = 0.0       # > 0: clamped SwiGLU (GPT-OSS), gate <= limit, |up| <= limit
  alpha: float = 1.0       # the clamped SwiGLU's sigmoid slope

  @classmethod
  def of(cls, cfg) -> Activation:
    """The activation of a ModelConfig's experts."""
    clamped = cfg.ffn == 'clamped_swiglu'
    return cls(cfg.gelu, cfg.swiglu_limit if clamped else 0.0,
               cfg.swiglu_alpha if clamped else 1.0)


def activation(first: jax.Array, up: jax.Array | None, act: Activation) -> jax.Array:
  """GELU(first); silu(first) * up; or, clamped, (up + 1) * g * sigmoid(alpha * g) with
  g = min(first, limit) and up clipped to [-limit, limit]."""
  if up is None:
    return jax.nn.gelu(first, approximate=act.gelu == 'tanh')
  if act.limit > 0:
    gate = jnp.minimum(first, act.limit)
    return (jnp.clip(up, -act.limit, act.limit) + 1) * gate * jax.nn.sigmoid(act.alpha * gate)
  return jax.nn.silu(first) * up


class SharedWeights(NamedTuple):
  """An always-on shared expert (dense FFN, no biases) and its optional sigmoid gate."""
  w1: jax.Array               # [D, F] input projection (SwiGLU: the gate)
  w3: jax.Array | None        # [D, F] SwiGLU's up projection (None: GELU MLP)
  w2: jax.Array               # [F, D] output projection
  gate: jax.Array | None      # [D, 1] the output's scale sigmoid(x gate) (Qwen2-MoE)

  @classmethod
  def of(cls, p: dict) -> SharedWeights | None:
    """The shared expert of a block's MoE params (None: it has none)."""
    if 'shared_w1' not in p:
      return None
    return cls(p['shared_w1'], p.get('shared_w3'), p['shared_w2'], p.get('shared_gate'))


class ExpertRows(NamedTuple):
  """Rows at one shard's experts (what a dispatcher delivers): fixed buffers x [E, C, D]
  (expert None), or rows in any order x [Y, D] with each row's expert [Y] (>= E: padding). ids:
  each row's mesh-independent name for its dropout mask ([E, C] or [Y]; None without dropout)."""
  x: jax.Array
  expert: jax.Array | None = None
  ids: jax.Array | None = None


def experts(rows: ExpertRows, w: FFNWeights, *, act: Activation = Activation(),
            dropout_rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
  """Each row through its expert's FFN, in the rows' layout: [E, C, D] buffers (expert_ffn) or
  [Y, D] rows (grouped_expert_ffn)."""
  if rows.expert is None:
    keep = (None if dropout_rate == 0.0 else
            dropout_keep(rng, rows.ids, w.w1.shape[-1], dropout_rate))   # [E, C, F]
    return expert_ffn(rows.x, w, act=act, dropout_rate=dropout_rate, dropout_keep=keep)
  return grouped_expert_ffn(rows.x, rows.expert, w, act=act, dropout_rate=dropout_rate,
                            dropout_rng=rng, row_ids=rows.ids)


def _drop(h: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
  if keep is None:
    return h
  return jnp.where(keep, h / (1.0 - rate), 0.0).astype(h.dtype)


def expert_ffn(x: jax.Array, w: FFNWeights, *, act: Activation = Activation(),
               dropout_rate: float = 0.0, dropout_keep: jax.Array | None = None) -> jax.Array:
  """Each expert's FFN on its rows: x [E, C, D] -> [E, C, D].

  act: the activation. dropout_keep [E, C, F] bool: hidden units kept.
  """
  bias = lambda b: None if b is None else b[:, None, :]
  matmul = lambda spec, a, m: checkpoint_name(                        # dW in f32 to a Cast
      _scoped(precision.einsum, spec, a, m), remat.CUSTOM_MATMUL)
  first = _bias(matmul('ECD,EDF->ECF', x, w.w1), bias(w.b1))            # [E, C, F]
  up = None if w.w3 is None else _bias(matmul('ECD,EDF->ECF', x, w.w3), bias(w.b3))
  h = _drop(activation(first, up, act), dropout_keep, dropout_rate)       # [E, C, F]
  return _bias(matmul('ECF,EFD->ECD', h, w.w2), bias(w.b2))             # [E, C, D]


def _scoped(fn, *args):
  """fn(*args) under the 'expert_matmul' name scope (how profiles and moejax.perf.opclass
  tell the experts' matmuls from the rest of the MoE layer)."""
  with jax.named_scope('expert_matmul'):
    return fn(*args)


def grouped_expert_ffn(x: jax.Array, key: jax.Array, w: FFNWeights, *,
                       act: Activation = Activation(),
                       dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                       row_ids: jax.Array | None = None) -> jax.Array:
  """expert_ffn on rows in any order: x [Y, D], key [Y] the expert of each row (keys >= E mark
  padding rows, which return 0). Rows are sorted by expert and each expert's weights multiply
  exactly its rows (grouped matmuls: model.grouped_matmul). Rows past the experts' (padding)
  are 0. With dropout, row i's hidden-unit
  mask is dropout_keep(dropout_rng, row_ids[i]).
  """
  w = w.arrays()
  num_experts = w.w1.shape[0]
  order = jnp.argsort(key, stable=True)                                # [Y] grouped by expert
  sizes = jnp.bincount(key, length=num_experts)                        # [E] padding not counted
  expert = jnp.minimum(key[order], num_experts - 1)                    # [Y]
  grouped = lambda a, m: checkpoint_name(_scoped(grouped_matmul.ragged_dot, a, m, sizes),
                                        remat.CUSTOM_MATMUL)
  # Each row's bias as a one-hot matmul [Y, E] x [E, F|D]: its gradient is a matmul too (the
  # transpose of a gather, a scatter-add of R rows into E, ran at 20-40 ms per call on an H200).
  onehot = jax.nn.one_hot(expert, num_experts, dtype=x.dtype)          # [Y, E]
  bias = lambda b: None if b is None else jnp.einsum(                  # [Y, F] or [Y, D]
      'RE,EF->RF', onehot, b, preferred_element_type=jnp.float32).astype(x.dtype)
  place = gather.inverse(order)                                        # [Y] its sorted row
  rows = gather.take(x, order[:, None], place[:, None])                # [Y, D] sorted
  first = _bias(grouped(rows, w.w1), bias(w.b1))                       # [Y, F]
  up = None if w.w3 is None else _bias(grouped(rows, w.w3), bias(w.b3))
  h = activation(first, up, act)
  if dropout_rate > 0.0:
    h = _drop(h, dropout_keep(dropout_rng, row_ids[order], h.shape[-1], dropout_rate),
              dropout_rate)
  y = _bias(grouped(h, w.w2), bias(w.b2))                              # [Y, D]
  n = key.shape[0]                                                     # padding rows: 0
  back = jnp.where(key < num_experts, place, n)                        # [Y] input -> sorted
  home = jnp.where(key[order] < num_experts, order, n)                 # [Y] sorted -> input
  return gather.take(y, back[:, None], home[:, None])                  # [Y, D] input order


def dropout_keep(rng: jax.Array, row_ids: jax.Array, width: int, rate: float) -> jax.Array:
  """Keep mask [..., width] for rows named by row_ids [...] (int): row i's mask is a function
  of (rng, i) only, so it does not depend on where the row is computed."""
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_ids.reshape(-1))
  keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, (width,)))(keys)
  return keep.reshape(row_ids.shape + (width,))
