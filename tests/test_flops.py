"""The model's FLOPs per token against counts written here from each family's Hugging Face
config: 6 x active parameters x tokens + causal attention (PaLM appendix B)."""
import importlib

import pytest

from moejax.model import flops
from moejax.perf import shapes

SEQ = 4096


def independent(hf: dict, seq: int) -> float:
  """6 x (attention projections + router + top-k SwiGLU experts + a shared SwiGLU expert and
  its [D, 1] gate, per layer; LM head) + the causal score and value matmuls (2 x 2 x heads x
  head_dim x seq/2 forward, x3 to train)."""
  d, n = hf['hidden_size'], hf['num_attention_heads']
  kv = hf.get('num_key_value_heads', n)
  h = hf.get('head_dim', d // n)
  e = hf.get('num_experts', hf.get('num_local_experts'))
  f = hf.get('moe_intermediate_size', hf.get('intermediate_size'))
  k = hf['num_experts_per_tok']
  attention = d * n * h + 2 * d * kv * h + n * h * d
  per_layer = attention + d * e + k * 3 * d * f
  if 'shared_expert_intermediate_size' in hf:
    per_layer += 3 * d * hf['shared_expert_intermediate_size'] + d
  # Qwen's dense layers: attention and a SwiGLU MLP of intermediate_size.
  only, step = set(hf.get('mlp_only_layers') or []), hf.get('decoder_sparse_step') or 1
  dense_layer = attention + 3 * d * hf.get('intermediate_size', 0)
  active = sum(per_layer if i not in only and (i + 1) % step == 0 else dense_layer
               for i in range(hf['num_hidden_layers'])) + d * hf['vocab_size']
  # Each layer's keys per query, summed over the T queries of a sequence and divided by T:
  # T/2 causal (the convention), sum_t min(t + 1, W) / T with a sliding window W.
  window = hf.get('sliding_window')
  keys = [sum(min(t + 1, window) for t in range(seq)) / seq if kind == 'sliding_attention'
          else seq / 2 for kind in hf.get('layer_types', ['full'] * hf['num_hidden_layers'])]
  return 6 * active + sum(12 * n * h * kq for kq in keys)


def independent_deepseek(hf: dict, seq: int, mtp_depth: int = 0) -> float:
  """DeepSeek-V3 (MLA, a shared expert, dense first layers) counted the same way: each layer's
  query down/up, key/value down/up and output projections; a dense layer's three MLP matrices,
  an MoE layer's router, top-k routed experts and shared experts."""
  d, n = hf['hidden_size'], hf['num_attention_heads']
  hn, hr, hv = hf['qk_nope_head_dim'], hf['qk_rope_head_dim'], hf['v_head_dim']
  rq, r = hf['q_lora_rank'], hf['kv_lora_rank']
  attention = d * rq + rq * n * (hn + hr) + d * (r + hr) + r * n * (hn + hv) + n * hv * d
  f, e, k = hf['moe_intermediate_size'], hf['n_routed_experts'], hf['num_experts_per_tok']
  dense_layers = hf['first_k_dense_replace']
  moe_layers = hf['num_hidden_layers'] - dense_layers
  active = (hf['num_hidden_layers'] * attention + dense_layers * 3 * d * hf['intermediate_size']
            + moe_layers * (d * e + (k + hf['n_shared_experts']) * 3 * d * f)
            + d * hf['vocab_size'])
  # Multi-token prediction (num_nextn_predict_layers modules, when trained): each an MoE
  # layer, its [2D, D] eh_proj and the shared head again.
  mtp = mtp_depth * (attention + d * e + (k + hf['n_shared_experts']) * 3 * d * f
                     + 2 * d * d + d * hf['vocab_size'])
  per_key = 2 * 2 * n * (hn + hr + hv) / 2                 # score and value matmuls, forward
  return 6 * (active + mtp) + (hf['num_hidden_layers'] + mtp_depth) * 3 * per_key * seq / 2


@pytest.mark.parametrize('variant,mtp_depth', [('671b', 0), ('tiny', 0), ('671b', 1),
                                               ('tiny', 2)])
def test_deepseek_flops_match_an_independent_count(variant, mtp_depth):
  from configs import deepseek_v3
  c = shapes.load('configs/deepseek_v3.py', variant)
  c.data.seq_len = SEQ
  c.model.mtp_depth = mtp_depth
  expected = independent_deepseek(deepseek_v3.VARIANTS[variant], SEQ, mtp_depth)
  assert flops.flops_per_token(c) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize('family,variant', [('olmoe', '1b-7b'), ('qwen3_moe', '30b-a3b'),
                                            ('mixtral', '8x7b'), ('qwen2_moe', 'a2.7b'),
                                            ('qwen2_moe', '57b-a14b'), ('olmoe', 'tiny'),
                                            ('qwen3_moe', 'tiny'), ('mixtral', 'tiny'),
                                            ('qwen2_moe', 'tiny'), ('gpt_oss', '20b'),
                                            ('gpt_oss', '120b'), ('gpt_oss', 'tiny')])
def test_each_familys_flops_match_an_independent_count(family, variant):
  hf = importlib.import_module(f'configs.{family}').VARIANTS[variant]
  c = shapes.load(f'configs/{family}.py', variant)
  c.data.seq_len = SEQ
  ours = flops.flops_per_token(c)
  assert ours == pytest.approx(independent(hf, SEQ), rel=0.01)


@pytest.mark.parametrize('family,variant', [('qwen2_moe', 'a2.7b'), ('qwen3_moe', '30b-a3b')])
def test_qwens_dense_layers_are_counted(family, variant, tmp_path):
  """Layers 0, 1 and every other one after them dense (mlp_only_layers=[1],
  decoder_sparse_step=2): dense first layers and a dense layer inside each block."""
  import json
  hf = dict(importlib.import_module(f'configs.{family}').VARIANTS[variant],
            mlp_only_layers=[1], decoder_sparse_step=2, model_type=family)
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  c = shapes.load(f'configs/{family}.py', str(tmp_path))
  assert (c.model.dense_blocks, c.model.dense_per_block) == (2, 1)
  c.data.seq_len = SEQ
  assert flops.flops_per_token(c) == pytest.approx(independent(hf, SEQ), rel=0.01)


def test_the_seeds_model_counts_its_two_gelu_matrices_and_its_head():
  c = shapes.load('configs/tp4pp4.py')
  d, heads, e, f, v, t = 1024, 16 * 64, 64, 2048, 50257, 1024
  per_block = 4 * d * heads + d * e + 2 * d * f              # top-1: one expert's two matrices
  expected = 6 * (8 * per_block + d * v) + 8 * 6 * heads * t
  assert flops.flops_per_token(c) == pytest.approx(expected, rel=0.002)   # vocab padded to 128s
  # OLMoE-1B-7B at 4,096 tokens: ~7.9 GFLOP per token, the figure the old two-matrix count
  # (5.87 at its shorter sequence) missed by a fifth.
  olmoe = shapes.load('configs/olmoe.py', '1b-7b')
  olmoe.data.seq_len = SEQ
  assert 7.7e9 < flops.flops_per_token(olmoe) < 8.1e9
