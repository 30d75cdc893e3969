"""DeepSeek-V3 blocks (deepseek-ai/DeepSeek-V3, moonshotai/Kimi-K2: the same block): multi-head
latent attention (a query latent, a shared key/value latent and one rotary key per token, YaRN
with its mscale on the softmax), sigmoid expert affinities chosen with a selection bias within
the best expert groups, gates renormalised and scaled, an always-on shared expert.

  python main.py --config=configs/deepseek_v3.py:tiny --workdir=/tmp/dsv3_tiny   # CPU, 4x4 simulated
  python main.py --config=configs/deepseek_v3.py:HF_DIR --config.init_from=RUN ...

Not yet in moejax: the published models' dense first layers (first_k_dense_replace) and their
multi-token-prediction modules, so their config.json is refused naming both; `:tiny` and
checkpoints without them (first_k_dense_replace=0, num_nextn_predict_layers=0) work.
"""
import ml_collections

from configs import defaults

VARIANTS = {
    'tiny': dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_hidden_layers=8,
                 kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
                 v_head_dim=16, n_routed_experts=16, n_shared_experts=1,
                 moe_intermediate_size=32, num_experts_per_tok=2, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0,
                 num_nextn_predict_layers=0, rms_norm_eps=1e-6, max_position_embeddings=64,
                 rope_parameters={'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 4.0,
                                  'original_max_position_embeddings': 16, 'mscale': 1.0,
                                  'mscale_all_dim': 1.0}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return defaults.open_family(arg, 'deepseek_v3', VARIANTS)
