"""moejax.model.cross_entropy: the LM head's cross-entropy and its gradients equal autodiff of
the plain formula (log-sum-exp minus the label's logit, padded ids masked, unpredicted tokens
skipped), whether the backward pass reads the kept gradient of the logits (in the compute
dtype, never float32 logits) or keeps nothing of the vocabulary's size but the weight."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model import cross_entropy

VOCAB, PADDED, D = 50, 64, 16


def _plain(x, w, labels):
  z = cross_entropy.logits(x, w, VOCAB, x.dtype)
  lse = jax.nn.logsumexp(z, axis=-1)
  label_logit = jnp.take_along_axis(z, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(labels >= 0, lse - label_logit, 0.0))


def _fused(x, w, labels, keep=False):
  return cross_entropy.cross_entropy_sum(x, w, labels, vocab_size=VOCAB, dtype=x.dtype,
                                         logits_axes=(), keep=keep)


_kept = functools.partial(_fused, keep=True)
BOTH = pytest.mark.parametrize('fused', [_fused, _kept], ids=['recompute', 'keep'])


def _inputs(dtype):
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (2, 3, 8, D), jnp.float32).astype(dtype)   # [S, B, T, D]
  w = jax.random.normal(k[1], (D, PADDED), jnp.float32)                 # [D, Vp]
  labels = jax.random.randint(k[2], (2, 3, 8), 0, VOCAB)
  labels = labels.at[:, 0, :3].set(-1)                                  # -1: not predicted
  return x, w, labels


@BOTH
def test_value_and_gradients_equal_autodiff_of_the_formula(fused):
  x, w, labels = _inputs(jnp.float32)
  assert int(jnp.sum(labels < 0)) > 0
  value, grads = jax.value_and_grad(fused, argnums=(0, 1))(x, w, labels)
  value_ref, grads_ref = jax.value_and_grad(_plain, argnums=(0, 1))(x, w, labels)
  np.testing.assert_allclose(value, value_ref, rtol=1e-6)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(grads[1][:, VOCAB:]))) == 0.0           # padded ids: no gradient


@BOTH
def test_bfloat16_gradients_track_float32_and_the_weight_gradient_is_float32(fused):
  x, w, labels = _inputs(jnp.bfloat16)
  dx, dw = jax.grad(fused, argnums=(0, 1))(x, w, labels)
  dx_ref, dw_ref = jax.grad(_plain, argnums=(0, 1))(x.astype(jnp.float32), w, labels)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
  assert rel(dx, dx_ref) < 2e-2 and rel(dw, dw_ref) < 2e-2


def _kept_for_backward(f, dtype=jnp.float32):
  """(shape, dtype) of the arrays jax.vjp keeps for f's backward pass."""
  x, w, labels = _inputs(dtype)
  _, vjp = jax.vjp(lambda x, w: f(x, w, labels), x, w)
  return [(a.shape, a.dtype) for a in jax.tree.leaves(vjp)]


def _vocab_sized(kept):
  return [(s, t) for s, t in kept if PADDED in s and s != (D, PADDED)]


def test_the_backward_pass_keeps_no_logits_or_only_their_gradient_in_the_compute_dtype():
  assert _vocab_sized(_kept_for_backward(_plain))          # autodiff keeps [S, B, T, Vp]
  assert not _vocab_sized(_kept_for_backward(_fused))
  assert _vocab_sized(_kept_for_backward(_kept, jnp.bfloat16)) == [((2, 3, 8, PADDED),
                                                                    jnp.bfloat16)]
