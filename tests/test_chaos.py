"""A two-process 4x4 run of 28 steps under 12 faults drawn from a seed (tests/chaos.py; at least
10 strike before it ends) ends in the state of an undisturbed run, bit for bit, with every step
logged once and no checkpoint lost."""
import collections

import pytest

from tests import chaos
from tests.helpers import subprocess_env
from tests.test_multiprocess import run_two

pytestmark = pytest.mark.e2e

# Room for every fault: each can let the run advance up to 3 steps (a 'step' fault waits for
# 1-3 steps, a SIGTERM saves the step it stops at), so 12 faults need up to 36; with 16 steps
# a loaded machine once finished the run before the last 3 struck (9 < 10); 28 leaves room.
STEPS, FAULTS = 28, 12
EXTRA = ['--config.checkpoint_every=2']      # on test_multiprocess's model (SMALL)


@pytest.mark.time_limit(1500)
def test_ten_faults_or_more_lose_nothing(tmp_path):
  reference, workdir = str(tmp_path / 'reference'), str(tmp_path / 'chaos')
  run_two(reference, f'--config.num_steps={STEPS}', *EXTRA)
  records = chaos.chaos(workdir, STEPS, FAULTS, seed=0, extra=EXTRA, env=subprocess_env())
  struck = [r for r in records if r['outcome'].startswith('struck')]
  kinds = collections.Counter((r['fault']['when'], r['fault']['signal']) for r in struck)
  print(kinds)
  assert len(struck) >= 10, records         # a run may end before a late fault strikes
  assert {w for w, _ in kinds} == set(chaos.WHEN), kinds
  assert {tuple(r['fault']['victims']) for r in struck} >= {(0,), (1,)}, records
  for r in struck:   # a SIGTERM stops both cleanly; a SIGKILL ends the survivor with one line
    if r['fault']['signal'] == 15:
      assert r['exit'] == [0, 0] or r['fault']['when'] == 'compile', r
    elif len(r['fault']['victims']) == 1:
      survivor = 1 - r['fault']['victims'][0]
      assert r['exit'][survivor] != 0 and r['errors'][survivor].startswith('error:'), r
  chaos.check(workdir, reference, STEPS)
