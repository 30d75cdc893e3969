"""Exact resume, resume on other meshes, and safety under SIGKILL / SIGTERM (CLI, new processes)."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moejax.errors import ConfigError
from moejax.train import loop
from moejax.checkpoint_dir import saved_config
from tests.helpers import assert_trees_close, small_config, subprocess_env, without_key_bias

pytestmark = [pytest.mark.e2e, pytest.mark.one_worker]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--config=configs/tp4pp4.py:tiny', '--config.log_every=1',
        '--config.data.num_micro_batches=8', '--config.checkpoint_every=0']


def command(workdir, *extra):
  return [sys.executable, 'main.py', f'--workdir={workdir}', *BASE, *extra]


def run(workdir, *extra):
  out = subprocess.run(command(workdir, *extra), cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=subprocess_env())
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


def saved_state(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return ocp.StandardCheckpointer().restore(path)


def saved_params(workdir, step):
  return saved_state(workdir, step)['params']


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The undisturbed 4x4 run of 6 steps."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  run(workdir, '--config.num_steps=6')
  return workdir


def test_resume_is_exact_on_4x4(straight, tmp_path):
  run(tmp_path, '--config.num_steps=3')
  out = run(tmp_path, '--config.num_steps=6')
  assert 'Resumed from' in out.stdout and '(step 3)' in out.stdout
  assert losses(tmp_path) == losses(straight)               # bit-identical per-step losses
  a, b = saved_params(tmp_path, 6), saved_params(straight, 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_resume_is_exact_on_1x1(tmp_path):
  one = ['--config.mesh.tp=1', '--config.mesh.pp=1']
  run(tmp_path / 'a', '--config.num_steps=4', *one)
  run(tmp_path / 'b', '--config.num_steps=2', *one)
  run(tmp_path / 'b', '--config.num_steps=4', *one)
  assert losses(tmp_path / 'a') == losses(tmp_path / 'b')


@pytest.mark.parametrize('mesh', [('2', '8'), ('1', '1')])
def test_checkpoint_from_4x4_resumes_on_other_mesh(straight, tmp_path, mesh):
  run(tmp_path, '--config.num_steps=3')
  run(tmp_path, '--config.num_steps=6', f'--config.mesh.tp={mesh[0]}', f'--config.mesh.pp={mesh[1]}')
  np.testing.assert_allclose(losses(tmp_path)[4], losses(straight)[4], rtol=1e-5)
  # Every leaf of the state, Adam moments and step counts included, continues the straight run.
  assert_trees_close(without_key_bias(saved_state(tmp_path, 6)),
                     without_key_bias(saved_state(straight, 6)), rtol=1e-4)


def test_sigkill_during_save_then_restart_finishes_like_undisturbed(straight, tmp_path):
  ckdir = tmp_path / 'checkpoints'
  proc = subprocess.Popen(command(tmp_path, '--config.num_steps=6', '--config.checkpoint_every=1'),
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=subprocess_env())
  killed_mid_save = False
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline:
    names = os.listdir(ckdir) if ckdir.exists() else []
    if any('tmp' in n for n in names):          # Orbax's not-yet-finalized save directory
      proc.send_signal(signal.SIGKILL)
      killed_mid_save = True
      break
    time.sleep(0.005)
  proc.wait()
  assert killed_mid_save, 'the run ended before a save was caught in flight'
  run(tmp_path, '--config.num_steps=6')
  assert losses(tmp_path)[6] == losses(straight)[6]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(command(tmp_path, '--config.num_steps=100000'), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=subprocess_env())
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 600
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 2):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0
  assert 'SIGTERM: saved checkpoint at step' in out
  step = int(out.split('SIGTERM: saved checkpoint at step ')[1].split()[0])
  # The step is complete: Orbax renamed it from its temporary name, and its config reads back.
  assert saved_config(str(tmp_path))[0] == step


def test_checkpoint_of_another_model_is_a_clear_error_and_kept(tmp_path):
  run(tmp_path, '--config.num_steps=1', '--config.mesh.tp=1', '--config.mesh.pp=1')
  out = subprocess.run(command(tmp_path, '--config.num_steps=2', '--config.model.d_model=32',
                               '--config.mesh.tp=1', '--config.mesh.pp=1'),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode != 0
  assert 'is of a different model' in out.stderr and 'model.d_model' in out.stderr
  assert (tmp_path / 'checkpoints' / '1' / 'state').exists()     # nothing deleted


def _quick(**kw):
  return small_config(1, 1, **{'data.num_micro_batches': 2}, **kw)


def _set(c, **kw):
  c.update(kw)
  return c


def test_init_from_loads_params_with_a_fresh_optimizer(tmp_path):
  loop.train(_set(_quick(), num_steps=2, checkpoint_every=0), str(tmp_path / 'a'))
  # Warmup from 0: the fine-tuning run's one step (at lr 0) leaves the loaded params as they were.
  tuned = _set(_quick(**{'optim.warmup_steps': 5}), num_steps=1, checkpoint_every=0,
               init_from=str(tmp_path / 'a'))
  loop.train(tuned, str(tmp_path / 'b'))
  a, b = saved_state(tmp_path / 'a', 2), saved_state(tmp_path / 'b', 1)
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_array_equal(x, y)
  # The optimizer is fresh: after one step from zero moments, mu^2 / nu = (1-b1)^2 / (1-b2)
  # for every element; moments carried over from run a would break it.
  adam_a, adam_b = a['opt_state'][1][0], b['opt_state'][1][0]
  assert int(np.asarray(adam_a['count'])) == 2 and int(np.asarray(adam_b['count'])) == 1
  mu, nu = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(adam_b[k])]) for k in ('mu', 'nu'))
  b1, b2 = tuned.optim.b1, tuned.optim.b2
  live = nu > 1e-20
  np.testing.assert_allclose(mu[live] ** 2 / nu[live], (1 - b1) ** 2 / (1 - b2), rtol=1e-3)
  with pytest.raises(ConfigError, match='no such directory'):
    loop.train(_set(_quick(), num_steps=1, init_from=str(tmp_path / 'none')), str(tmp_path / 'c'))


def test_balancing_bias_resumes_exactly(tmp_path):
  config = lambda steps: _set(_quick(**{'moe.bias_update_rate': 0.01}), num_steps=steps,
                              checkpoint_every=0)
  loop.train(config(3), str(tmp_path / 'straight'))
  loop.train(config(2), str(tmp_path / 'resumed'))
  loop.train(config(3), str(tmp_path / 'resumed'))
  bias = lambda d: saved_params(tmp_path / d, 3)['blocks']['moe']['select_bias']
  assert np.abs(bias('straight')).max() > 0
  np.testing.assert_array_equal(bias('resumed'), bias('straight'))
