"""Training end to end: the loss falls on learnable data, and main.py logs what it promises."""
import json
import os
import subprocess
import sys

import jax

from configs import tp4pp4
from moejax.data.synthetic import SyntheticSource
from moejax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_is_a_function_of_seed_and_step():
  a = SyntheticSource('learnable', 256, 4, 2, 16, seed=3)
  b = SyntheticSource('learnable', 256, 4, 2, 16, seed=3)
  assert (a.batch(7) == b.batch(7)).all() and not (a.batch(7) == a.batch(8)).all()
  assert a.batch(7).shape == (4, 2, 17) and a.batch(7).max() < 256


def test_tiny_model_learns(tmp_path):
  c = tp4pp4.get_config('tiny')
  c.mesh.tp = c.mesh.pp = 1
  c.data.micro_batch_size = 1
  c.data.num_micro_batches = 8
  c.num_steps, c.log_every = 150, 150
  first = loop.train(_with(c, num_steps=1, log_every=1), str(tmp_path / 'a'))
  last = loop.train(c, str(tmp_path / 'b'))
  assert first['loss'] > 5.0            # ~ ln 256 at the start
  assert last['loss'] < 2.0, last       # the progression rule is learnt in context


def _with(c, **kw):
  c = c.copy_and_resolve_references()
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_main_logs_console_and_metrics_jsonl(tmp_path):
  workdir = tmp_path / 'run'
  env = dict(os.environ, XLA_FLAGS='')   # main.py must simulate its own devices
  cmd = [sys.executable, 'main.py', '--config=configs/tp4pp4.py:tiny', f'--workdir={workdir}',
         '--config.num_steps=4', '--config.log_every=2']
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
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
