"""GPT-OSS (openai/gpt-oss-20b, gpt-oss-120b): 32 or 128 experts top-4 with biases and the
clamped SwiGLU, a router bias, grouped-query attention (64 query heads, 8 key/value heads of 64)
with biases and a learned sink logit per head, windowed (128 positions) and full attention
alternating, YaRN rotary scaling (x32 over 4,096 positions).

  python main.py --config=configs/gpt_oss.py:tiny --workdir=/tmp/gpt_oss_tiny   # CPU, 4x4 simulated
  python main.py --config=configs/gpt_oss.py:20b --workdir=/tmp/gpt_oss          # the published size
  python main.py --config=configs/gpt_oss.py:HF_DIR --config.init_from=RUN ...

With a Hugging Face directory as the argument its config.json decides the model (`HF_DIR,cpu`
for CPU-sized run settings). The published checkpoints store the experts in MXFP4; import
dequantizes them (moejax trains in float32 / bfloat16).
"""
import ml_collections

from moejax import config_files

tp4pp4 = config_files.sibling(__file__, 'tp4pp4')

_YARN = {'rope_type': 'yarn', 'rope_theta': 150000.0, 'factor': 32.0, 'beta_fast': 32.0,
         'beta_slow': 1.0, 'truncate': False, 'original_max_position_embeddings': 4096}


def _published(layers: int, experts: int) -> dict:
  return dict(vocab_size=201088, hidden_size=2880, num_attention_heads=64,
              num_key_value_heads=8, head_dim=64, num_hidden_layers=layers,
              num_local_experts=experts, num_experts_per_tok=4, intermediate_size=2880,
              sliding_window=128, layer_types=['sliding_attention', 'full_attention'] * (layers // 2),
              rope_parameters=_YARN, max_position_embeddings=131072, rms_norm_eps=1e-5,
              router_aux_loss_coef=0.9, swiglu_limit=7.0, attention_bias=True)


VARIANTS = {
    'tiny': dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, num_hidden_layers=8, num_local_experts=16, num_experts_per_tok=2,
                 intermediate_size=64, sliding_window=16,
                 layer_types=['sliding_attention', 'full_attention'] * 4,
                 rope_parameters={**_YARN, 'factor': 4.0, 'original_max_position_embeddings': 16},
                 max_position_embeddings=64, rms_norm_eps=1e-5, router_aux_loss_coef=0.9,
                 swiglu_limit=7.0, attention_bias=True),
    '20b': _published(24, 32),
    '120b': _published(36, 128),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_files.open_family(arg, 'gpt_oss', VARIANTS, tp4pp4.get_config)
