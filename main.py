"""moejax command line: python main.py --config=configs/tp4pp4.py:tiny --workdir=/tmp/run."""
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.jsonl.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl parsing, with a readable error for an unknown --config.key override."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    from moejax.config import known_keys
    sys.exit(f'error: unknown config key in {argv[1:]}: {e}\nKnown keys: '
             f'{", ".join(known_keys())}')


def main(argv):
  del argv
  from moejax import runtime   # sets up devices before JAX's first use
  from moejax.config import ConfigError
  try:
    runtime.setup_devices(flags.FLAGS.config)
    from moejax.train import loop
    loop.train(flags.FLAGS.config, flags.FLAGS.workdir)
  except ConfigError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
