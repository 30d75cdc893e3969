"""DeepSeek-V3 blocks (deepseek-ai/DeepSeek-V3, moonshotai/Kimi-K2: the same block): multi-head
latent attention (a query latent, a shared key/value latent and one rotary key per token, YaRN
with its mscale on the softmax), sigmoid expert affinities chosen with a selection bias within
the best expert groups, gates renormalised and scaled, an always-on shared expert; dense blocks
first (first_k_dense_replace), run before the pipeline; multi-token prediction
(num_nextn_predict_layers -> model.mtp_depth; 671b trains one depth, as DeepSeek-V3 did).

  python main.py --config=configs/deepseek_v3.py:tiny --workdir=/tmp/dsv3_tiny   # CPU, 4x4 simulated
  python main.py --config=configs/deepseek_v3.py:671b --workdir=/tmp/dsv3        # the published size
  python main.py --config=configs/deepseek_v3.py:HF_DIR --config.init_from=RUN ...

An import of a checkpoint without its MTP layers (transformers saves none) turns MTP off and
says so; `--config.model.mtp_depth=N` on a fine-tune from it starts N fresh depths.
"""
import ml_collections

from moejax import config_files

tp4pp4 = config_files.sibling(__file__, 'tp4pp4')

VARIANTS = {
    'tiny': dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_hidden_layers=9,
                 kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
                 v_head_dim=16, n_routed_experts=16, n_shared_experts=1,
                 moe_intermediate_size=32, num_experts_per_tok=2, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
                 intermediate_size=128, rms_norm_eps=1e-6, max_position_embeddings=64,
                 rope_parameters={'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 4.0,
                                  'original_max_position_embeddings': 16, 'mscale': 1.0,
                                  'mscale_all_dim': 1.0}),
    '671b': dict(vocab_size=129280, hidden_size=7168, num_attention_heads=128,
                 num_hidden_layers=61, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                 qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
                 moe_intermediate_size=2048, num_experts_per_tok=8, n_group=8, topk_group=4,
                 routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3,
                 intermediate_size=18432, rms_norm_eps=1e-6, max_position_embeddings=163840,
                 num_nextn_predict_layers=1,
                 rope_parameters={'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 40.0,
                                  'original_max_position_embeddings': 4096, 'beta_fast': 32.0,
                                  'beta_slow': 1.0, 'mscale': 1.0, 'mscale_all_dim': 1.0}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_files.open_family(arg, 'deepseek_v3', VARIANTS, tp4pp4.get_config)
