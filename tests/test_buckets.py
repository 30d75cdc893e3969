"""Sequence-length buckets: one compiled step per bucket, reused; the tokens per step fixed;
the bucket of a step a function of (seed, step); bad buckets stopped before compiling."""
import json

import pytest

from moejax.errors import ConfigError
from moejax.validation import validate
from moejax.data import buckets
from moejax.train import loop
from moejax.train.plan import Plan
from tests.helpers import small_config


def test_each_bucket_compiles_once_and_steps_reuse_it(tmp_path, monkeypatch):
  compiled = []
  original = Plan.train_step
  monkeypatch.setattr(Plan, 'train_step',
                      lambda self: compiled.append(self.layout.seq_len) or original(self))
  config = small_config(2, 1, **{'data.num_micro_batches': 2, 'data.buckets': '16,32'})
  config.update(dict(num_steps=8, log_every=1, checkpoint_every=0))
  loop.train(config, str(tmp_path))
  assert sorted(compiled) == [16, 32]
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  lengths = [r['seq_len'] for r in records]
  assert set(lengths) == {16, 32}
  assert lengths == [(16, 32)[buckets.choose(config.seed, s, 2)] for s in range(8)]


def test_a_bucket_must_divide_the_tokens_and_fit_the_mesh():
  with pytest.raises(ConfigError, match='24 does not divide'):
    validate(small_config(1, 1, **{'data.buckets': '16,24'}), 16)
  with pytest.raises(ConfigError, match='bucket 24 .*routing groups per sequence'):
    validate(small_config(2, 1, **{'data.buckets': '24,48', 'data.seq_len': 48,
                                   'model.max_len': 48}), 16)
  with pytest.raises(ConfigError, match='expected comma-separated'):
    validate(small_config(1, 1, **{'data.buckets': '16;32'}), 16)
