"""Every mesh gives the 1x1 mesh's loss, aux losses and gradients (float32, dropout off)."""
import functools

import numpy as np
import pytest

from moejax.model.params import from_stages

from tests.helpers import assert_trees_close, loss_and_grads, small_config, train_steps

pytestmark = pytest.mark.mesh


@functools.lru_cache(maxsize=None)
def reference(num_blocks: int, top_k: int, capacity_factor: float):
  return loss_and_grads(small_config(1, 1, **{
      'model.num_blocks': num_blocks, 'moe.top_k': top_k, 'moe.capacity_factor': capacity_factor}))


def check(tp, pp, repeats=1, top_k=1, capacity_factor=1.1):
  config = small_config(tp, pp, repeats, **{'moe.top_k': top_k,
                                            'moe.capacity_factor': capacity_factor})
  loss, metrics, grads = loss_and_grads(config)
  ref_loss, ref_metrics, ref_grads = reference(config.model.num_blocks, top_k, capacity_factor)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for key in ('ce', 'aux_loss', 'z_loss', 'dropped_frac'):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(metrics['expert_load'], ref_metrics['expert_load'])
  assert_trees_close(grads, ref_grads, rtol=1e-5)
  return metrics


@pytest.mark.parametrize('tp', [4])     # tp=2 is covered by the pipeline meshes below
@pytest.mark.parametrize('top_k', [1, 2])
@pytest.mark.parametrize('capacity_factor', [1.1, 8.0])
def test_tensor_and_expert_parallel_match_1x1(tp, top_k, capacity_factor):
  metrics = check(tp, 1, top_k=top_k, capacity_factor=capacity_factor)
  if capacity_factor == 1.1:
    assert metrics['dropped_frac'] > 0.02   # the case with dropped tokens really drops some
  else:
    assert metrics['dropped_frac'] == 0.0


@pytest.mark.parametrize('tp,pp,repeats', [
    (1, 4, 1), pytest.param(2, 2, 1, marks=pytest.mark.quick), (4, 4, 1), (1, 16, 1), (1, 2, 2),
    (4, 4, 2), (2, 8, 2)])
def test_pipeline_meshes_match_1x1(tp, pp, repeats):
  check(tp, pp, repeats)


def test_unrolled_layers_on_2x2_match_the_1x1_scan():
  """pipeline.unroll_layers (the full configs' default) computes what the scan does."""
  config = small_config(2, 2, **{'pipeline.unroll_layers': True})
  loss, _, grads = loss_and_grads(config)
  ref_loss, _, ref_grads = reference(config.model.num_blocks, 1, 1.1)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-5)


def test_save_collectives_remat_policy_matches_1x1():
  config = small_config(2, 2, **{'pipeline.remat_policy': 'save_collectives'})
  loss, _, grads = loss_and_grads(config)
  ref_loss, _, ref_grads = reference(config.model.num_blocks, 1, 1.1)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-5)


DROPOUT = {'moe.dropout': 0.1, 'data.micro_batch_size': 4, 'data.num_micro_batches': 8}


@functools.lru_cache(maxsize=None)
def dropout_reference():
  return loss_and_grads(small_config(1, 1, **DROPOUT))


@pytest.mark.parametrize('tp,pp,dp,folded', [
    (4, 4, 1, False), (2, 2, 4, True)])
def test_expert_dropout_is_mesh_independent(tp, pp, dp, folded):
  """Dropout masks follow (seed, step, micro-batch, block, token, slot, unit), not the device."""
  config = small_config(tp, pp, dp=dp, **DROPOUT, **{'mesh.experts_over_dp': folded})
  loss, metrics, grads = loss_and_grads(config)
  ref_loss, ref_metrics, ref_grads = dropout_reference()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['ce'], ref_metrics['ce'], rtol=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-5)


def test_expert_dropout_changes_the_loss():
  """The dropout test above can fail: with dropout off the expert gradients differ."""
  _, _, grads = loss_and_grads(small_config(1, 1, **{**DROPOUT, 'moe.dropout': 0.0}))
  with pytest.raises(AssertionError):
    assert_trees_close(grads['blocks']['moe'], dropout_reference()[2]['blocks']['moe'], rtol=1e-2)


