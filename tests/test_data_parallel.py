"""Data parallelism: dp x tp x pp meshes give the 1x1 losses and gradients; ZeRO-1 trains alike."""
import functools
import json

import jax
import numpy as np
import pytest

from moejax.model import params as params_lib
from moejax.train import loop
from moejax.train.plan import Plan
from tests.helpers import (assert_trees_close, loss_and_grads, small_config, train_steps,
                           without_key_bias)

pytestmark = pytest.mark.mesh

BATCH = {'data.micro_batch_size': 4, 'data.num_micro_batches': 8}


@functools.lru_cache(maxsize=None)
def reference():
  return loss_and_grads(small_config(1, 1, **BATCH))


@pytest.mark.parametrize('dp,tp,pp,folded,unroll', [
    (2, 2, 4, False, False), (4, 4, 1, False, False), (2, 2, 4, True, False),
    (4, 2, 2, True, False), (2, 2, 2, False, True)])
def test_data_parallel_meshes_match_1x1(dp, tp, pp, folded, unroll):
  config = small_config(tp, pp, dp=dp, **BATCH, **{'mesh.experts_over_dp': folded,
                                                   'pipeline.unroll_layers': unroll})
  loss, metrics, grads = loss_and_grads(config)
  ref_loss, ref_metrics, ref_grads = reference()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for key in ('ce', 'aux_loss', 'z_loss', 'dropped_frac'):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(metrics['expert_load'], ref_metrics['expert_load'])
  assert_trees_close(grads, ref_grads, rtol=1e-5)


@pytest.mark.quick
def test_folded_experts_are_split_over_dp_and_tp():
  config = small_config(2, 4, dp=2, **BATCH, **{'mesh.experts_over_dp': True})
  plan = Plan(config)
  w1 = plan.param_sharding['blocks']['moe']['w1']
  w1_shape = plan.abstract_state.params['blocks']['moe']['w1'].shape
  assert w1.shard_shape(w1_shape)[3] == plan.model.num_experts // 4   # [S, R, L, E, D, F]


def test_zero1_sharded_optimizer_trains_like_1x1():
  config = small_config(2, 4, dp=2, **BATCH, **{'mesh.shard_optimizer': True})
  state, losses = train_steps(config, 3)
  ref_state, ref_losses = train_steps(small_config(1, 1, **BATCH), 3)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  canonical = lambda s: without_key_bias(
      jax.device_get(params_lib.tree_from_stages(s.params)))
  assert_trees_close(canonical(state), canonical(ref_state), rtol=1e-5)
  # The Adam moments of the attention weights really are split over dp as well.
  mu = state.opt_state[1][0].mu['blocks']['attn']['wqkv']   # [S, R, L, 3, D, N, H]
  assert 'dp' in str(mu.sharding.spec), mu.sharding.spec


def test_zero1_checkpoint_resumes_exactly(tmp_path):
  def config(steps):
    c = small_config(2, 4, dp=2, **BATCH, **{'mesh.shard_optimizer': True})
    c.update(num_steps=steps, log_every=1, checkpoint_every=0)
    return c
  loop.train(config(3), str(tmp_path / 'straight'))
  loop.train(config(2), str(tmp_path / 'resumed'))
  loop.train(config(3), str(tmp_path / 'resumed'))
  read = lambda d: [json.loads(l)['loss'] for l in open(tmp_path / d / 'metrics.jsonl')]
  assert read('resumed') == read('straight')
