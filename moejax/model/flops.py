"""The model's training FLOPs, counted as PaLM's appendix B counts them."""
from __future__ import annotations

import ml_collections


def block_flops_per_token(config: ml_collections.ConfigDict) -> float:
  """Training FLOPs per token of one block: 6 x its active matmul params + attention."""
  m, moe, t = config.model, config.moe, config.data.seq_len
  d, nh = m.d_model, m.num_heads * m.head_dim
  active = 4 * d * nh + d * moe.num_experts + moe.top_k * 2 * d * moe.d_ff
  return 6 * active + 12 * nh * t


def flops_per_token(config: ml_collections.ConfigDict) -> float:
  """Training FLOPs per token: 6 x active matmul params + attention (PaLM appendix B)."""
  m = config.model
  return m.num_blocks * block_flops_per_token(config) + 6 * m.d_model * m.vocab_size
