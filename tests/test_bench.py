"""The benchmark runs on the tiny config and emits every field (no timing assertions)."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import subprocess_env

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('step_time_s', 'forward_latency_s', 'tokens_per_sec', 'flops_per_token', 'mfu', 'peak_flops_source',
          'memory_per_device_bytes', 'collective_bytes', 'collective_bytes_min', 'dropped_frac', 'balance',
          'bubble_measured', 'bubble_formula', 'ratio_vs_1x1')


def test_bench_emits_every_field(tmp_path):
  out_file = tmp_path / 'bench.json'
  cmd = [sys.executable, '-m', 'moejax.bench', '--config=configs/tp4pp4.py:tiny',
         '--config.mesh.pp=2', '--config.mesh.tp=2', '--config.data.num_micro_batches=4',
         '--steps=1', '--rounds=1', f'--out={out_file}']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=subprocess_env())
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out_file.read_text())
  for field in FIELDS:
    assert field in result, field
  assert result['collective_bytes']['all-to-all'] > 0
  assert result['collective_bytes']['collective-permute'] > 0
  assert 0 < result['bubble_formula'] < 1


def test_bench_aot_compiles_without_allocating(tmp_path):
  out_file = tmp_path / 'aot.json'
  cmd = [sys.executable, '-m', 'moejax.bench', '--config=configs/tp4pp4.py:tiny', '--aot',
         f'--out={out_file}']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=subprocess_env())
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out_file.read_text())
  memory = result['memory_per_device_bytes']
  assert memory['params'] > 0
  assert 0 <= memory['optimizer_state'] - 2 * memory['params'] < 1024   # Adam mu, nu + counts
  assert result['collective_bytes']['all-to-all'] >= result['collective_bytes_min']['all-to-all']
  assert result['collective_ratio_vs_min'] >= 1.0


def _cuda_plugin() -> bool:
  from moejax import targets
  return targets.cuda_available()


def _bench(tmp_path, *args):
  cmd = [sys.executable, '-m', 'moejax.bench', *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=subprocess_env())


@pytest.mark.skipif(_cuda_plugin(), reason='jax[cuda12] is installed here')
def test_gpu_target_without_the_cuda_plugin_says_what_to_install(tmp_path):
  out = _bench(tmp_path, '--config=configs/tp4pp4.py:tiny', '--aot', '--target=h100')
  assert out.returncode != 0
  assert 'pip install -r requirements.txt -r requirements-cuda12.txt' in out.stderr
  assert 'Traceback' not in out.stderr


@pytest.mark.skipif(not _cuda_plugin(), reason='needs jax[cuda12] (requirements-cuda12.txt)')
def test_h100_target_compiles_the_gpu_program(tmp_path):
  out_file = tmp_path / 'h100.json'
  out = _bench(tmp_path, '--config=configs/tp4pp4.py:tiny', '--aot', '--target=h100',
               f'--out={out_file}')
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out_file.read_text())
  assert result['target'] == 'NVIDIA H100 80GB HBM3' and result['platform'] == 'cuda'
  for field in ('collective_overlap_frac', 'flops_executed', 'flops_executed_over_model'):
    assert field in result, field
  assert 1.0 <= result['flops_executed_over_model'] < 3.0
  assert result['collective_bytes']['all-to-all'] > 0


def test_gpu_bench_tiny_runs_the_cards_code_on_cpu(tmp_path):
  """gpu_bench --tiny: the named shapes' CPU variants through the same measuring, trace and
  op-class code as on a card (the equivalence is covered by the mesh tests)."""
  out_file = tmp_path / 'gpu_bench.json'
  cmd = [sys.executable, '-m', 'moejax.cli.gpu_bench', '--tiny', '--steps=1',
         '--shapes=seed_stage,qwen3_30b_a3b', '--noequivalence', f'--out={out_file}',
         f'--files={tmp_path}']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=subprocess_env())
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out_file.read_text())
  assert set(result['programs']) == {'seed_stage/capacity', 'seed_stage/dropless',
                                     'qwen3_30b_a3b/capacity', 'qwen3_30b_a3b/dropless'}
  for key, r in result['programs'].items():
    assert 'error' not in r, (key, r)
    assert r['step_s'] > 0 and 0 < r['mfu'] and r['model_flops_per_token'] > 0
    assert sum(r['measured_s_by_class'].values()) > 0
    assert r['measured_s_by_class'].get('expert_gemm', 0) > 0, key
  assert (tmp_path / 'hlo.tar.gz').exists() and (tmp_path / 'traces.tar.gz').exists()


def _gpu_bench(*args):
  cmd = [sys.executable, '-m', 'moejax.cli.gpu_bench', *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=subprocess_env())


@pytest.mark.skipif(_cuda_plugin(), reason='jax[cuda12] is installed here')
def test_gpu_bench_predict_without_the_cuda_plugin_says_what_to_install():
  out = _gpu_bench('--predict=h200', '--tiny', '--shapes=seed_stage')
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'pip install -r requirements.txt -r requirements-cuda12.txt' in out.stderr
  assert 'Traceback' not in out.stderr


@pytest.mark.skipif(not _cuda_plugin(), reason='needs jax[cuda12] (requirements-cuda12.txt)')
def test_gpu_bench_predict_compiles_each_shape_for_the_card(tmp_path):
  out_file = tmp_path / 'predict.json'
  out = _gpu_bench('--predict=h200', '--tiny', '--shapes=seed_stage', f'--out={out_file}')
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out_file.read_text())
  assert result['predicted_for'] == 'NVIDIA H200'
  r = result['programs']['seed_stage/capacity']
  assert r['predicted_step_s'] > 0 and 0 < r['predicted_mfu'] < 1 and r['fits']
  assert r['predicted_s_by_class']['expert_gemm'] > 0
  assert 'skipped' in result['programs']['seed_stage/dropless']   # not the card's kernel
