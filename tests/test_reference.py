"""The 1x1 model (and one 4x4 mesh) against the independent NumPy reference (float32 vs float64).

tests/numpy_reference.py shares no code with moejax; a shared mistake cannot pass here.
"""
import math

import numpy as np
import pytest

from moejax.data.synthetic import SyntheticSource
from tests import numpy_reference
from tests.helpers import model_forward, perturbed_params, small_config

pytestmark = pytest.mark.mesh


def _case(tp=1, pp=1, **overrides):
  config = small_config(tp, pp, **{'data.num_micro_batches': 4, 'data.seq_len': 16,
                                   'model.num_blocks': 4, **overrides})
  params = perturbed_params(config)
  c = config
  tokens = SyntheticSource('random', c.model.vocab_size, c.data.num_micro_batches,
                           c.data.micro_batch_size, c.data.seq_len, 0).batch(0)
  return config, params, tokens


def reference(config, params, tokens, **kwargs):
  c = config
  capacity = math.ceil(c.moe.capacity_factor * c.moe.group_size * c.moe.top_k
                       / c.moe.num_experts)                  # ceil(cf x group tokens x k / E)
  m = c.model
  over = c.moe.get('normalize_gates_over', 'kept')
  arch = dict(rope_base=m.get('rope_base', 1e4) if m.positions == 'rope' else None,
              qk_norm=m.get('qk_norm', 'none'), eps=m.get('norm_eps', 1e-5))
  if m.get('rope_scaling', 'none') == 'yarn':
    arch['yarn'] = dict(factor=m.rope_factor, original_len=m.rope_original_len,
                        beta_fast=m.get('rope_beta_fast', 32.0),
                        beta_slow=m.get('rope_beta_slow', 1.0), truncate=m.get('rope_truncate', True))
  if m.get('kv_lora_rank', 0):   # 1/sqrt of the query's width, times YaRN's mscale squared
    arch['scale'] = (m.head_dim + m.rope_head_dim) ** -0.5
    if m.get('softmax_mscale', 0):
      arch['scale'] *= (0.1 * m.softmax_mscale * math.log(m.rope_factor) + 1) ** 2
  if m.get('sliding_window', 0):
    pattern = m.get('window_pattern', '') or 'S'
    arch.update(window=m.sliding_window, windowed=[
        b for b in range(m.num_blocks) if pattern[b % len(pattern)] == 'S'])
  if m.get('mtp_depth', 0):
    arch['mtp_weight'] = m.mtp_loss_weight
  if c.moe.get('router_score', 'softmax') == 'sigmoid':
    arch['deepseek'] = dict(groups=c.moe.expert_groups, top_groups=c.moe.top_groups,
                            scale=c.moe.routed_scale)
  if c.moe.get('ffn', 'gelu') == 'clamped_swiglu':
    arch['clamp'] = (c.moe.get('swiglu_limit', 7.0), c.moe.get('swiglu_alpha', 1.702))
  args = dict(vocab_size=c.model.vocab_size, group_size=c.moe.group_size, top_k=c.moe.top_k,
              capacity=capacity, aux_weight=c.moe.aux_loss_weight,
              z_weight=c.moe.z_loss_weight, gelu_form=c.moe.gelu,
              normalize_gates=over if c.moe.normalize_gates else False,
              sinkhorn_iters=c.moe.sinkhorn_iters, arch=arch)
  return numpy_reference.forward(params, np.asarray(tokens), **{**args, **kwargs})


def assert_matches(config, params, tokens, rtol=1e-5, **ref_kwargs):
  loss, metrics, logits = model_forward(config, params, tokens)
  ref_loss, ref_logits, ref_stats = reference(config, params, tokens, **ref_kwargs)
  v = config.model.vocab_size
  err = np.abs(logits[..., :v] - ref_logits).max() / np.abs(ref_logits).max()
  assert err <= rtol, f'logits: relative error {err:.2e} > {rtol}'
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
  for key in ('ce', 'aux_loss', 'z_loss', 'dropped_frac', 'mtp_ce'):
    if key in ref_stats:
      np.testing.assert_allclose(metrics[key], ref_stats[key], rtol=rtol, atol=1e-7,
                                 err_msg=key)
  return ref_stats


