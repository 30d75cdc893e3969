"""Fault injection: broken data, diverging runs, damaged or unwritable checkpoints, signals,
two runs on one workdir, bad flags. Every case ends in one clear message and never loses a
complete checkpoint."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moejax import checkpoint_dir
from moejax.data import tokens
from moejax.errors import CheckpointError, DataError, DivergedError, WorkdirInUse
from moejax.train import loop, workdir as workdir_lib
from tests.helpers import small_config, subprocess_env

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick(**kw):
  c = small_config(1, 1, **{'data.num_micro_batches': 2})
  c.update(checkpoint_every=1, log_every=1, checkpoint_keep=10, **kw)
  return c


def records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def complete_steps(workdir):
  return checkpoint_dir.complete_steps(os.path.join(workdir, 'checkpoints'))


def params_of(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return ocp.StandardCheckpointer().restore(path)['params']


def test_divergence_saves_nothing_broken_and_the_newest_checkpoint_resumes(tmp_path):
  diverging = quick(num_steps=8)
  diverging.optim.update(lr=1e6, warmup_steps=1)
  with pytest.raises(DivergedError, match=r'Stopped without saving it.* The newest checkpoint'):
    loop.train(diverging, str(tmp_path))
  saved = complete_steps(tmp_path)
  assert saved and max(saved) < 8
  for step in saved:
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(params_of(tmp_path, step)))
  loop.train(quick(num_steps=max(saved) + 1), str(tmp_path))     # resumes and trains on
  assert np.isfinite(records(tmp_path)[-1]['loss'])


def test_corrupt_newest_checkpoint_falls_back_and_finishes_like_undisturbed(tmp_path):
  loop.train(quick(num_steps=3), str(tmp_path / 'straight'))
  run = str(tmp_path / 'run')
  loop.train(quick(num_steps=2), run)
  state_dir = os.path.join(run, 'checkpoints', '2', 'state')
  victim = next(os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs
                if 'manifest' in f or f.endswith('.zarray') or 'ocdbt' in d)
  with open(victim, 'r+b') as f:      # truncate one file of the newest step
    f.truncate(max(os.path.getsize(victim) // 3, 1))
  loop.train(quick(num_steps=3), run)
  assert records(run)[-1]['loss'] == records(str(tmp_path / 'straight'))[-1]['loss']
  names = os.listdir(os.path.join(run, 'checkpoints'))
  assert any(n.startswith('2.corrupt-') for n in names)          # set aside, not deleted
  assert [r['step'] for r in records(run)] == [1, 2, 3]          # re-run step not duplicated


def test_failed_save_is_one_clear_error_and_keeps_the_previous_step(tmp_path, monkeypatch):
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step >= 2:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  with pytest.raises(CheckpointError, match=r'Saving a checkpoint .* failed .*No space left.* '
                                            r'newest complete checkpoint is 1'):
    loop.train(quick(num_steps=4), str(tmp_path))
  assert complete_steps(tmp_path) == [1]
  assert not [n for n in os.listdir(tmp_path / 'checkpoints') if 'tmp' in n]


def test_out_of_range_token_ids_are_caught_where_read(tmp_path, monkeypatch):
  data = tmp_path / 'data'
  subprocess.run([sys.executable, '-m', 'moejax.cli.prepare', f'--out={data}',
                  f'--input={os.path.join(ROOT, "README.md")}'], cwd=ROOT, check=True,
                 capture_output=True)
  train_bin = data / 'train.bin'
  garbage = np.random.default_rng(0).integers(0, 2**16, os.path.getsize(train_bin) // 2)
  garbage.astype(np.uint16).tofile(train_bin)             # right size, random ids
  config = quick(num_steps=1)
  config.model.vocab_size = 257
  config.data.update(source='tokens', path=str(data), seq_len=32)
  with pytest.raises(DataError, match=r'train.bin: token id \d+ at token offset \d+ is not below '
                                      r'model.vocab_size=257'):
    loop.train(config, str(tmp_path / 'a'))
  monkeypatch.setattr(tokens, 'SCAN_SECONDS', -1.0)       # no scan at start: per-window check
  with pytest.raises(DataError, match='is not below model.vocab_size'):
    loop.train(config, str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'b' / 'checkpoints' / '1')


def test_a_second_run_on_the_same_workdir_refuses_and_a_stale_lock_is_taken(tmp_path, capsys):
  with workdir_lib.RunLock(str(tmp_path)):
    with pytest.raises(WorkdirInUse, match=f'in use by the run with pid {os.getpid()}'):
      with workdir_lib.RunLock(str(tmp_path)):
        pass
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  lock = tmp_path / workdir_lib.LOCK
  lock.write_text(json.dumps({'host': os.uname().nodename, 'pid': dead.pid, 'started': 0}))
  with workdir_lib.RunLock(str(tmp_path)):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
  assert 'is gone' in capsys.readouterr().out and not lock.exists()


def test_resume_names_what_changed_and_a_finished_run_says_so(tmp_path, capsys):
  loop.train(quick(num_steps=2), str(tmp_path))
  changed = quick(num_steps=3)
  changed.optim.lr = 1e-3
  loop.train(changed, str(tmp_path))
  out = capsys.readouterr().out
  assert 'Changed since the checkpoint: num_steps 2 -> 3, optim.lr 0.003 -> 0.001.' in out
  assert loop.train(quick(num_steps=2), str(tmp_path)) == {}
  assert 'Already at step 3 (num_steps=2)' in capsys.readouterr().out


def _main(workdir, *extra, **kwargs):
  cmd = [sys.executable, 'main.py', f'--workdir={workdir}', '--config=configs/tp4pp4.py:tiny',
         '--config.mesh.tp=1', '--config.mesh.pp=1', '--config.data.num_micro_batches=2',
         *extra]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=subprocess_env(), **kwargs)


@pytest.mark.parametrize('args,message', [
    (['--config.num_steps=2.5'], 'error: '), (['--config.optim.lr=abc'], 'error: ')])
def test_wrong_flag_types_are_one_line(tmp_path, args, message):
  out, err = _main(tmp_path, *args).communicate(timeout=120)
  assert err.startswith(message) and len(err.strip().splitlines()) == 1, err


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / 'file').write_text('')
  proc = _main(tmp_path / 'file' / 'run', '--config.num_steps=1')
  out, err = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert err.strip().startswith('error: Cannot create --workdir') and 'Traceback' not in err


def test_sigint_at_random_moments_exits_promptly_and_keeps_checkpoints_complete(tmp_path):
  rng = random.Random(0)
  for attempt in range(2):
    workdir = tmp_path / str(attempt)
    proc = _main(workdir, '--config.num_steps=100000', '--config.checkpoint_every=1',
                 '--config.log_every=1')
    time.sleep(rng.uniform(2.0, 12.0))
    proc.send_signal(signal.SIGINT)
    start = time.time()
    out, err = proc.communicate(timeout=120)
    assert time.time() - start < 60, 'exit took too long after SIGINT'
    assert 'Traceback' not in err, err[-2000:]
    if 'SIGINT: saved checkpoint at step' in out:
      assert proc.returncode == 0
    steps = complete_steps(workdir) if (workdir / 'checkpoints').exists() else []
    for step in steps[-1:]:
      assert all(np.isfinite(a).all() for a in jax.tree.leaves(params_of(workdir, step)))


@pytest.mark.parametrize('config,extra,message', [
    ('configs/nope.py', [], "error: --config=configs/nope.py: No such file or directory"),
    ('configs/nope.py', ['--config.num_steps=3'], "error: --config=configs/nope.py: No such file"),
    ('BAD', [], 'line 1: invalid syntax (a Python syntax error in the config file)'),
    ('BAD', ['--config.num_steps=3'], 'line 1: invalid syntax'),
    ('configs/olmoe.py:huge', [], "configs/olmoe.py:huge: expected one of ['1b-7b', 'tiny']"),
])
def test_config_file_errors_are_one_line(tmp_path, config, extra, message):
  if config == 'BAD':
    config = str(tmp_path / 'bad.py')
    (tmp_path / 'bad.py').write_text('def get_config(:\n')
  out = subprocess.run([sys.executable, 'main.py', f'--config={config}', *extra,
                        f'--workdir={tmp_path / "run"}'], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]


# main.py whose data read for step 4 never returns (a stuck filesystem, say): the run stalls.
_STUCK_AT_STEP_4 = '''
import runpy, sys, threading
from moejax.train import loop
read = loop.global_batch
def stuck_read(source, step, sharding):
  if step == 3:
    threading.Event().wait()
  return read(source, step, sharding)
loop.global_batch = stuck_read
sys.argv[0] = 'main.py'
runpy.run_path('main.py', run_name='__main__')
'''


def test_a_stalled_run_ends_with_one_line_its_stacks_and_its_checkpoints(tmp_path):
  workdir = tmp_path / 'run'
  args = [f'--workdir={workdir}', '--config=configs/tp4pp4.py:tiny', '--config.mesh.tp=1',
          '--config.mesh.pp=1', '--config.data.num_micro_batches=2', '--config.num_steps=5',
          '--config.checkpoint_every=1', '--config.log_every=1']
  out = subprocess.run([sys.executable, '-c', _STUCK_AT_STEP_4, *args,
                        '--config.stall_timeout_s=3'], cwd=ROOT, capture_output=True, text=True,
                       env=subprocess_env(), timeout=300)
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  stacks = workdir / 'process_0.stall.log'
  assert line.startswith('error: no progress for ') and 'has not moved on' in line, line
  assert f'{stacks}' in line and f'{workdir.resolve()}/checkpoints/3' in line, line
  assert 'stuck_read' in stacks.read_text()       # where the loop waits
  assert complete_steps(workdir)[-1] == 3
  resumed = _main(workdir, '--config.num_steps=5', '--config.log_every=1')
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-3000:]
  assert [r['step'] for r in records(workdir) if 'loss' in r] == [1, 2, 3, 4, 5]
