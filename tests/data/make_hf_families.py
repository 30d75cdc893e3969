"""Writes tiny random checkpoints of the open MoE families and transformers' logits on them
into tests/data/hf/<family>/ (config.json, model.safetensors, logits.npz), for
tests/test_convert.py. Needs torch and transformers (not CI's requirements):

  pip install torch==2.13.0 transformers==5.24.0 safetensors
  python tests/data/make_hf_families.py [FAMILY ...]     # all of them, or the ones named

Fixed seed, float32, eager attention. Every norm weight is moved off 1 and the vocabulary is
not a multiple of 128, so a mapping or padding error shows in the logits. Shapes divide a 4x4
mesh: 4 MoE layers (DeepSeek-V3, Qwen2-MoE: after a dense one; Qwen3: each after one), 8
experts, 4 query heads (Qwen3: 8 heads of 8 over a 32-wide model, 4 key/value heads split over
tp; Mixtral: 2 key/value heads, replicated over tp=4).
"""
import json
import os
import sys

import numpy as np
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hf')
VOCAB, D, F, LAYERS, EXPERTS, TOP_K = 100, 32, 16, 4, 8, 2
COMMON = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_experts_per_tok=TOP_K,
              attn_implementation='eager', tie_word_embeddings=False, pad_token_id=None,
              bos_token_id=None, eos_token_id=None)
