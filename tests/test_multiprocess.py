"""Two processes x 8 CPU devices on loopback form one 16-device tp4pp4 mesh (jax.distributed)."""
import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from moejax import checkpoint_dir
from tests.helpers import subprocess_env
from tests.test_checkpoint import command, losses, run as run_one_process

pytestmark = [pytest.mark.e2e, pytest.mark.one_worker]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# One block per stage and 4 micro-batches: the 4x4 pipeline whole (every collective, every
# phase a peer can die in) at about half test_checkpoint's compile and step time.
SMALL = ('--config.model.num_blocks=4', '--config.data.num_micro_batches=4')


def run(workdir, *extra):
  """main.py as one process, on the model of start_two's runs."""
  return run_one_process(workdir, *SMALL, *extra)


# A lost peer is taken for lost after 10 s of silence (XLA's heartbeat: 20 s), not the default
# 20 s (40 s): the kill tests and the chaos run wait that long once per fault.
PEER_TIMEOUT = '--peer_timeout=10'


def start_two(workdir, *extra, env: dict | None = None):
  """main.py as 2 processes of one run, started (env: subprocess_env()'s by default), on the
  tiny tp4pp4 model with SMALL's sizes and PEER_TIMEOUT."""
  address = f'127.0.0.1:{free_port()}'
  return [subprocess.Popen(
      command(workdir, *SMALL, *extra, f'--coordinator_address={address}', '--num_processes=2',
              f'--process_id={i}', '--coordinator_timeout=60', PEER_TIMEOUT),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env or subprocess_env()) for i in range(2)]


# A two-process run of a few steps takes well under a minute here; past this it is hung (a
# test fails in minutes instead of at the suite's per-test limit, and its processes go with it).
RUN_TWO_LIMIT_S = 300


def run_two(workdir, *extra, expect_ok: bool = True, env: dict | None = None,
            limit_s: float = RUN_TWO_LIMIT_S):
  """main.py as 2 processes of one run; returns their (returncode, stdout, stderr)."""
  procs = start_two(workdir, *extra, env=env)
  deadline = time.monotonic() + limit_s
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()                   # the supervised trainer dies with its parent
      tails = [q.communicate()[0][-1500:] for q in procs]
      raise AssertionError(f'two-process run hung past {limit_s:.0f} s; stdout tails: '
                           f'{tails}') from None
    outs.append((p.returncode, out, err))
  if expect_ok:
    for rc, out, err in outs:
      assert rc == 0, err[-3000:]
  return outs


def complete_steps(workdir) -> list[int]:
  return checkpoint_dir.complete_steps(os.path.join(workdir, 'checkpoints'))


def same_5_digits(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for step in a:
    np.testing.assert_allclose(a[step], b[step], rtol=5e-6, err_msg=f'step {step}')


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('one'))
  run(workdir, '--config.num_steps=5')
  return workdir


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('two'))
  outs = run_two(workdir, '--config.num_steps=5')
  assert 'step      5/5 | loss' in outs[0][1]         # process 0 prints and writes metrics
  assert 'step      5/5 | loss' not in outs[1][1]
  # The suite's persistent compilation cache (conftest.py) is off in multi-process CPU runs:
  # process 0 on cached programs beside process 1's fresh compiles deadlocked the next runs.
  assert os.environ.get('JAX_COMPILATION_CACHE_DIR')
  assert 'persistent compilation cache is off' in outs[0][1], outs[0][1][-2000:]
  return workdir


def test_two_processes_log_the_single_process_losses(one_process, two_processes):
  same_5_digits(losses(two_processes), losses(one_process))


def test_checkpoints_move_between_one_and_two_processes(one_process, two_processes):
  # Two-process checkpoint resumed by one process, one-process checkpoint by two processes.
  out = run(two_processes, '--config.num_steps=7')
  assert 'Resumed from' in out.stdout and '(step 5)' in out.stdout
  outs = run_two(one_process, '--config.num_steps=7')
  assert 'Resumed from' in outs[0][1] and '(step 5)' in outs[0][1]
  a, b = losses(two_processes), losses(one_process)
  assert set(a) == set(b) == set(range(1, 8))
  same_5_digits(a, b)


