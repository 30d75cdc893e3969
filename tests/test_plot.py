"""moejax.cli.plot on hand-written metrics.jsonl files (no training)."""
import json

import pytest

from moejax.cli import plot


def _run(path, drop):
  path.mkdir()
  with open(path / 'metrics.jsonl', 'w') as f:
    for step in (10, 20):
      f.write(json.dumps({'step': step, 'loss': 3.0 - step / 100, 'dropped_frac': drop,
                          'balance': 0.8, 'expert_share': [[0.5, 0.5]],
                          'dropped_frac_per_layer': [drop]}) + '\n')
    f.write(json.dumps({'step': 20, 'eval_loss': 2.5, 'eval_dropped_frac': drop}) + '\n')
  return str(path)


def test_compare_draws_runs_side_by_side(tmp_path):
  runs = [_run(tmp_path / 'a', 0.1), _run(tmp_path / 'b', 0.0)]
  path = plot.compare(runs, ['moe', 'dense'], str(tmp_path / 'out'))
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='1 names for 2 runs'):
    plot.compare(runs, ['moe'])


def test_one_run_writes_its_pngs(tmp_path):
  paths = plot.plot(_run(tmp_path / 'a', 0.1))
  assert [p.rsplit('/', 1)[1] for p in paths] == ['loss.png', 'expert_load.png', 'dropped.png']
