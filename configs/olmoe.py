"""OLMoE (allenai/OLMoE-1B-7B): 64 experts top-8, SwiGLU experts, RMSNorm, QK-norm over the whole
query/key width, rotary positions, no gate renormalisation.

  python main.py --config=configs/olmoe.py:tiny --workdir=/tmp/olmoe_tiny      # CPU, 4x4 simulated
  python main.py --config=configs/olmoe.py:1b-7b --workdir=/tmp/olmoe          # the published size
  python -m moejax.cli.convert import --hf_dir=HF_DIR --workdir=/tmp/olmoe_import
  python main.py --config=configs/olmoe.py:HF_DIR --config.init_from=/tmp/olmoe_import ...

With a Hugging Face directory as the argument its config.json decides the model (`HF_DIR,cpu`
for CPU-sized run settings). Every key can be overridden except the model's shape.
"""
import ml_collections

from moejax import config_files

tp4pp4 = config_files.sibling(__file__, 'tp4pp4')

VARIANTS = {
    'tiny': dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                 num_hidden_layers=8, num_experts=16, num_experts_per_tok=2,
                 intermediate_size=64, rms_norm_eps=1e-5, rope_theta=10_000.0,
                 max_position_embeddings=64, router_aux_loss_coef=0.01, norm_topk_prob=False),
    '1b-7b': dict(vocab_size=50304, hidden_size=2048, num_attention_heads=16,
                  num_key_value_heads=16, num_hidden_layers=16, num_experts=64,
                  num_experts_per_tok=8, intermediate_size=1024, rms_norm_eps=1e-5,
                  rope_theta=10_000.0, max_position_embeddings=4096, router_aux_loss_coef=0.01,
                  norm_topk_prob=False),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_files.open_family(arg, 'olmoe', VARIANTS, tp4pp4.get_config)
