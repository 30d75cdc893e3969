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
