"""Chaos: a two-process tiny 4x4 run (main.py, 2 processes x 8 CPU devices) under faults drawn
from a seed: SIGKILL or SIGTERM to one or both processes, during the first compile, between
steps, or while a checkpoint is being written; both restarted after each, until the run reaches
its last step. Then its final state must equal an undisturbed run's bit for bit, every step must
be logged once, and no checkpoint may be lost or left half-written.

  python -m tests.chaos --faults=30 --steps=40 --seed=1 --workdir=/tmp/moejax_chaos

tests/test_chaos.py runs it with 10 faults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time

from moejax import checkpoint_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEN = ('compile', 'step', 'save')                   # when a fault strikes
EXIT_LIMIT_S = 120                                   # a fault's processes must end within


@dataclasses.dataclass(frozen=True)
class Fault:
  when: str          # 'compile': a random moment after start; 'step': after a step line; 'save':
                     # as soon as a checkpoint's temporary directory appears
  signal: int        # signal.SIGKILL or signal.SIGTERM
  victims: tuple     # process ids
  delay_s: float     # 'compile': seconds after start; 'step': steps to wait for


def plan(seed: int, faults: int) -> list[Fault]:
  """The faults of a seed: the first six cover every moment, both signals and every victim set
  (the coordinator, the other process, both); the rest are drawn."""
  rng = random.Random(seed)
  out, who = [], ((1,), (0,), (0, 1))
  for i in range(faults):
    when = WHEN[i % 3] if i < 6 else rng.choice(WHEN)
    sig = (signal.SIGKILL, signal.SIGTERM)[(i // 3) % 2] if i < 6 else rng.choice(
        (signal.SIGKILL, signal.SIGTERM))
    victims = who[(i // 2) % 3] if i < 6 else rng.choice(who)
    delay = rng.uniform(1.0, 8.0) if when == 'compile' else rng.randint(1, 3)
    out.append(Fault(when, sig, victims, delay))
  return out


class Run:
  """main.py as two processes of one run; their output read by threads (never blocking them)."""

  def __init__(self, workdir: str, extra: list[str], env: dict):
    from tests.test_multiprocess import start_two
    self.procs = start_two(workdir, *extra, env=env)
    self.lines = [[], []]
    self.errs = [[], []]
    self.readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                    for p, out, err in zip(self.procs, self.lines, self.errs)
                    for stream, sink in ((p.stdout, out), (p.stderr, err))]
    for t in self.readers:
      t.start()

  @staticmethod
  def _read(stream, sink: list) -> None:
    for line in stream:
      sink.append(line.rstrip('\n'))

  def steps_logged(self) -> int:
    return sum(1 for l in self.lines[0] if l.startswith('step '))

  def running(self) -> bool:
    return all(p.poll() is None for p in self.procs)

  def wait(self, limit_s: float) -> list[int | None]:
    """Return codes after at most limit_s (None: still running, then killed)."""
    end = time.time() + limit_s
    for p in self.procs:
      try:
        p.wait(timeout=max(end - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        pass
    codes = [p.poll() for p in self.procs]
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for t in self.readers:
      t.join(timeout=10)
    return codes

  def last_error(self, i: int) -> str:
    return next((l for l in reversed(self.errs[i]) if l.startswith('error:')), '')


def _temporaries(workdir: str) -> set[str]:
  """The checkpoint directories being written (Orbax's temporary names)."""
  directory = os.path.join(workdir, 'checkpoints')
  return {n for n in os.listdir(directory) if 'tmp' in n} if os.path.isdir(directory) else set()


def complete_steps(workdir: str) -> list[int]:
  return checkpoint_dir.complete_steps(os.path.join(workdir, 'checkpoints'))


def _strike(run: Run, fault: Fault, workdir: str) -> str:
  """Waits for the fault's moment and sends its signal; returns what happened."""
  start, before, left = time.time(), run.steps_logged(), _temporaries(workdir)
  while run.running():
    if fault.when == 'compile' and time.time() - start >= fault.delay_s:
      break
    if fault.when == 'step' and run.steps_logged() >= before + fault.delay_s:
      break
    if fault.when == 'save' and _temporaries(workdir) - left:   # a save of this attempt's
      break
    time.sleep(0.005)
  else:
    return 'ended before the fault'
  for i in fault.victims:
    run.procs[i].send_signal(fault.signal)
  return f'struck at step {run.steps_logged()}'


def chaos(workdir: str, steps: int, faults: int, seed: int, extra: list[str],
          env: dict, log=print) -> list[dict]:
  """Runs to `steps` under the seed's faults; returns one record per attempt."""
  args = [f'--config.num_steps={steps}', *extra]
  records, newest = [], 0
  for fault in plan(seed, faults) + [None]:
    run = Run(workdir, args, env)
    what = _strike(run, fault, workdir) if fault else 'no fault'
    codes = run.wait(EXIT_LIMIT_S if fault else 900)
    done = complete_steps(workdir)
    record = {'fault': dataclasses.asdict(fault) if fault else None, 'outcome': what,
              'exit': codes, 'errors': [run.last_error(0), run.last_error(1)],
              'checkpoints': done}
    records.append(record)
    log(json.dumps(record))
    assert None not in codes, f'a process did not end within {EXIT_LIMIT_S} s: {record}'
    assert not done or done[-1] >= newest, f'a complete checkpoint was lost: {record}'
    newest = done[-1] if done else newest
    if fault is None:
      assert codes == [0, 0], '\n'.join(run.errs[0][-30:] + run.errs[1][-30:])
  return records


def main() -> None:
  from tests.test_multiprocess import run_two
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--faults', type=int, default=30)
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default=tempfile.mkdtemp(prefix='moejax_chaos_'))
  a = parser.parse_args()
  env = dict(os.environ)      # multi-process CPU runs compile in every process (no JAX cache)
  extra = ['--config.checkpoint_every=2']
  reference = os.path.join(a.workdir, 'reference')
  run_two(reference, f'--config.num_steps={a.steps}', *extra, env=env,
          limit_s=300 + 5 * a.steps)
  chaos(os.path.join(a.workdir, 'chaos'), a.steps, a.faults, a.seed, extra, env)
  check(os.path.join(a.workdir, 'chaos'), reference, a.steps)
  print(f'{a.faults} faults: final state equals the undisturbed run bit for bit; every step '
        'logged once; no checkpoint lost or half-written.')


def check(workdir: str, reference: str, steps: int) -> None:
  """The chaos run's final state, metrics and checkpoints against the undisturbed run's."""
  import jax
  import numpy as np

  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(l) for l in f]
  assert [r['step'] for r in records] == list(range(1, steps + 1))
  with open(os.path.join(reference, 'metrics.jsonl')) as f:
    assert [r['loss'] for r in records] == [json.loads(l)['loss'] for l in f]
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert all(n.isdigit() for n in names), names          # nothing half-written or set aside
  a, b = host_state(workdir, steps), host_state(reference, steps)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  for step in map(int, names):                          # every kept checkpoint restores
    host_state(workdir, step)


def host_state(workdir: str, step: int):
  """A checkpoint's train state as NumPy arrays (a two-process run's, restored by one)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return reader.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=args))


if __name__ == '__main__':
  main()
