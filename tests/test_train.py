"""main.py end to end: data determinism, the console line and metrics.jsonl, bad configs.

(That training lowers the loss is shown on real text by tests/test_walkthrough.py.)
"""
import json
import os
import subprocess
import sys

import pytest

from moejax.data.synthetic import SyntheticSource
from tests.helpers import subprocess_env

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_is_a_function_of_seed_and_step():
  a = SyntheticSource('learnable', 256, 4, 2, 16, seed=3)
  b = SyntheticSource('learnable', 256, 4, 2, 16, seed=3)
  assert (a.batch(7) == b.batch(7)).all() and not (a.batch(7) == a.batch(8)).all()
  assert a.batch(7).shape == (4, 2, 17) and a.batch(7).max() < 256


def test_main_logs_console_and_metrics_jsonl(tmp_path):
  workdir = tmp_path / 'run'
  # main.py must simulate its own devices. XLA's default flags, as a user runs it: with the
  # tests' compile flags this 16-device run deadlocked in XLA:CPU's collective rendezvous in 3 of
  # the last 5 clean-clone suites (device threads at different collectives; never alone).
  env = subprocess_env(fast_compile=False)
  cmd = [sys.executable, 'main.py', '--config=configs/tp4pp4.py:tiny', f'--workdir={workdir}',
         '--config.num_steps=4', '--config.log_every=2']
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[:2500] + '\n...\n' + out.stderr[-1500:]
  assert 'simulating 16 CPU devices' in out.stdout
  assert 'step      4/4 | loss' in out.stdout and 'left' in out.stdout
  records = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2, 4]
  for key in ('step', 'loss', 'aux_loss', 'tokens_per_sec', 'dropped_frac', 'balance'):
    assert key in records[0]


def test_main_rejects_bad_config_clearly(tmp_path):
  cmd = [sys.executable, 'main.py', '--config=configs/tp4pp4.py:tiny',
         f'--workdir={tmp_path}', '--config.model.num_heads=6']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert 'model.num_heads=6 is not divisible by mesh.tp=4' in out.stderr
  cmd[-1] = '--config.mesh.tpp=2'
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and 'Known keys' in out.stderr
