"""Cross-entropy over the vocab-parallel LM head, fused with its backward pass.

The logits [..., V] are a step's largest activation. Autodiff of log-sum-exp keeps them in
float32 (or, rematerialised, recomputes them through several passes). Here the forward pass
computes each token's log-sum-exp and, in the same pass over the logits, either keeps the
gradient `softmax - one_hot` in the compute dtype (keep=True: Megatron's fused vocab-parallel
cross-entropy; the backward pass is the two matmuls of the head's gradients), or keeps nothing
vocab-sized and recomputes the logits with one more matmul in the backward pass (keep=False:
MaxText's vocabulary tiling; memory for a matmul). The head's weight gradient is float32.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from moejax.parallel.mesh import constrain


def logits(x: jax.Array, w: jax.Array, vocab_size: int, dtype) -> jax.Array:
  """x [..., D] @ w [D, Vp] in `dtype` -> float32 logits [..., Vp], padded ids at -1e30."""
  out = jnp.einsum('...D,DV->...V', x, w.astype(dtype)).astype(jnp.float32)
  # A [Vp] bias, not jnp.where: where broadcasts its constant to the logits' shape, and under
  # lax.map autodiff hoists that loop-invariant array out of the loop and reads it every chunk.
  return out + jnp.where(jnp.arange(w.shape[-1]) < vocab_size, 0.0, -1e30)


def cross_entropy_sum(x: jax.Array, w: jax.Array, labels: jax.Array, *, vocab_size: int,
                      dtype, logits_axes: Sequence[str | None], keep: bool) -> jax.Array:
  """Sum over tokens with labels >= 0 of logsumexp(logits) - logits[label], logits as
  `logits(x, w)`, laid out as `logits_axes` (the vocabulary split over the head's shards).
  x [..., D] (the normed hidden states), w [D, Vp], labels [...] (-1: not predicted).
  keep: the backward pass reads the gradient kept by the forward pass (True) or recomputes
  the logits (False)."""
  return _ce(x, w, labels, (vocab_size, jnp.dtype(dtype).name, tuple(logits_axes), keep))


def _forward(x, w, labels, static):
  """(the sum, each token's log-sum-exp [...], the logits [..., Vp])."""
  vocab_size, dtype, axes, _ = static
  z = constrain(logits(x, w, vocab_size, dtype), axes)                  # [..., Vp]
  lse = jax.nn.logsumexp(z, axis=-1)                                    # [...]
  label_logit = jnp.sum(z * jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype), axis=-1)
  return jnp.sum(jnp.where(labels >= 0, lse - label_logit, 0.0)), lse, z


def _dlogits(z, lse, labels, static):
  """The sum's gradient by the logits [..., Vp] (softmax - one_hot on predicted tokens), in
  the compute dtype."""
  _, dtype, axes, _ = static
  one_hot = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
  predicted = (labels >= 0)[..., None].astype(z.dtype)                # [..., 1], as `logits`
  return constrain(((jnp.exp(z - lse[..., None]) - one_hot) * predicted).astype(dtype), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ce(x, w, labels, static):
  return _forward(x, w, labels, static)[0]


def _ce_fwd(x, w, labels, static):
  total, lse, z = _forward(x, w, labels, static)
  kept = _dlogits(z, lse, labels, static) if static[3] else lse
  return total, (x, w, labels, kept)


def _ce_bwd(static, res, g):
  vocab_size, dtype, axes, keep = static
  x, w, labels, kept = res
  if keep:
    dz = kept                                                           # [..., Vp]
  else:
    with jax.named_scope('rematted_computation'):   # JAX's name for recomputed work (perf.hlo)
      z = constrain(logits(x, w, vocab_size, dtype), axes)              # [..., Vp]
    dz = _dlogits(z, kept, labels, static)
  # g (a scalar) scales the matmuls' small operands, not the vocab-sized dz (no pass over
  # it); dx comes out in the compute dtype its reduction over the vocab shards moves, and the
  # chunks' dw are plain matmul outputs, so XLA sums them before reducing them over the mesh
  dx = jnp.einsum('...V,DV->...D', dz, (g * w).astype(dtype))          # [..., D]
  dw = jnp.einsum('...D,...V->DV', (g * x).astype(x.dtype), dz,
                  preferred_element_type=jnp.float32)                   # [D, Vp]
  return dx.astype(x.dtype), dw.astype(w.dtype), None


_ce.defvjp(_ce_fwd, _ce_bwd)
