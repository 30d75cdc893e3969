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

import functools
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
  return 'mosaic', 'tokamax Mosaic GPU grouped matmul'


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """lhs [M, K] (rows of group g after those of groups < g), rhs [G, K, N], group_sizes [G]
  -> [M, N]; rows past sum(group_sizes) are not computed (their values are unspecified)."""
  if kernel(mesh_lib.platform())[0] == 'xla':
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)
  import tokamax
  from absl import flags
  # Lowering needs no GPU (ahead-of-time compiles): tokamax's cross_compile option, set for the
  # process because the backward kernels are traced after this call returns.
  flags.FLAGS.tokamax_cross_compile = True
  return tokamax.ragged_dot(lhs, rhs, group_sizes, implementation='mosaic')


# Rows per tile of the Triton kernel, forward and both gradients: each group's last tile pads at
# most TILE_ROWS - 1 rows, and 64 is the M of Hopper's wgmma instruction. tokamax's heuristic
# takes 128 (up to 127 padded rows per expert: 1.94 TFLOP per device per step of the full
# dropless config, 29% of the model's FLOPs; BENCHMARKS.md).
TILE_ROWS = 64


@functools.cache
def _triton_kernel():
  """tokamax's Pallas-Triton ragged dot with TILE_ROWS-row tiles in every kernel (its default
  gradients are fresh ops at the heuristic's tile)."""
  from tokamax._src.ops.ragged_dot import base, triton
  config = triton.Config(block_m=TILE_ROWS, block_n=128, block_k=32, num_warps=4, num_stages=4)
  gradient = triton.TritonRaggedDot(config=config)
  vjp = functools.partial(base.vjp, dlhs_ragged_dot=gradient, drhs_ragged_dot=gradient)
  return triton.TritonRaggedDot(config=config, vjp=vjp)