BIAS = {'moe.bias_update_rate': 0.01, 'data.micro_batch_size': 4, 'data.num_micro_batches': 8}
BIAS_CASES = {'sign': {},   # the relative rule with routing groups of a whole micro-batch:
              'relative': {'moe.bias_update_rule': 'relative', 'moe.group_size': 128},
              # ... and with in-group balancing: the bias learns from the unbalanced choices
              'sinkhorn': {'moe.bias_update_rule': 'relative', 'moe.group_size': 128,
                           'moe.sinkhorn_iters': 20}}


def _bias_after_3_steps(config):
  state, losses = train_steps(config, 3)
  return np.asarray(from_stages(state.params['blocks'])['moe']['select_bias']), losses


@functools.lru_cache(maxsize=None)
def bias_reference(case: str):
  return _bias_after_3_steps(small_config(1, 1, **BIAS, **BIAS_CASES[case]))


@pytest.mark.parametrize('case,tp,pp,dp,folded', [
    ('sign', 4, 4, 1, False), ('relative', 1, 2, 4, True), ('sinkhorn', 2, 2, 4, True)])
def test_bias_balancing_is_mesh_independent(case, tp, pp, dp, folded):
  """Three steps with aux-loss-free balancing: the same losses and exactly the same biases."""
  bias, loss = _bias_after_3_steps(small_config(tp, pp, dp=dp, **BIAS, **BIAS_CASES[case],
                                                **{'mesh.experts_over_dp': folded}))
  ref_bias, ref_loss = bias_reference(case)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_array_equal(bias, ref_bias)
  assert np.abs(ref_bias).max() > 0                         # the biases really moved


def test_bias_learns_from_the_routers_own_choices_under_sinkhorn():
  """With in-group balancing the bias moves by the loads the biased scores choose without the
  offsets (what inference routes by), by the relative rule's formula, not by the balanced loads."""
  from moejax.data.source import global_batch
  from moejax.train import loop
  from moejax.train.plan import Plan
  plan = Plan(small_config(1, 1, **BIAS, **BIAS_CASES['sinkhorn']))
  state, source = plan.create_state(), loop.make_source(plan)
  state, metrics = plan.train_step()(state, global_batch(source, 0, plan.batch_sharding))
  bias = np.asarray(from_stages(state.params['blocks'])['moe']['select_bias'])   # [NB, E]
  rule = lambda load: 0.01 * np.clip((load.mean(-1, keepdims=True) - load)
                                     / load.mean(-1, keepdims=True), -1, 1)
  preferred = np.asarray(metrics['expert_preferred'], np.float64)
  np.testing.assert_allclose(bias, rule(preferred), rtol=1e-5, atol=1e-7)
  assigned = np.asarray(metrics['expert_assigned'], np.float64)
  assert np.abs(rule(assigned) - rule(preferred)).max() > 1e-3   # the two really differ


SEQUENCE_GROUPS = {'moe.group_size': 32}    # one routing group per sequence: spans the tp shards
BATCH_GROUPS = {'moe.group_size': 128}      # one group per micro-batch of 4 sequences
GROUPS = {'sequence': SEQUENCE_GROUPS, 'batch': BATCH_GROUPS}


@functools.lru_cache(maxsize=None)
def group_reference(groups: str, top_k: int, dispatch: str = 'capacity', dropout: float = 0.0,
                    sinkhorn_iters: int = 0):
  return loss_and_grads(small_config(1, 1, **{**GROUPS[groups], **DROPOUT,
      'moe.top_k': top_k, 'moe.dispatch': dispatch, 'moe.dropout': dropout,
      'moe.sinkhorn_iters': sinkhorn_iters}))


