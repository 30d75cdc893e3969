"""Measured / predicted time per op class on a real card, kept in the repository
(calibration.json: card, date, commit, command and the ratios) and applied by the time model
(moejax.perf.opclass.predict) when predicting for that card. Made from a gpu_bench run:
`python -m moejax.perf.calibration GPU_BENCH_DIR [CARD [STEPS_TRACED]]` prints the ratios of its programs' kernels
summed over every program measured."""
from __future__ import annotations

import functools
import json
import os
import sys

_PATH = os.path.join(os.path.dirname(__file__), 'calibration.json')


@functools.cache
def _table() -> dict:
  with open(_PATH) as f:
    return json.load(f)


def ratios(card: str) -> dict[str, float]:
  """Measured / predicted seconds per op class for `card` (the H100 shares the H200's
  kernels and rates but its memory: it takes the H200's ratios); {} when never measured."""
  cards = _table()['cards']
  entry = cards.get(card) or cards.get({'h100': 'h200'}.get(card, ''))
  return dict(entry['ratios']) if entry else {}


def source(card: str) -> str:
  """Where `card`'s ratios come from (card, date, commit), or '' when there are none."""
  cards = _table()['cards']
  entry = cards.get(card) or cards.get({'h100': 'h200'}.get(card, ''))
  return f"{entry['device']}, {entry['date']}, commit {entry['commit']}" if entry else ''


def fit(bench_dir: str, card: str, steps_traced: int = 1) -> dict[str, float]:
  """Ratios from a gpu_bench output directory (hlo.tar.gz and traces.tar.gz) whose traces
  each hold `steps_traced` steps."""
  import glob
  import tarfile
  import tempfile
  from moejax import targets
  from moejax.perf import opclass, profile
  work = tempfile.mkdtemp()
  for name in ('hlo.tar.gz', 'traces.tar.gz'):
    with tarfile.open(os.path.join(bench_dir, name)) as tar:
      tar.extractall(work, filter='data')
  measured, predicted = {}, {}
  for hlo_path in glob.glob(os.path.join(work, '*.hlo')):
    program = os.path.basename(hlo_path)[:-4]
    trace = profile.trace_file(os.path.join(work, program))
    if trace is None:
      continue
    with open(hlo_path) as f:
      text = f.read()
    for c, s in opclass.measured_by_class(profile.device_events(trace), text,
                                               fine=True).items():
      measured[c] = measured.get(c, 0.0) + s / steps_traced
    for c, s in opclass.predict(text, targets.rates(card),
                                  fine=True)['predicted_s_by_class'].items():
      predicted[c] = predicted.get(c, 0.0) + s
  return {c: round(measured.get(c, 0.0) / s, 3) for c, s in sorted(predicted.items()) if s > 0}


if __name__ == '__main__':
  print(json.dumps(fit(sys.argv[1], *sys.argv[2:3], *map(int, sys.argv[3:4])), indent=1))
