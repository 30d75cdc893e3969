"""The grouped matmul of dropless experts: rows [m, k] sorted by group, times each group's
matrix [G, k, n].

On NVIDIA targets it is tokamax's Pallas Mosaic GPU kernel (forward and both gradients): on an
H200 it ran the experts' grouped matmuls (fwd + bwd) at 127-275 TFLOP/s where XLA's
jax.lax.ragged_dot (jax 0.11.2) ran them at 4-95, and tokamax's Triton kernel needs jax_triton
with Triton >= 3.7 (BENCHMARKS.md, gpu_bench). Elsewhere
it is jax.lax.ragged_dot (XLA:CPU computes the rows of each group only). tokamax is installed
with requirements-cuda12.txt only; which one runs is moejax.kernels.grouped_matmul's choice.
This module is the one adapter to tokamax.
"""
from __future__ import annotations

import jax

from moejax import kernels
from moejax.parallel import mesh as mesh_lib


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """lhs [m, k] (rows of group g after those of groups < g), rhs [G, k, n], group_sizes [G]
  -> [m, n]; rows past sum(group_sizes) are not computed (their values are unspecified)."""
  if kernels.grouped_matmul(mesh_lib.platform())[0] == 'xla':
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)
  import tokamax
  # Named for NVIDIA ('mosaic' would be resolved by the default backend).
  return tokamax.ragged_dot(lhs, rhs, group_sizes, implementation='mosaic_gpu')
