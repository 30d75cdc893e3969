"""Training from the command line: python main.py --config=configs/tp4pp4.py:tiny --workdir=DIR
(or, installed, moejax-train with the same flags).

Multi-process (one process per host, or several per host on CPU):
  python main.py --config=... --workdir=... --coordinator_address=HOST:PORT
      --num_processes=N --process_id=I
Under SLURM or Open MPI with several tasks, the flags can be left out. Each process then runs
its trainer as a child (moejax/cli/supervise.py), so that XLA ending it when a peer dies is one
error line.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

from moejax.cli import console

config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.jsonl.')
flags.DEFINE_string('coordinator_address', '', 'HOST:PORT of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', 1, 'Processes in the run (multi-process runs).')
flags.DEFINE_integer('process_id', 0, 'This process, 0 .. num_processes-1.')
flags.DEFINE_integer('coordinator_timeout', 120, 'Seconds to wait for the coordinator and peers.')
flags.DEFINE_integer('peer_timeout', 20, 'Seconds a peer process may go silent before the run '
                     'takes it for lost and ends (XLA\'s coordination service: twice that).')
flags.DEFINE_bool('allow_other_data', False, 'Resume on token files other than those the '
                  'checkpoint was trained on (refused otherwise).')
flags.mark_flags_as_required(['config', 'workdir'])


def _take_signals() -> None:
  """SIGINT and SIGTERM blocked in every thread (threads inherit the mask: XLA's and Orbax's
  are never interrupted mid-call, which could hang or crash the process) and taken by one
  waiting thread, which hands them to the running loop (finish the step, save, exit) or, with
  no loop running, exits at once."""
  import signal
  import threading
  taken = {signal.SIGINT, signal.SIGTERM}
  signal.pthread_sigmask(signal.SIG_BLOCK, taken)

  def wait() -> None:
    while True:
      signum = signal.sigwait(taken)
      from moejax.train import signals
      if not signals.deliver(signum):
        print(f'{signal.Signals(signum).name}: no training step in progress; exiting without '
              f'saving.', file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + signum)
  threading.Thread(target=wait, name='signals', daemon=True).start()


def main(argv):
  del argv
  f = flags.FLAGS
  from moejax.cli import supervise
  if supervise.wanted(f.coordinator_address, f.num_processes):   # one of several processes
    sys.exit(supervise.run_child(f.workdir, f.process_id, f.num_processes))
  _take_signals()
  console.quiet_logs()
  from moejax import runtime   # sets up devices before JAX's first use
  from moejax.errors import MoejaxError
  try:
    cluster = runtime.detect(f.coordinator_address, f.num_processes, f.process_id,
                             f.coordinator_timeout, f.peer_timeout)
    runtime.setup_devices(f.config, cluster)
    runtime.check_same_config(f.config)
    from moejax.train import loop
    loop.train(f.config, f.workdir, f.allow_other_data)
  except (MoejaxError, OSError, KeyboardInterrupt) as e:
    if os.environ.get('MOEJAX_TRACEBACK'):
      raise
    if isinstance(e, KeyboardInterrupt):
      # Exit now: tearing down the interpreter while XLA's compiler threads are still busy can
      # crash or hang it. The run lock is already released and nothing was being saved.
      print('Interrupted before training started; nothing was saved.', file=sys.stderr,
            flush=True)
      sys.stdout.flush()
      os._exit(130)
    sys.exit(f'error: {e}' if isinstance(e, MoejaxError) else
             f'error: {e.strerror or e} ({e.filename or ""}). Set MOEJAX_TRACEBACK=1 for the '
             f'traceback.')


def run() -> None:
  """Console-script entry point (moejax-train) and main.py's."""
  console.run(main, __name__, flags_parser=console.parse_flags)


if __name__ == '__main__':
  run()
