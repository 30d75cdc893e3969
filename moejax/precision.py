"""A weight in two precisions: its float32 master (the parameter, which receives the gradient)
and a copy in the compute dtype (cast once per step by moejax.parallel.pipeline), and the
matmul that reads the copy but writes its weight gradient in float32 straight to the master.

Accumulating a weight's gradient over micro-batches then costs no bf16 rounding and no kernel of
its own: the weight-gradient GEMM emits float32, and XLA folds `accumulator + dW` into it (the
float32 accumulation Megatron-Core calls gradient-accumulation fusion). A matmul that does not
know the pair reads `Cast.array()`: the copy, whose bf16 gradient is converted to the master's
dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class Cast:
  """master: the float32 parameter; low: master in the compute dtype, outside the gradient."""

  def __init__(self, master, low):
    self.master, self.low = master, low

  def tree_flatten(self):
    return (self.master, self.low), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)

  shape = property(lambda self: self.master.shape)
  dtype = property(lambda self: self.low.dtype)

  def astype(self, dtype) -> Cast | jax.Array:
    return self if jnp.dtype(dtype) == self.low.dtype else self.array().astype(dtype)

  def array(self) -> jax.Array:
    """The copy, its gradient (in the compute dtype) converted to the master's."""
    return _low(self.master, self.low, self.master.dtype.name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low(master: jax.Array, low: jax.Array, dtype: str) -> jax.Array:
  return low


_low.defvjp(lambda master, low, dtype: (low, None),
            lambda dtype, _, ct: (ct.astype(dtype), None))


def array(w: Cast | jax.Array) -> jax.Array:
  """w as one array in the compute dtype (a Cast's copy, gradient to its master)."""
  return w.array() if isinstance(w, Cast) else w


def einsum(spec: str, x: jax.Array, w: Cast | jax.Array) -> jax.Array:
  """jnp.einsum(spec, x, w); for a Cast w, on its copy, with w's gradient computed in float32
  into its master. spec: two operands, every index in at least two of the three terms
  (a matmul: no index summed within one operand)."""
  if not isinstance(w, Cast):
    return jnp.einsum(spec, x, w)
  inputs, out = spec.split('->')
  a, b = inputs.split(',')
  assert all((i in a) + (i in b) + (i in out) >= 2 for i in a + b + out), spec
  return _master_einsum((a, b, out), x, w.master, w.low)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _master_einsum(terms: tuple[str, str, str], x, master, low):
  a, b, out = terms
  return jnp.einsum(f'{a},{b}->{out}', x, low)


def _master_einsum_fwd(terms, x, master, low):
  return _master_einsum(terms, x, master, low), (x, low)


def _master_einsum_bwd(terms, res, ct):
  a, b, out = terms
  x, low = res
  dx = jnp.einsum(f'{out},{b}->{a}', ct, low).astype(x.dtype)
  dw = jnp.einsum(f'{a},{out}->{b}', x, ct, preferred_element_type=jnp.float32)
  return dx, dw, None


_master_einsum.defvjp(_master_einsum_fwd, _master_einsum_bwd)
