"""Packed documents: the loss of a packed batch is the sum of each document's loss alone (1x1
and 4x4); padding takes no expert capacity and no part in the routing statistics; the packed
token source is a pure function of (seed, step) and serves every document once per epoch."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.cli.prepare import prepare
from moejax.data import packing
from moejax.data.tokens import TokenSource
from moejax.model import params as params_lib, routing, transformer
from moejax.train import loop
from moejax.train.plan import Plan
from tests.helpers import perturbed_params, small_config

ROOMY = {'moe.eval_capacity_factor': 8.0}     # nothing drops: a token's experts are its own


def test_first_fit_packing_places_every_token_once():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 3 * 33, 40)
  rows = packing.pack(rng.permutation(40), lengths, 33)
  covered = {d: np.zeros(n, int) for d, n in enumerate(lengths)}
  for row in rows:
    assert sum(n for _, _, n in row) <= 33
    for doc, start, n in row:
      covered[doc][start:start + n] += 1
      if lengths[doc] <= 33:
        assert (start, n) == (0, lengths[doc])           # short documents stay whole
  assert all((c == 1).all() for c in covered.values())
  assert len(rows) < 1.3 * np.ceil(lengths.sum() / 33)    # first-fit leaves little padding


def _ce_sum(plan, params, batch):
  fn = plan.jit(lambda p, b: transformer.loss_fn(p, b, jax.random.key(0), cfg=plan.model,
                                                 lay=plan.layout, train=False)[1])
  metrics = fn(params, jnp.asarray(batch))
  return float(metrics['ce']) * float(metrics['targets']), int(metrics['targets'])


@functools.lru_cache(maxsize=None)
def _documents(row_len: int, rows: int):
  """Documents of random tokens, lengths 1...3x the row, as many as fill `rows` packed rows."""
  rng = np.random.default_rng(1)
  docs = []
  while True:
    docs.append(rng.integers(0, 256, rng.integers(1, 3 * row_len)))
    packed = packing.pack(range(len(docs)), [len(d) for d in docs], row_len)
    if len(packed) > rows:
      docs.pop()
      return docs, packing.pack(range(len(docs)), [len(d) for d in docs], row_len)


@pytest.mark.parametrize('tp,pp', [(1, 1), (4, 4)])
def test_packed_loss_is_the_sum_of_each_documents_loss_alone(tp, pp):
  config = small_config(tp, pp, **ROOMY, **{'data.num_micro_batches': 4,
                                            'data.micro_batch_size': 2})
  plan = Plan(config)
  params = jax.device_put(params_lib.tree_to_stages(perturbed_params(config), plan.layout),
                          plan.param_sharding)
  m, b, row_len = 4, 2, config.data.seq_len + 1
  docs, rows = _documents(row_len, m * b)
  read = lambda d, s, n: docs[d][s:s + n]
  batch = np.zeros((m * b, 3, row_len), np.int32)
  for i, row in enumerate(rows):
    batch[i] = packing.row_arrays(row, read, row_len)
  packed, targets = _ce_sum(plan, params, batch.reshape(m, b, 3, row_len))
  alone, alone_targets = 0.0, 0
  for row in rows:
    for piece in row:
      single = np.zeros((m, b, 3, row_len), np.int32)
      single[0, 0] = packing.row_arrays([piece], read, row_len)
      ce, n = _ce_sum(plan, params, single)
      alone, alone_targets = alone + ce, alone_targets + n
  assert targets == alone_targets == sum(len(d) - 1 for d in docs) - sum(
      len(r) for r in rows) + len(docs)                   # every piece predicts its length - 1
  np.testing.assert_allclose(packed, alone, rtol=1e-5)


def test_padding_takes_no_capacity_and_no_part_in_the_stats():
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], (1, 6, 16))
  w = jax.random.normal(k[1], (16, 4))
  padded = jnp.concatenate([x, jnp.broadcast_to(x[:, :1], (1, 10, 16))], axis=1)  # [1, 16, D]
  valid = jnp.arange(16)[None] < 6
  r, stats = routing.route(padded, w, 1, capacity=2, valid=valid)
  r0, stats0 = routing.route(x, w, 1, capacity=2)
  np.testing.assert_array_equal(r.keep[:, :, :6], r0.keep)
  assert not np.asarray(r.keep[:, :, 6:]).any()
  for a, e in zip(stats, stats0):
    np.testing.assert_allclose(a, e, rtol=1e-6)


def test_packed_source_is_a_function_of_seed_and_step(tmp_path):
  text = tmp_path / 'docs.txt'
  text.write_text('\n\n'.join(f'document {i} ' + 'x' * (i * 7 % 90) for i in range(60)))
  prepare([str(text)], str(tmp_path / 'data'), val_fraction=0.1, doc_separator='\n\n')
  source = lambda: TokenSource(str(tmp_path / 'data'), 2, 2, 32, seed=3, vocab_size=257,
                               pack=True)
  a, b = source(), source()
  np.testing.assert_array_equal(a.batch(5), b.batch(5))
  np.testing.assert_array_equal(a.batch(5)[:, 1:], b.batch(5, (slice(None), slice(1, 2))))
  batch = a.batch(0)
  assert batch.shape == (2, 2, 3, 33)
  tokens, segments, positions = batch[:, :, 0], batch[:, :, 1], batch[:, :, 2]
  assert (positions[segments == 0] == 0).all() and (tokens[segments == 0] == 0).all()
  # One epoch of rows serves every train document exactly once.
  epoch = a._packed_epoch(0)
  seen = sorted((d, s) for row in epoch for d, s, _ in row)
  assert len(seen) == len(set(seen))
  assert {d for d, _ in seen} == set(range(len(a.bounds['train']) - 1))


def test_a_packed_run_resumes_exactly(tmp_path):
  text = tmp_path / 'docs.txt'
  text.write_text('\n\n'.join(f'document {i} ' + 'ab' * (i * 5 % 40) for i in range(80)))
  prepare([str(text)], str(tmp_path / 'data'), val_fraction=0.1, doc_separator='\n\n')

  def config(steps):
    c = small_config(1, 1, **{'data.num_micro_batches': 2, 'data.source': 'tokens',
                              'data.path': str(tmp_path / 'data'), 'data.pack': True,
                              'model.vocab_size': 257})
    c.update(dict(num_steps=steps, checkpoint_every=0, log_every=1))
    return c
  loop.train(config(3), str(tmp_path / 'straight'))
  loop.train(config(2), str(tmp_path / 'resumed'))
  loop.train(config(3), str(tmp_path / 'resumed'))
  losses = lambda d: [json.loads(line)['loss'] for line in open(tmp_path / d / 'metrics.jsonl')]
  assert losses('resumed') == losses('straight')
