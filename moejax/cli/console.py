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


CONFIG_HELP = ('Config keys (--config.SECTION.KEY=VALUE): every key is commented in '
               'configs/tp4pp4.py and configs/defaults.py and listed in README.md, "Configs".')


def run(main, module_name: str, flags_parser=None) -> None:
  """absl's app.run(main) for the command defined in `module_name`: its --help shows that
  module's docstring and its own flags (absl lists only the main module's key flags, and an
  entry point's main module is a generated script), and where the config keys are documented."""
  import absl.app
  module = sys.modules[module_name]
  main_name = sys.argv[0]
  for flag in flags.FLAGS.get_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(main_name, flag)
  doc = (module.__doc__ or '').strip()
  if any(f.name == 'config' for f in flags.FLAGS.get_flags_for_module(module_name)):
    doc += '\n\n' + CONFIG_HELP
  sys.modules['__main__'].__doc__ = doc
  kwargs = {} if flags_parser is None else {'flags_parser': flags_parser}
  absl.app.run(main, **kwargs)