@pytest.mark.parametrize('top_k,capacity_factor,normalize', [
    (1, 1.1, False), (1, 8.0, False), (2, 1.1, False), (2, 8.0, False),
    pytest.param(2, 1.1, True, marks=pytest.mark.quick)])
def test_1x1_model_equals_numpy_reference(top_k, capacity_factor, normalize):
  config, params, tokens = _case(**{'moe.top_k': top_k, 'moe.capacity_factor': capacity_factor,
                                    'moe.normalize_gates': normalize})
  stats = assert_matches(config, params, tokens)
  if capacity_factor == 1.1:
    assert stats['dropped_frac'] > 0.02     # the case with drops really drops
  else:
    assert stats['dropped_frac'] == 0.0


@pytest.mark.parametrize('top_k', [1, 2])
def test_1x1_dropless_equals_numpy_reference(top_k):
  """Dropless = the per-token reference with room for every assignment."""
  config, params, tokens = _case(**{'moe.top_k': top_k, 'moe.dispatch': 'dropless'})
  stats = assert_matches(config, params, tokens, capacity=top_k * config.moe.group_size)
  assert stats['dropped_frac'] == 0.0


def test_groups_spanning_tp_shards_equal_numpy_reference():
  """One routing group per sequence, spread over the 4 tp shards of a 4x4 mesh."""
  config, params, tokens = _case(4, 4, **{'data.seq_len': 32, 'moe.group_size': 32,
                                          'moe.top_k': 2})
  stats = assert_matches(config, params, tokens)
  assert stats['dropped_frac'] > 0.02


@pytest.mark.parametrize('tp,pp', [(1, 1), (4, 4)])
def test_groups_of_whole_sequences_equal_numpy_reference(tp, pp):
  """One routing group per micro-batch of 2 sequences (on 4x4: over 8 parts on 4 shards)."""
  config, params, tokens = _case(tp, pp, **{'data.seq_len': 32, 'data.micro_batch_size': 2,
                                            'moe.group_size': 64, 'moe.top_k': 2})
  stats = assert_matches(config, params, tokens)
  assert stats['dropped_frac'] > 0.02


@pytest.mark.parametrize('tp,pp', [(1, 1), (4, 4)])
def test_sinkhorn_balancing_equals_numpy_reference(tp, pp):
  """In-group balancing of micro-batch groups (on 4x4: 8 parts on 4 shards) against the
  reference's Sinkhorn-Knopp scaling; the aux loss counts the unbalanced choices."""
  config, params, tokens = _case(tp, pp, **{'data.seq_len': 32, 'data.micro_batch_size': 2,
                                            'moe.group_size': 64, 'moe.sinkhorn_iters': 20})
  stats = assert_matches(config, params, tokens)
  plain = reference(config, params, tokens, sinkhorn_iters=0)[2]
  assert stats['dropped_frac'] < plain['dropped_frac'] - 0.02   # balancing keeps more tokens


def test_4x4_mesh_equals_numpy_reference():
  config, params, tokens = _case(4, 4, **{'data.seq_len': 32})   # 4 groups: one per tp shard
  assert_matches(config, params, tokens)


def test_dense_limit_is_a_gpt2_block_stack():
  """One expert and ample capacity: the gate is 1 and each block is GPT-2's (biases, exact GELU)."""
  config, params, tokens = _case(**{'moe.num_experts': 1, 'moe.capacity_factor': 2.0})
  stats = assert_matches(config, params, tokens)
  assert stats['dropped_frac'] == 0.0


@pytest.mark.quick
def test_reference_sees_the_gelu_form_and_the_attention_biases():
  """The comparison can fail: the tanh GELU, or a dropped bias, is far outside the tolerance."""
  config, params, tokens = _case()
  with pytest.raises(AssertionError):
    assert_matches(config, params, tokens, gelu_form='tanh')
  no_bias = {**params, 'blocks': {**params['blocks'], 'attn': {
      k: v for k, v in params['blocks']['attn'].items() if k != 'bo'}}}
  _, _, logits = model_forward(config, params, tokens)
  _, ref_logits, _ = reference(config, no_bias, tokens)
  assert np.abs(logits[..., :config.model.vocab_size] - ref_logits).max() > 1e-3


