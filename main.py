"""moejax command line: python main.py --config=configs/tp4pp4.py:tiny --workdir=/tmp/run."""
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.jsonl.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from moejax import runtime   # sets up devices before JAX's first use
  runtime.setup_devices(flags.FLAGS.config)
  from moejax.train import loop
  loop.train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
