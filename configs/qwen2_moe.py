"""Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B, Qwen/Qwen2-57B-A14B): routed SwiGLU experts top-k without
renormalisation, plus a shared SwiGLU expert on every token scaled by a learned sigmoid gate;
q/k/v biases (none on the output projection), rotary base 1e6.

  python main.py --config=configs/qwen2_moe.py:tiny --workdir=/tmp/qwen2_tiny   # CPU, 4x4 simulated
  python main.py --config=configs/qwen2_moe.py:a2.7b --workdir=/tmp/qwen2       # the published size
  python main.py --config=configs/qwen2_moe.py:HF_DIR --config.init_from=RUN ...

With a Hugging Face directory as the argument its config.json decides the model (`HF_DIR,cpu`
for CPU-sized run settings).
"""
import ml_collections

from moejax import config_files

tp4pp4 = config_files.sibling(__file__, 'tp4pp4')

VARIANTS = {
    'tiny': dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                 num_hidden_layers=8, num_experts=16, num_experts_per_tok=2,
                 moe_intermediate_size=64, shared_expert_intermediate_size=128,
                 intermediate_size=128, rms_norm_eps=1e-6, rope_theta=1e6,
                 max_position_embeddings=64, router_aux_loss_coef=0.001, norm_topk_prob=False),
    'a2.7b': dict(vocab_size=151936, hidden_size=2048, num_attention_heads=16,
                  num_key_value_heads=16, num_hidden_layers=24, num_experts=60,
                  num_experts_per_tok=4, moe_intermediate_size=1408,
                  shared_expert_intermediate_size=5632, intermediate_size=5632, rms_norm_eps=1e-6,
                  rope_theta=1e6, max_position_embeddings=8192, router_aux_loss_coef=0.001,
                  norm_topk_prob=False),
    '57b-a14b': dict(vocab_size=151936, hidden_size=3584, num_attention_heads=28,
                     num_key_value_heads=4, num_hidden_layers=28, num_experts=64,
                     num_experts_per_tok=8, moe_intermediate_size=2560,
                     shared_expert_intermediate_size=20480, intermediate_size=18944,
                     rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                     router_aux_loss_coef=0.001, norm_topk_prob=False),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_files.open_family(arg, 'qwen2_moe', VARIANTS, tp4pp4.get_config)