def test_processes_with_different_configs_refuse(tmp_path):
  address = f'127.0.0.1:{free_port()}'
  procs = [subprocess.Popen(
      command(tmp_path, '--config.num_steps=1', f'--config.seed={i}',
              f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=subprocess_env()) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode != 0 and 'Processes disagree on the config' in err, err[-2000:]


def test_processes_on_different_workdirs_refuse(tmp_path):
  address = f'127.0.0.1:{free_port()}'
  procs = [subprocess.Popen(
      command(tmp_path / f'disk{i}', '--config.num_steps=1', f'--coordinator_address={address}',
              '--num_processes=2', f'--process_id={i}'),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=subprocess_env()) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode != 0, err[-2000:]
    assert 'is not one directory shared by every process: process(es) [1]' in err, err[-2000:]
  assert not os.listdir(tmp_path / 'disk0')           # the lock released, nothing compiled


def test_a_corrupt_newest_checkpoint_is_set_aside_for_every_process(one_process, two_processes):
  steps = complete_steps(two_processes)
  if len(steps) < 2:
    run_two(two_processes, f'--config.num_steps={steps[-1] + 2}')
    steps = complete_steps(two_processes)
  newest = steps[-1]
  state = os.path.join(two_processes, 'checkpoints', str(newest), 'state')
  victim = next(os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs
                if 'manifest' in f or 'ocdbt' in d)
  with open(victim, 'r+b') as f:                             # truncate one file of the newest
    f.truncate(max(os.path.getsize(victim) // 3, 1))
  last = newest + 1
  outs = run_two(two_processes, f'--config.num_steps={last}')
  assert 'Renamed it to' in outs[0][1] and f'(step {steps[-2]})' in outs[0][1], outs[0][1][-2000:]
  for _, _, err in outs:     # TensorStore's callbacks into a closed event loop stay off the console
    assert 'Traceback' not in err, err[-2000:]
  names = os.listdir(os.path.join(two_processes, 'checkpoints'))
  assert any(n.startswith(f'{newest}.corrupt-') for n in names), names
  assert complete_steps(two_processes)[-1] == last
  if max(losses(one_process)) < last:
    run(one_process, f'--config.num_steps={last}')
  with open(os.path.join(two_processes, 'metrics.jsonl')) as f:
    assert [json.loads(l)['step'] for l in f] == list(range(1, last + 1))   # none twice
  a, b = losses(two_processes), losses(one_process)
  same_5_digits(a, {s: b[s] for s in a})                   # = a run never disturbed


def test_unreachable_coordinator_is_an_error_naming_it(tmp_path):
  address = f'127.0.0.1:{free_port()}'
  out = subprocess.run(
      command(tmp_path, f'--coordinator_address={address}', '--num_processes=2',
              '--process_id=1', '--coordinator_timeout=3'),
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=subprocess_env())
  assert out.returncode != 0
  assert f'Cannot reach the coordinator at {address}' in out.stderr, out.stderr[-2000:]


def _until_training(proc, step: int = 1) -> list[str]:
  """Process 0's stdout lines up to its log line of `step`."""
  lines = []
  while not any(l.startswith(f'step {step:>6d}/') for l in lines[-1:]):
    line = proc.stdout.readline()
    assert line, 'process 0 ended before training'
    lines.append(line)
  return lines


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(one_process, tmp_path):
  workdir = str(tmp_path)
  procs = start_two(workdir, '--config.num_steps=1000')
  _until_training(procs[0])
  procs[1].send_signal(signal.SIGTERM)                     # the other process is not told
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  stopped = [l for l in outs[0][0].splitlines() if 'saved checkpoint at step' in l]
  assert stopped and 'stop requested by another process' in stopped[0], outs[0][0][-2000:]
  step = int(stopped[0].split('at step ')[1].split()[0])
  assert complete_steps(workdir) == [step]
  assert max(losses(workdir)) == step                      # the stop step's record is written
  assert not os.path.exists(os.path.join(workdir, 'run.lock'))
  last = max(step + 1, 5)
  run_two(workdir, f'--config.num_steps={last}')
  if max(losses(one_process)) < last:                      # the reference, extended to `last`
    run(one_process, f'--config.num_steps={last}')
  a, b = losses(workdir), losses(one_process)
  assert set(a) == set(range(1, last + 1))
  same_5_digits(a, {s: b[s] for s in a})                   # resumed = never stopped


@pytest.mark.parametrize('victim,phase', [(1, 'step'), (0, 'step'), (1, 'evaluation')])
def test_a_killed_process_ends_the_other_with_one_line_in_time(tmp_path, victim, phase):
  """Process 1 killed: process 0's peer watch ends it. Process 0 (the coordinator) killed: XLA's
  coordination client aborts process 1's trainer, and its supervisor says so in one line. The
  survivor is training, or evaluating (the evaluation that follows step 2's line)."""
  workdir = str(tmp_path)
  evaluate = ['--config.eval_every=2', '--config.eval_batches=16'] if phase == 'evaluation' else []
  procs = start_two(workdir, '--config.num_steps=1000', *evaluate)
  _until_training(procs[0], step=2)
  procs[victim].kill()
  killed = time.time()
  survivor = procs[1 - victim]
  out, err = survivor.communicate(timeout=120)
  procs[victim].communicate()
  assert time.time() - killed < 60, (time.time() - killed, err[-1500:])
  assert survivor.returncode == 1 and 'Traceback' not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  who = 'process 1 of 2 went away' if victim else 'process 0 of 2 (the coordinator) went away'
  assert last.startswith(f'error: {who}'), last
  assert 'newest complete checkpoint is none' in last, last
  assert not [l for l in err.splitlines() if l.startswith(('F1', 'E1', 'terminate'))], err[-3000:]
  if phase == 'evaluation':     # it never finished the evaluation it was in
    assert not [l for l in out.splitlines() if l.startswith(('eval ', 'step      3'))], out
  if victim:
    assert not os.path.exists(os.path.join(workdir, 'run.lock'))