# The open families' block options (configs/olmoe.py, qwen3_moe.py, mixtral.py), with capacity
# drops (transformers' models drop nothing, so tests/test_convert.py cannot see them).
ARCHES = {
    'olmoe': {'model.norm': 'rmsnorm', 'model.qk_norm': 'full', 'model.positions': 'rope',
              'model.attn_bias': False, 'moe.ffn': 'swiglu', 'moe.expert_bias': False},
    'qwen3': {'model.norm': 'rmsnorm', 'model.norm_eps': 1e-6, 'model.num_kv_heads': 2,
              'model.qk_norm': 'head', 'model.positions': 'rope', 'model.rope_base': 1e6,
              'model.attn_bias': False, 'moe.ffn': 'swiglu', 'moe.expert_bias': False,
              'moe.normalize_gates': True, 'moe.normalize_gates_over': 'top_k'},
    'qwen2': {'model.norm': 'rmsnorm', 'model.norm_eps': 1e-6, 'model.num_kv_heads': 2,
              'model.positions': 'rope', 'model.rope_base': 1e6, 'model.attn_out_bias': False,
              'moe.ffn': 'swiglu', 'moe.expert_bias': False, 'moe.shared_d_ff': 24,
              'moe.shared_gate': True},
    # with Qwen's dense layers: one first, one inside each block before its MoE layer
    'qwen2_dense': {'model.norm': 'rmsnorm', 'model.norm_eps': 1e-6, 'model.num_kv_heads': 2,
                    'model.positions': 'rope', 'model.rope_base': 1e6,
                    'model.attn_out_bias': False, 'moe.ffn': 'swiglu', 'moe.expert_bias': False,
                    'moe.shared_d_ff': 24, 'moe.shared_gate': True, 'model.dense_blocks': 1,
                    'model.dense_per_block': 1, 'model.dense_d_ff': 40},
    # GPT-OSS: sinks, every other block windowed (4 of 32 positions), YaRN, biases everywhere
    # (router too), the clamped SwiGLU with a limit low enough to bind.
    'gpt_oss': {'model.norm': 'rmsnorm', 'model.num_kv_heads': 2, 'model.positions': 'rope',
                'model.rope_base': 1.5e5, 'model.attn_sinks': True, 'model.sliding_window': 4,
                'model.window_pattern': 'SF', 'model.rope_scaling': 'yarn',
                'model.rope_factor': 8.0, 'model.rope_original_len': 16,
                'model.rope_truncate': False, 'moe.ffn': 'clamped_swiglu',
                'moe.swiglu_limit': 0.3, 'moe.router_bias': True, 'moe.normalize_gates': True,
                'moe.normalize_gates_over': 'top_k'},
    # DeepSeek-V3's router: sigmoid affinities, a selection bias, 4 groups of 2 experts of which
    # each token keeps the best 2, gates renormalised and scaled; an ungated shared expert.
    'deepseek_v3': {'model.norm': 'rmsnorm', 'model.positions': 'rope', 'model.attn_bias': False,
                    'moe.ffn': 'swiglu', 'moe.expert_bias': False, 'moe.router_score': 'sigmoid',
                    'moe.selection_bias': True, 'moe.expert_groups': 4, 'moe.top_groups': 2,
                    'moe.routed_scale': 2.5, 'moe.normalize_gates': True,
                    'moe.normalize_gates_over': 'top_k', 'moe.shared_d_ff': 16},
    # DeepSeek-V3's attention: MLA with a query latent (16), a key/value latent (24), 8 rotary
    # features beside 16 per head, 12-wide values, YaRN with its mscale on the softmax.
    'deepseek_v3_mla': {'model.norm': 'rmsnorm', 'model.positions': 'rope',
                        'model.attn_bias': False, 'model.kv_lora_rank': 24,
                        'model.q_lora_rank': 16, 'model.rope_head_dim': 8,
                        'model.v_head_dim': 12, 'model.rope_scaling': 'yarn',
                        'model.rope_factor': 4.0, 'model.rope_original_len': 8,
                        'model.softmax_mscale': 1.0, 'moe.ffn': 'swiglu',
                        'moe.expert_bias': False},
    # DeepSeek-V3's whole layout: two dense blocks first, then MLA blocks with its router
    'deepseek_v3_dense': {'model.norm': 'rmsnorm', 'model.positions': 'rope',
                          'model.attn_bias': False, 'model.kv_lora_rank': 24,
                          'model.q_lora_rank': 16, 'model.rope_head_dim': 8,
                          'model.v_head_dim': 12, 'model.dense_blocks': 2,
                          'model.dense_d_ff': 40, 'moe.ffn': 'swiglu', 'moe.expert_bias': False,
                          'moe.router_score': 'sigmoid', 'moe.selection_bias': True,
                          'moe.expert_groups': 4, 'moe.top_groups': 2, 'moe.routed_scale': 2.5,
                          'moe.normalize_gates': True, 'moe.normalize_gates_over': 'top_k',
                          'moe.shared_d_ff': 16},
    # with two multi-token-prediction depths (their blocks' drops and aux losses count too)
    'deepseek_v3_mtp': {'model.norm': 'rmsnorm', 'model.positions': 'rope',
                        'model.attn_bias': False, 'model.kv_lora_rank': 24,
                        'model.q_lora_rank': 16, 'model.rope_head_dim': 8,
                        'model.v_head_dim': 12, 'model.dense_blocks': 1,
                        'model.dense_d_ff': 40, 'model.mtp_depth': 2,
                        'model.mtp_loss_weight': 0.5, 'moe.ffn': 'swiglu',
                        'moe.expert_bias': False, 'moe.router_score': 'sigmoid',
                        'moe.selection_bias': True, 'moe.expert_groups': 4, 'moe.top_groups': 2,
                        'moe.routed_scale': 2.5, 'moe.normalize_gates': True,
                        'moe.normalize_gates_over': 'top_k', 'moe.shared_d_ff': 16},
    # and without the query latent
    'deepseek_v2_lite_mla': {'model.norm': 'rmsnorm', 'model.positions': 'rope',
                             'model.attn_bias': False, 'model.kv_lora_rank': 24,
                             'model.rope_head_dim': 8, 'model.v_head_dim': 12,
                             'moe.ffn': 'swiglu', 'moe.expert_bias': False},
    'mixtral_biased': {'model.norm': 'rmsnorm', 'model.num_kv_heads': 2, 'model.positions': 'rope',
                       'moe.ffn': 'swiglu', 'moe.normalize_gates': True,
                       'moe.normalize_gates_over': 'top_k'},
}


@pytest.mark.parametrize('arch', sorted(ARCHES))
@pytest.mark.parametrize('tp,pp', [(1, 1), (4, 4)])
def test_open_family_blocks_equal_numpy_reference(arch, tp, pp):
  """RMSNorm, QK-norm (whole width and per head), grouped-query heads (2 key/value heads:
  replicated over tp=4), SwiGLU with and without biases, rope base, top-k renormalisation
  before capacity, a gated shared expert (24 hidden units: replicated over tp=4): the model on
  1x1 and 4x4 against the reference, with drops."""
  config, params, tokens = _case(tp, pp, **{'data.seq_len': 32, 'moe.top_k': 2,
                                            **ARCHES[arch]})
  stats = assert_matches(config, params, tokens)
  assert stats['dropped_frac'] > 0.02


@pytest.mark.quick
def test_reference_sees_the_renormalisation_point():
  """Renormalising over the kept gates instead of the top-k choices is outside tolerance."""
  config, params, tokens = _case(**{'moe.top_k': 2, **ARCHES['qwen3']})
  with pytest.raises(AssertionError):
    assert_matches(config, params, tokens, normalize_gates='kept')