@pytest.mark.parametrize('groups,tp,pp,dp,folded,top_k', [
    ('sequence', 4, 1, 1, False, 2), ('sequence', 4, 4, 1, False, 1),
    ('sequence', 2, 2, 4, True, 2),
    ('batch', 2, 2, 4, True, 1), ('batch', 1, 4, 4, True, 2),
    ('batch', 1, 2, 2, False, 1)])
def test_groups_spanning_shards_match_1x1(groups, tp, pp, dp, folded, top_k):
  """A group of a whole sequence, or of a whole micro-batch, split over tp and dp shards drops
  the same tokens as on one device: each part's claims queue after the earlier parts' (drops
  included, loads equal exactly)."""
  config = small_config(tp, pp, dp=dp, **{**GROUPS[groups], **DROPOUT,
      'moe.top_k': top_k, 'moe.dropout': 0.0, 'mesh.experts_over_dp': folded})
  loss, metrics, grads = loss_and_grads(config)
  ref_loss, ref_metrics, ref_grads = group_reference(groups, top_k)
  assert ref_metrics['dropped_frac'] > 0.02
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for key in ('ce', 'aux_loss', 'z_loss', 'dropped_frac'):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(metrics['expert_load'], ref_metrics['expert_load'])
  assert_trees_close(grads, ref_grads, rtol=1e-5)


def test_larger_groups_drop_other_tokens():
  """The tests above can fail: a micro-batch group keeps other tokens than sequence groups."""
  _, batch, _ = group_reference('batch', 1)
  _, sequence, _ = group_reference('sequence', 1)
  assert not np.array_equal(batch['expert_load'], sequence['expert_load'])


@pytest.mark.parametrize('groups,dispatch', [('sequence', 'capacity'), ('batch', 'dropless')])
def test_dropout_of_groups_spanning_shards_is_mesh_independent(groups, dispatch):
  config = small_config(4, 2, dp=2, **{**GROUPS[groups], **DROPOUT,
      'moe.top_k': 2, 'moe.dispatch': dispatch, 'moe.dropout': 0.1})
  loss, metrics, grads = loss_and_grads(config)
  ref_loss, _, ref_grads = group_reference(groups, 2, dispatch, 0.1)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-5)


@pytest.mark.parametrize('groups,tp,pp,dp,folded', [
    ('sequence', 4, 4, 1, False), ('batch', 2, 2, 4, True)])
def test_sinkhorn_balancing_of_groups_spanning_shards_matches_1x1(groups, tp, pp, dp, folded):
  """In-group balancing sums each Sinkhorn iteration over the group's parts on every shard: the
  same experts are chosen as on one device (loads equal exactly)."""
  config = small_config(tp, pp, dp=dp, **{**GROUPS[groups], **DROPOUT, 'moe.top_k': 1,
      'moe.dropout': 0.0, 'moe.sinkhorn_iters': 20, 'mesh.experts_over_dp': folded})
  loss, metrics, grads = loss_and_grads(config)
  ref_loss, ref_metrics, ref_grads = group_reference(groups, 1, sinkhorn_iters=20)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for key in ('ce', 'aux_loss', 'dropped_frac', 'rerouted_frac'):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  for key in ('expert_load', 'expert_assigned', 'expert_preferred'):
    np.testing.assert_array_equal(metrics[key], ref_metrics[key], err_msg=key)
  assert_trees_close(grads, ref_grads, rtol=1e-5)


def test_sinkhorn_balances_the_choices():
  """The test above can fail: balancing changes the choices, toward equal loads."""
  _, plain, _ = group_reference('batch', 1)
  _, balanced, _ = group_reference('batch', 1, sinkhorn_iters=20)
  # The first layer sees the same inputs either way: its scores prefer what plain routing chose.
  np.testing.assert_array_equal(balanced['expert_preferred'][0], plain['expert_assigned'][0])
  peak = lambda a: np.max(a / a.mean(-1, keepdims=True))
  assert peak(balanced['expert_assigned']) < peak(plain['expert_assigned']) - 0.2
  assert plain['rerouted_frac'] == 0.0 < balanced['rerouted_frac'] < 0.5


