"""moejax.precision: a Cast's matmul reads the bf16 copy and sends its weight gradient, computed
in float32, to the float32 master; accumulated over micro-batches (a scan, as the pipeline's
ticks) it equals the exact sum to float32 rounding, where rounding each micro-batch's gradient
to bf16 (a plain matmul of the copy) is off by bf16 rounding."""
import jax
import jax.numpy as jnp
import numpy as np

from moejax import precision

SPEC = 'ECD,EDF->ECF'


def _grads(matmul):
  """d/dw of sum_t <matmul(x_t, w), g_t> over 16 micro-batches, and the exact float64 sum."""
  k = jax.random.split(jax.random.key(0), 3)
  xs = jax.random.normal(k[0], (16, 2, 8, 32), jnp.bfloat16)           # [T, E, C, D]
  gs = jax.random.normal(k[1], (16, 2, 8, 24), jnp.bfloat16)           # [T, E, C, F]
  w = jax.random.normal(k[2], (2, 32, 24), jnp.float32)                # [E, D, F] master
  def loss(w):
    low = jax.lax.stop_gradient(w.astype(jnp.bfloat16))
    def tick(acc, xg):
      y = matmul(xg[0], precision.Cast(w, low))                        # [E, C, F] bf16
      return acc + jnp.sum(y.astype(jnp.float32) * xg[1]), None
    return jax.lax.scan(tick, 0.0, (xs, gs))[0]
  exact = np.einsum('tecd,tecf->edf', np.asarray(xs, np.float64), np.asarray(gs, np.float64))
  return np.asarray(jax.jit(jax.grad(loss))(w)), exact


def test_cast_matmul_accumulates_the_weight_gradient_in_float32():
  grad, exact = _grads(lambda x, w: precision.einsum(SPEC, x, w))
  per_tick, _ = _grads(lambda x, w: jnp.einsum(SPEC, x, precision.array(w)))
  assert grad.dtype == per_tick.dtype == np.float32
  error = lambda g: np.max(np.abs(g - exact)) / np.max(np.abs(exact))
  assert error(grad) < 1e-6                         # float32 accumulation of exact products
  assert error(per_tick) > 1e-4                     # each micro-batch's gradient in bf16


def test_cast_matmul_input_gradient_and_value_are_the_copys():
  k = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k[0], (2, 8, 32), jnp.bfloat16)
  w = jax.random.normal(k[1], (2, 32, 24), jnp.float32)
  ct = jax.random.normal(k[2], (2, 8, 24), jnp.bfloat16)
  cast = precision.Cast(w, w.astype(jnp.bfloat16))
  y, vjp = jax.vjp(lambda x: precision.einsum(SPEC, x, cast), x)
  y_ref, vjp_ref = jax.vjp(lambda x: jnp.einsum(SPEC, x, cast.low), x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(vjp(ct)[0], vjp_ref(ct)[0])
  assert cast.astype(jnp.bfloat16) is cast and cast.shape == w.shape
