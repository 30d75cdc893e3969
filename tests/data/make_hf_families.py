"""Writes tiny random checkpoints of the open MoE families and transformers' logits on them
into tests/data/hf/<family>/ (config.json, model.safetensors, logits.npz), for
tests/test_convert.py. Needs torch and transformers (not CI's requirements):

  pip install torch==2.13.0 transformers==5.24.0 safetensors
  python tests/data/make_hf_families.py [FAMILY ...]     # all of them, or the ones named

Fixed seed, float32, eager attention. Every norm weight is moved off 1 and the vocabulary is
not a multiple of 128, so a mapping or padding error shows in the logits. Shapes divide a 4x4
mesh: 4 layers, 8 experts, 4 query heads (Qwen3: 8 heads of 8 over a 32-wide model, 4 key/value
heads split over tp; Mixtral: 2 key/value heads, replicated over tp=4).
"""
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
    'qwen3_moe': transformers.Qwen3MoeConfig(
        moe_intermediate_size=F, intermediate_size=2 * F, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, num_experts=EXPERTS, norm_topk_prob=True,
        rms_norm_eps=1e-6, rope_parameters={'rope_theta': 1e6, 'rope_type': 'default'},
        **COMMON),
    'mixtral': transformers.MixtralConfig(
        intermediate_size=F, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=EXPERTS, rms_norm_eps=1e-5, **COMMON),
    'qwen2_moe': transformers.Qwen2MoeConfig(
        moe_intermediate_size=F, shared_expert_intermediate_size=2 * F, intermediate_size=2 * F,
        num_attention_heads=4, num_key_value_heads=2, num_experts=EXPERTS, norm_topk_prob=False,
        qkv_bias=True, rms_norm_eps=1e-6,
        rope_parameters={'rope_theta': 1e6, 'rope_type': 'default'}, **COMMON),
}


def perturb_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Norm weights 1 + N(0, 0.2), biases N(0, 0.2) (transformers starts them at 0): an unused
  or misplaced norm or bias changes the logits."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith('bias'):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))


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
  if not names or 'mixtral' in names:
    write_tokenizer(os.path.join(OUT, 'mixtral', 'tokenizer.json'))


if __name__ == '__main__':
  main(sys.argv[1:])
