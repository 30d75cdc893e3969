"""Cross-entropy over the vocab-parallel LM head that keeps no logits for the backward pass.

The logits [..., V] are a step's largest activation. Autodiff of log-sum-exp keeps them (or,
rematerialised, recomputes them through several passes). Here the forward pass keeps only the
head's input and each token's log-sum-exp. The backward pass recomputes the logits with one
matmul and forms `softmax - one_hot` in one elementwise pass: Megatron's fused vocab-parallel
cross-entropy, MaxText's vocabulary tiling. The head's weight gradient is written in float32.
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
  return jnp.where(jnp.arange(w.shape[-1]) < vocab_size, out, -1e30)


def cross_entropy_sum(x: jax.Array, w: jax.Array, labels: jax.Array, *, vocab_size: int,
                      dtype, logits_axes: Sequence[str | None]) -> jax.Array:
  """Sum over tokens with labels >= 0 of logsumexp(logits) - logits[label], logits as
  `logits(x, w)`, laid out as `logits_axes` (the vocabulary split over the head's shards).
  x [..., D] (the normed hidden states), w [D, Vp], labels [...] (-1: not predicted)."""
  return _ce(x, w, labels, (vocab_size, jnp.dtype(dtype).name, tuple(logits_axes)))


def _forward(x, w, labels, static):
  vocab_size, dtype, axes = static
  z = constrain(logits(x, w, vocab_size, dtype), axes)                  # [..., Vp]
  lse = jax.nn.logsumexp(z, axis=-1)                                    # [...]
  label_logit = jnp.sum(z * jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype), axis=-1)
  return jnp.sum(jnp.where(labels >= 0, lse - label_logit, 0.0)), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ce(x, w, labels, static):
  return _forward(x, w, labels, static)[0]


def _ce_fwd(x, w, labels, static):
  total, lse = _forward(x, w, labels, static)
  return total, (x, w, labels, lse)


def _ce_bwd(static, res, g):
  vocab_size, dtype, axes = static
  x, w, labels, lse = res
  with jax.named_scope('rematted_computation'):   # JAX's name for recomputed work (perf.hlo)
    z = constrain(logits(x, w, vocab_size, dtype), axes)                # [..., Vp]
  one_hot = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
  dz = jnp.where((labels >= 0)[..., None], g * (jnp.exp(z - lse[..., None]) - one_hot), 0.0)
  dz = constrain(dz.astype(dtype), axes)                                # [..., Vp]
  dx = jnp.einsum('...V,DV->...D', dz, w.astype(dtype))                 # [..., D]
  dw = jnp.einsum('...D,...V->DV', x, dz, preferred_element_type=jnp.float32)   # [D, Vp]
  return dx.astype(x.dtype), dw.astype(w.dtype), None


_ce.defvjp(_ce_fwd, _ce_bwd)
