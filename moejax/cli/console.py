"""What every command-line tool prints: moejax's own lines, not third-party logging."""
from __future__ import annotations

import logging
import os
import sys

from absl import flags, logging as absl_logging


def quiet_logs() -> None:
  """Third-party logging (Orbax, JAX backend probing, asyncio) and tracebacks printed from
  background threads off, unless --verbosity was given or MOEJAX_TRACEBACK is set: every failure
  that matters reaches the user as moejax's own one-line error."""
  if flags.FLAGS['verbosity'].present or os.environ.get('MOEJAX_TRACEBACK'):
    return
  absl_logging.set_verbosity(absl_logging.FATAL)
  for name in ('jax', 'orbax', 'absl', 'asyncio'):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  # Orbax's writer threads report a failed write from a closed event loop through
  # sys.excepthook, hundreds of times; the save's own error is raised to the loop.
  def excepthook(kind, value, tb):
    if not (kind is RuntimeError and str(value) == 'Event loop is closed'):
      sys.__excepthook__(kind, value, tb)
  sys.excepthook = excepthook
