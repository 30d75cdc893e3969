"""The grouped matmul of dropless experts: rows [M, K] sorted by group, times each group's
matrix [G, K, N].

On NVIDIA targets it is tokamax's Pallas Mosaic GPU kernel (forward and both gradients): on an
H200 it ran the experts' grouped matmuls (fwd + bwd) at 127-275 TFLOP/s where XLA's
jax.lax.ragged_dot (jax 0.11.2) ran them at 4-95, and tokamax's Triton kernel needs jax_triton
with Triton >= 3.7 (BENCHMARKS.md, gpu_bench). Elsewhere
it is jax.lax.ragged_dot (XLA:CPU computes the rows of each group only). tokamax is installed
with requirements-cuda12.txt only; the implementation is always named, because tokamax's own
choice looks at the default backend, which is the CPU during an ahead-of-time GPU compile.
"""
from __future__ import annotations

import importlib.util

import jax

from moejax.parallel import mesh as mesh_lib


def kernel(platform: str) -> tuple[str, str]:
  """('mosaic' or 'xla', what the compile line says) for devices of `platform`."""
  if platform not in mesh_lib.NVIDIA_PLATFORMS:
    return 'xla', 'XLA ragged_dot'
  if importlib.util.find_spec('tokamax') is None:
    return 'xla', ('XLA ragged_dot, a dense matmul on NVIDIA GPUs: pip install -r '
                   'requirements-cuda12.txt for tokamax\'s grouped matmul')
  if jax.default_backend() not in mesh_lib.NVIDIA_PLATFORMS:
    # tokamax 0.0.17's Mosaic kernel picks its tiles from the GPU it runs on: none is here.
    return 'xla', ('XLA ragged_dot (an ahead-of-time compile: tokamax\'s Mosaic GPU kernel, '
                   'what a GPU runs, reads the card it runs on)')
  return 'mosaic', 'tokamax Mosaic GPU grouped matmul'


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """lhs [M, K] (rows of group g after those of groups < g), rhs [G, K, N], group_sizes [G]
  -> [M, N]; rows past sum(group_sizes) are not computed (their values are unspecified)."""
  if kernel(mesh_lib.platform())[0] == 'xla':
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)
  import tokamax
  # Named for NVIDIA ('mosaic' would be resolved by the default backend).
  return tokamax.ragged_dot(lhs, rhs, group_sizes, implementation='mosaic_gpu')
