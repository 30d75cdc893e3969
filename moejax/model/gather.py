"""Row gathers whose gradients are gathers: moving rows to expert buffers, into sorted order and
back without a scatter-add into a zeroed buffer (whose gradient or forward pass XLA runs as a
scatter, after zeroing the buffer and, when the zeros are shared, copying them per use).

Shapes use local names (lowercase): n source rows, m result rows, r and r2 picks per row, d width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def take(src: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """Rows src [n, d] -> [m, d]: row i the sum over j of src[index[i, j]] (index [m, r]; an index
  of n or more: zero). inverse [n, r2] must list, for each source row, every row i that takes
  it (m or more where fewer): the gradient is then take(d_out, inverse, index)."""
  return _take(src, index, inverse)


def inverse(order: jax.Array) -> jax.Array:
  """The inverse of the permutation order [n]: where each i went (order[inverse[i]] == i)."""
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype),
                                             unique_indices=True)


def _gather_sum(src, index):
  rows = jnp.take(src, index, axis=0, mode='fill', fill_value=0)       # [m, r, d]
  return rows[:, 0] if index.shape[1] == 1 else jnp.sum(rows, axis=1)


@jax.custom_vjp
def _take(src, index, inverse):
  return _gather_sum(src, index)


def _take_fwd(src, index, inverse):
  return _gather_sum(src, index), (index, inverse)


def _take_bwd(res, g):
  index, inverse = res
  return _gather_sum(g, inverse), None, None


_take.defvjp(_take_fwd, _take_bwd)
