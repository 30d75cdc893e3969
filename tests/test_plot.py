"""moejax.cli.plot on hand-written metrics.jsonl files (no training), run as the CLI."""
import json
import os
import subprocess
import sys
import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(path, drop):
  path.mkdir()
  with open(path / 'metrics.jsonl', 'w') as f:
    for step in (10, 20):
      f.write(json.dumps({'step': step, 'loss': 3.0 - step / 100, 'dropped_frac': drop,
                          'balance': 0.8, 'expert_share': [[0.5, 0.5]],
                          'dropped_frac_per_layer': [drop]}) + '\n')
    f.write(json.dumps({'step': 20, 'eval_loss': 2.5, 'eval_dropped_frac': drop}) + '\n')
  return str(path)


def _plot(*args):
  return subprocess.run([sys.executable, '-m', 'moejax.cli.plot', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_compare_draws_runs_side_by_side(tmp_path):
  runs = ','.join([_run(tmp_path / 'a', 0.1), _run(tmp_path / 'b', 0.0)])
  out = _plot(f'--compare={runs}', '--labels=moe,dense', f'--out={tmp_path}/out')
  assert out.returncode == 0, out.stderr[-2000:]
  with open(tmp_path / 'out' / 'compare.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  bad = _plot(f'--compare={runs}', '--labels=moe')
  assert bad.returncode != 0 and '1 names for 2 runs' in bad.stderr


def test_one_run_writes_its_pngs(tmp_path):
  out = _plot(f'--workdir={_run(tmp_path / "a", 0.1)}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / 'a' / 'plots')) == ['dropped.png', 'expert_load.png',
                                                          'loss.png']