@pytest.mark.parametrize('tp,pp,kv_heads,qk_norm', [(4, 4, 2, 'head'), (2, 2, 2, 'full')])
def test_open_family_blocks_match_1x1(tp, pp, kv_heads, qk_norm):
  """Grouped-query heads (replicated over tp=4; split over tp=2), QK-norm (per head; over the
  whole width, whose statistics cross the tp shards), RMSNorm, SwiGLU, top-k renormalisation:
  loss and gradients of every parameter equal the 1x1 mesh's."""
  arch = {'model.norm': 'rmsnorm', 'model.num_kv_heads': kv_heads, 'model.qk_norm': qk_norm,
          'model.positions': 'rope', 'moe.ffn': 'swiglu', 'moe.expert_bias': False,
          'moe.top_k': 2, 'moe.normalize_gates': True, 'moe.normalize_gates_over': 'top_k'}
  loss, metrics, grads = loss_and_grads(small_config(tp, pp, **arch))
  ref_loss, ref_metrics, ref_grads = loss_and_grads(small_config(1, 1, **arch))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_array_equal(metrics['expert_load'], ref_metrics['expert_load'])
  assert metrics['dropped_frac'] > 0.02
  assert_trees_close(grads, ref_grads, rtol=1e-5)


BLOCK_OPTIONS = {
    # GPT-OSS: sinks (split over tp with the heads), windows in every third block (a period
    # that no stage's length divides: a wrong block index shows), YaRN,
    # biases everywhere, the clamped SwiGLU with a binding clamp.
    'gpt_oss': {'model.norm': 'rmsnorm', 'model.num_kv_heads': 2, 'model.positions': 'rope',
                'model.attn_sinks': True, 'model.sliding_window': 5, 'model.window_pattern': 'SFF',
                'model.rope_scaling': 'yarn', 'model.rope_factor': 4.0,
                'model.rope_original_len': 8, 'moe.ffn': 'clamped_swiglu',
                'moe.swiglu_limit': 0.5, 'moe.router_bias': True, 'moe.top_k': 2,
                'moe.normalize_gates': True, 'moe.normalize_gates_over': 'top_k'},
    # DeepSeek-V3: two dense blocks before the pipeline, MLA, its router (sigmoid affinities, a
    # selection bias, group-limited choices, scaled gates), an ungated shared expert, two
    # multi-token-prediction depths after the pipeline.
    'deepseek_v3': {'model.dense_blocks': 2, 'model.mtp_depth': 2, 'model.dense_d_ff': 40,
                    'model.kv_lora_rank': 24,
                    'model.q_lora_rank': 16, 'model.rope_head_dim': 8, 'model.v_head_dim': 12,
                    'model.norm': 'rmsnorm', 'model.positions': 'rope', 'model.attn_bias': False,
                    'moe.ffn': 'swiglu', 'moe.expert_bias': False, 'moe.router_score': 'sigmoid',
                    'moe.selection_bias': True, 'moe.expert_groups': 4, 'moe.top_groups': 2,
                    'moe.routed_scale': 2.5, 'moe.normalize_gates': True,
                    'moe.normalize_gates_over': 'top_k', 'moe.shared_d_ff': 16, 'moe.top_k': 2},
    # Qwen2-MoE: a gated shared expert (its hidden units split over tp), q/k/v biases only; a
    # dense first layer and a dense layer inside each pipelined block (decoder_sparse_step 2).
    'qwen2_moe': {'model.norm': 'rmsnorm', 'model.positions': 'rope', 'model.attn_out_bias': False,
                  'moe.ffn': 'swiglu', 'moe.expert_bias': False, 'moe.shared_d_ff': 32,
                  'moe.shared_gate': True, 'moe.top_k': 2, 'model.dense_blocks': 1,
                  'model.dense_per_block': 1, 'model.dense_d_ff': 40},
}


