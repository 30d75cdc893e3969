"""What every command-line tool prints: moejax's own lines, not third-party logging."""
from __future__ import annotations

import json
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
  # Orbax's writer threads, and TensorStore's callbacks into a closed event loop after a failed
  # read (a corrupt checkpoint, set aside), report it through sys.excepthook or as an
  # unraisable exception, dozens of times; the failure itself reaches the loop.
  closed_loop = lambda kind, value: kind is RuntimeError and str(value) == 'Event loop is closed'
  def excepthook(kind, value, tb):
    if not closed_loop(kind, value):
      sys.__excepthook__(kind, value, tb)
  def unraisablehook(unraisable):
    if not closed_loop(unraisable.exc_type, unraisable.exc_value):
      sys.__unraisablehook__(unraisable)
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def write_json(path: str | None, result) -> None:
  """Writes a command's figures to `path` (its --out flag) as JSON; nothing without a path."""
  if path:
    with open(path, 'w') as f:
      json.dump(result, f, indent=1)


def parse_flags(argv):
  """absl parsing that loads --config now, with one readable line for an unknown key, a value
  of the wrong type, or a config file that is missing, does not load or refuses its argument."""
  from moejax.errors import MoejaxError
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      flags.FLAGS.config.to_dict   # a file that failed to load raises here
    return rest
  except MoejaxError as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:
    from moejax.config import known_keys
    sys.exit(f'error: unknown config key in {argv[1:]}: {e}\nKnown keys: '
             f'{", ".join(known_keys())}')
  except (flags.Error, ValueError, TypeError) as e:
    text = str(e)
    if 'Error whilst parsing config file' in text:   # the config file's own error, last line
      last = [l for l in text.splitlines() if l.strip()][-1]
      text = f'{_config_arg(argv)}: {last.split(": ", 1)[-1]}'
    sys.exit(f'error: {text.splitlines()[0]}')
  except (OSError, SyntaxError, ImportError) as e:
    sys.exit(f'error: {_config_file_error(e, _config_arg(argv))}')


def _config_arg(argv) -> str:
  return next((a for a in argv if a.startswith('--config=')), '--config')


def _config_file_error(e: BaseException, arg: str) -> str:
  """One line for a --config file that cannot be loaded."""
  cause = e
  while cause.__cause__ is not None:
    cause = cause.__cause__
  if isinstance(cause, SyntaxError):
    return (f'{arg}: {cause.filename}, line {cause.lineno}: {cause.msg} (a Python syntax error '
            f'in the config file); fix the file or use another --config.')
  lines = [l.strip() for l in str(cause).splitlines() if l.strip()]
  missing = next((l for l in lines if 'No such file' in l), None)
  if missing:
    return (f'{arg}: {missing.split("] ", 1)[-1]}; give an existing config file '
            f'(PATH[:VARIANT], e.g. --config=configs/tp4pp4.py:tiny).')
  return f'{arg} does not load: {lines[-1] if lines else repr(cause)}.'


CONFIG_HELP = ('Config keys (--config.SECTION.KEY=VALUE): every key is commented in '
               'configs/tp4pp4.py and moejax/config_files.py and listed in docs/config_keys.md.')


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
