"""How a run that cannot go on ends (a lost peer, a stalled step): the run lock released, one
`error:` line naming the newest complete checkpoint, and an immediate exit with no teardown of
JAX (its collectives would wait for whatever is lost or stuck)."""
from __future__ import annotations

import os
import sys
from typing import Callable

import jax


def end_run(why: str, newest: str, cleanup: Callable[[], None]) -> None:
  """Ends this process: `cleanup`, then `error: <why>.` and where to resume from; never
  returns."""
  try:
    cleanup()
  finally:
    several = ' every process' if _several() else ''
    print(f'error: {why}. The newest complete checkpoint is {newest}: restart{several} with the '
          f'same command to resume from it.', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _several() -> bool:
  try:
    return jax.process_count() > 1
  except Exception:   # JAX itself is what broke
    return True
