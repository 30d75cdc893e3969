"""Mixtral (mistralai/Mixtral-8x7B): 8 experts top-2 renormalised, grouped-query attention
(32 query heads, 8 key/value heads), rotary base 1e6, no QK-norm.

  python main.py --config=configs/mixtral.py:tiny --workdir=/tmp/mixtral_tiny   # CPU, 4x4 simulated
  python main.py --config=configs/mixtral.py:8x7b --workdir=/tmp/mixtral        # the published size
  python main.py --config=configs/mixtral.py:HF_DIR --config.init_from=RUN ...

With a Hugging Face directory as the argument its config.json decides the model (`HF_DIR,cpu`
for CPU-sized run settings).
"""
import ml_collections

from moejax import config_files

tp4pp4 = config_files.sibling(__file__, 'tp4pp4')

VARIANTS = {
    'tiny': dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=8, num_local_experts=8, num_experts_per_tok=2,
                 intermediate_size=64, rms_norm_eps=1e-5, rope_theta=1e6,
                 max_position_embeddings=64, router_aux_loss_coef=0.02),
    '8x7b': dict(vocab_size=32000, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                 num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2,
                 intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=1e6,
                 max_position_embeddings=32768, router_aux_loss_coef=0.02),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_files.open_family(arg, 'mixtral', VARIANTS, tp4pp4.get_config)
