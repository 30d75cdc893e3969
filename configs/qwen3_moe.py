"""Qwen3-MoE (Qwen/Qwen3-30B-A3B): 128 experts top-8 renormalised, grouped-query attention
(32 query heads, 4 key/value heads of 128), per-head QK-norm, rotary base 1e6.

  python main.py --config=configs/qwen3_moe.py:tiny --workdir=/tmp/qwen3_tiny   # CPU, 4x4 simulated
  python main.py --config=configs/qwen3_moe.py:30b-a3b --workdir=/tmp/qwen3     # the published size
  python main.py --config=configs/qwen3_moe.py:HF_DIR --config.init_from=RUN ...

With a Hugging Face directory as the argument its config.json decides the model (`HF_DIR,cpu`
for CPU-sized run settings).
"""
import ml_collections

from moejax import config_files

tp4pp4 = config_files.sibling(__file__, 'tp4pp4')

VARIANTS = {
    'tiny': dict(vocab_size=256, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=16, num_hidden_layers=8, num_experts=16, num_experts_per_tok=2,
                 moe_intermediate_size=64, intermediate_size=128, rms_norm_eps=1e-6,
                 rope_theta=1e6, max_position_embeddings=64, router_aux_loss_coef=0.001,
                 norm_topk_prob=True),
    '30b-a3b': dict(vocab_size=151936, hidden_size=2048, num_attention_heads=32,
                    num_key_value_heads=4, head_dim=128, num_hidden_layers=48, num_experts=128,
                    num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
                    rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
                    router_aux_loss_coef=0.001, norm_topk_prob=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_files.open_family(arg, 'qwen3_moe', VARIANTS, tp4pp4.get_config)