@pytest.mark.parametrize('family', sorted(BLOCK_OPTIONS))
def test_new_family_blocks_match_1x1(family):
  """The GPT-OSS, DeepSeek-V3 and Qwen2-MoE block options on a 4x4 mesh (windows and sinks on split heads, a
  shared expert split over tp, the pipeline's block index choosing the window): loss and the
  gradient of every parameter equal the 1x1 mesh's."""
  loss, metrics, grads = loss_and_grads(small_config(4, 4, **BLOCK_OPTIONS[family]))
  ref_loss, ref_metrics, ref_grads = loss_and_grads(small_config(1, 1, **BLOCK_OPTIONS[family]))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_array_equal(metrics['expert_load'], ref_metrics['expert_load'])
  assert_trees_close(grads, ref_grads, rtol=1e-5)


@pytest.mark.parametrize('tp,pp,unroll', [(1, 1, False), (4, 4, False), (2, 2, True)])
def test_experts_cast_once_per_step_accumulate_their_gradients_in_float32(tp, pp, unroll,
                                                                         monkeypatch):
  """bfloat16: the pipeline hands its stages the experts' matrices cast once per step
  (transformer.cast_once, as moejax.precision.Cast): the loss and every other gradient are
  bit for bit those of casting them at every tick; the lowered step converts each expert
  matrix once, as the whole stage stack, or with unrolled layers as one array per layer (no
  tick slices a layer out of the stack), and computes their weight gradients in float32 (dots
  of bf16 operands with f32 [E, D, F] results), so their gradients differ from the per-tick
  cast's (each micro-batch's rounded to bf16) by bf16 rounding only."""
  import re
  import jax
  from moejax.model import transformer
  from moejax.train import check, step as step_lib
  from moejax.train.plan import Plan
  config = small_config(tp, pp, **{'model.dtype': 'bfloat16', 'pipeline.unroll_layers': unroll})
  plan = Plan(config)
  assert transformer.cast_once(plan.model, plan.layout)['moe']['w1'] == 'bfloat16'
  lowered = lambda: Plan(config).train_step().lower(plan.abstract_state,
                                                    plan.batch_abstract()).as_text()
  converts = lambda text: re.findall(   # f32 -> bf16 converts of expert matrices ([.., 32, 48])
      r'stablehlo.convert %\S+ : \(tensor<([\dx]*)x(?:32x48|48x32)xf32>\) -> tensor<[^>]*bf16>',
      text)
  f32_grads = lambda text: re.findall(  # bf16 x bf16 -> f32 [E_, D, F] dots: weight gradients
      r'stablehlo.dot_general[^\n]*\(tensor<[^>]*bf16>, tensor<[^>]*bf16>\) -> '
      r'tensor<\d+x(?:32x48|48x32)xf32>', text)
  text = lowered()
  once, dw, (loss, _, grads) = converts(text), f32_grads(text), check.loss_and_grads(config)
  monkeypatch.setattr(transformer, 'cast_once', lambda cfg, lay: None)
  step_lib.train_step_fn.cache_clear()        # a step function traced afresh, with the patch
  text = lowered()
  per_tick, dw_tick, (loss_tick, _, grads_tick) = (converts(text), f32_grads(text),
                                                   check.loss_and_grads(config))  # not memoised
  layers = 8 // pp
  assert sorted(once) == ([f'{pp}x1x8'] * 2 * layers if unroll   # [S, R, E] once per layer
                          else [f'{pp}x1x{layers}x8'] * 2)          # [S, R, L, E] once each
  per_layer = layers if unroll else 1                              # fwd + recompute
  assert len(per_tick) == 4 * per_layer and all(s == f'{8 // tp}' for s in per_tick)
  assert len(dw) == 2 * per_layer and not dw_tick                  # w1, w2 per layer
  assert loss == loss_tick
  for path, a in jax.tree_util.tree_flatten_with_path(grads)[0]:
    b = _at(grads_tick, path)
    if jax.tree_util.keystr(path) in ("['blocks']['moe']['w1']", "['blocks']['moe']['w2']"):
      assert not np.array_equal(a, b)
      assert np.linalg.norm(a - b) < 1e-2 * np.linalg.norm(b)
    else:
      np.testing.assert_array_equal(a, b)


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree
