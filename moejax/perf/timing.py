"""Wall-clock timing of compiled functions."""
from __future__ import annotations

import time


def timed(fn, *args, steps: int = 1) -> float:
  """Mean seconds per call of fn(*args), after one warm-up call (which compiles if needed)."""
  import jax
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def timed_carry(fn, carry, *args, steps: int = 1):
  """Mean seconds per call of carry = fn(carry, *args)[0] over `steps` chained calls, after one
  untimed call; returns (seconds, the last carry, the last call's other outputs)."""
  import jax
  carry, *rest = fn(carry, *args)
  jax.block_until_ready(carry)
  start = time.perf_counter()
  for _ in range(steps):
    carry, *rest = fn(carry, *args)
  jax.block_until_ready(carry)
  return (time.perf_counter() - start) / steps, carry, rest


def matmul_flops_per_s(devices, n: int = 512, reps: int = 10) -> float:
  """Measured float32 [n, n] matmul rate of `devices` working at once (one matmul each)."""
  import jax
  import jax.numpy as jnp
  xs = [jax.device_put(jnp.ones((n, n), jnp.float32), d) for d in devices]
  f = jax.jit(lambda a: a @ a)
  seconds = timed(lambda: [f(x) for x in xs], steps=reps)
  return 2 * n ** 3 * len(devices) / seconds


def matmul_rate(device, dtype: str, n: int, steps: int) -> float:
  """Measured FLOP/s of an n x n x n matmul in `dtype` on `device`."""
  import jax
  import jax.numpy as jnp
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  return 2 * n ** 3 / timed(jax.jit(lambda x: x @ x), a, steps=steps)