FAMILIES = {
    'olmoe': transformers.OlmoeConfig(
        intermediate_size=F, num_attention_heads=4, num_key_value_heads=4, num_experts=EXPERTS,
        rms_norm_eps=1e-5, **COMMON),
    # Every other layer dense (decoder_sparse_step 2): a dense layer before each MoE layer.
    'qwen3_moe': transformers.Qwen3MoeConfig(
        moe_intermediate_size=F, intermediate_size=2 * F, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, num_experts=EXPERTS, norm_topk_prob=True,
        rms_norm_eps=1e-6, rope_parameters={'rope_theta': 1e6, 'rope_type': 'default'},
        decoder_sparse_step=2, **dict(COMMON, num_hidden_layers=2 * LAYERS)),
    'mixtral': transformers.MixtralConfig(
        intermediate_size=F, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=EXPERTS, rms_norm_eps=1e-5, **COMMON),
    'qwen2_moe': transformers.Qwen2MoeConfig(
        moe_intermediate_size=F, shared_expert_intermediate_size=2 * F, intermediate_size=2 * F,
        num_attention_heads=4, num_key_value_heads=2, num_experts=EXPERTS, norm_topk_prob=False,
        qkv_bias=True, rms_norm_eps=1e-6, mlp_only_layers=[0],   # a dense first layer
        rope_parameters={'rope_theta': 1e6, 'rope_type': 'default'},
        **dict(COMMON, num_hidden_layers=LAYERS + 1)),
    # Every other layer windowed (4 of 16 positions), YaRN x4 over 8 positions, a clamp low
    # enough to bind on these activations; expert widths multiples of 32 (MXFP4 groups).
    'gpt_oss': transformers.GptOssConfig(
        intermediate_size=2 * F, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_local_experts=EXPERTS, sliding_window=4,
        layer_types=['sliding_attention', 'full_attention'] * (LAYERS // 2),
        rope_parameters={'rope_type': 'yarn', 'rope_theta': 150000.0, 'factor': 4.0,
                         'beta_fast': 32.0, 'beta_slow': 1.0, 'truncate': False,
                         'original_max_position_embeddings': 8},
        swiglu_limit=0.05, rms_norm_eps=1e-5, **COMMON),
    # MLA with a query latent, YaRN with DeepSeek's mscale, 4 groups of 2 experts (best 2
    # groups), a shared expert; one dense first layer (then 4 MoE layers), no MTP module.
    'deepseek_v3': transformers.DeepseekV3Config(
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=EXPERTS,
        n_shared_experts=1, moe_intermediate_size=F, intermediate_size=2 * F, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
        num_mtp_layers=0, rms_norm_eps=1e-6,
        rope_parameters={'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 4.0,
                         'original_max_position_embeddings': 8, 'mscale': 1.0,
                         'mscale_all_dim': 1.0, 'beta_fast': 32.0, 'beta_slow': 1.0},
        **dict(COMMON, num_hidden_layers=LAYERS + 1)),
}
# Families whose published checkpoints store the experts in MXFP4: a second checkpoint
# <family>_mxfp4 holds random MXFP4 experts, its logits computed with transformers' own
# dequantization of them.
MXFP4 = ('gpt_oss',)


def perturb_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Norm weights 1 + N(0, 0.2), biases N(0, 0.2) (transformers starts them at 0): an unused
  or misplaced norm or bias changes the logits."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith('bias'):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith('sinks'):
        p.copy_(torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():   # DeepSeek's selection bias: it must show
      if name.endswith('e_score_correction_bias'):
        b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def write_mxfp4(model, ids, gen: torch.Generator, out: str) -> None:
  """The model with random MXFP4 experts (codes uniform, scales 2^-6..2^-4), saved as the
  published GPT-OSS checkpoints store them (experts.{gate_up,down}_proj_{blocks,scales}), and
  the logits transformers computes from its own dequantization of them."""
  from safetensors.torch import save_file
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors
  tensors = {n: p.detach().clone().contiguous() for n, p in model.state_dict().items()}
  for name, module in model.named_modules():
    if not name.endswith('mlp.experts'):
      continue
    for proj in ('gate_up_proj', 'down_proj'):
      w = getattr(module, proj)                                       # [E, in, out]
      e, rows, cols = w.shape[0], w.shape[2], w.shape[1]              # stored as [E, out, in]
      blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
      scales = torch.randint(121, 124, (e, rows, cols // 32), generator=gen, dtype=torch.uint8)
      with torch.no_grad():
        w.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
      del tensors[f'{name}.{proj}']
      tensors[f'{name}.{proj}_blocks'], tensors[f'{name}.{proj}_scales'] = blocks, scales
  with torch.no_grad():
    logits = model(ids).logits.numpy()
  os.makedirs(out, exist_ok=True)
  # One tensor's codes next to transformers' float values of them ([E, in, out]).
  first = 'model.layers.0.mlp.experts.gate_up_proj'
  np.savez_compressed(os.path.join(out, 'dequantized.npz'),
                      blocks=tensors[first + '_blocks'].numpy(),
                      scales=tensors[first + '_scales'].numpy(),
                      values=model.model.layers[0].mlp.experts.gate_up_proj.detach().numpy())
  save_file(tensors, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
  config = model.config.to_dict()
  config['quantization_config'] = {'quant_method': 'mxfp4'}
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  np.savez_compressed(os.path.join(out, 'logits.npz'), ids=ids.numpy().astype(np.int32),
                      logits=logits.astype(np.float32))
  print(os.path.basename(out), sorted(os.listdir(out)), logits.shape)


TEXT = """Mixture-of-Experts models route each token to a few experts. The router picks the
experts, the experts transform the token, and the gates weigh what they return. A model that
starts from an open checkpoint keeps what it learned and learns the new text on top of it.
"""


def write_tokenizer(path: str) -> None:
  """A BPE tokenizer.json of VOCAB ids (characters it never saw map to <unk>; </s> ends
  documents), for the README's import -> fine-tune -> sample -> export walkthrough."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(
      vocab_size=VOCAB, special_tokens=['<unk>', '</s>'], limit_alphabet=50))
  assert tok.get_vocab_size() <= VOCAB
  tok.save(path)


def main(names: list[str]) -> None:
  print(f'transformers {transformers.__version__}, torch {torch.__version__}')
  for i, (family, cfg) in enumerate(FAMILIES.items()):
    if names and family not in names:
      continue
    torch.manual_seed(i)
    gen = torch.Generator().manual_seed(100 + i)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    perturb_norms(model, gen)
    ids = torch.randint(0, VOCAB, (8, 16), generator=gen)              # [batch, seq]
    with torch.no_grad():
      logits = model(ids).logits.numpy()                               # [batch, seq, vocab]
    out = os.path.join(OUT, family)
    model.save_pretrained(out)
    np.savez_compressed(os.path.join(out, 'logits.npz'), ids=ids.numpy().astype(np.int32),
                        logits=logits.astype(np.float32))
    print(family, sorted(os.listdir(out)), logits.shape)
    if family in MXFP4:
      write_mxfp4(model, ids, gen, os.path.join(OUT, f'{family}_mxfp4'))
  for family in ('mixtral', 'gpt_oss'):   # the READMEs' walkthroughs
    if not names or family in names:
      write_tokenizer(os.path.join(OUT, family, 'tokenizer.json'))


if __name__ == '__main__':
  main(sys.argv[1:])
