"""Position information: rotary embeddings (RoPE) for queries and keys, optionally YaRN-scaled.

RoPE rotates each (i, i + H/2) pair of a head's features by angle position * base^(-2i/H)
(GPT-NeoX's half split): a query-key score then depends on the two positions only through their
difference, so a model trained at one length can be run at others (no position table to
outgrow). YaRN (Peng et al. 2023, as transformers computes it) stretches a model's context by
`factor`: pairs turning fewer than beta_slow times over the original length are interpolated
(frequency / factor), those turning more than beta_fast times kept, a linear ramp between; cos
and sin are scaled by the attention factor (0.1 ln(factor) + 1 unless given). The learned table
of the seed's GPT-2 layout lives in layers.Embedder.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ROPE_BASE = 10_000.0


class Yarn(NamedTuple):
  factor: float
  original_len: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True
  attention_factor: float = 0.0    # 0: 0.1 ln(factor) + 1

  @classmethod
  def of(cls, cfg) -> Yarn | None:
    """The YaRN scaling of a ModelConfig (None: plain rotary positions)."""
    if cfg.rope_scaling != 'yarn':
      return None
    return cls(cfg.rope_factor, cfg.rope_original_len, cfg.rope_beta_fast, cfg.rope_beta_slow,
               cfg.rope_truncate, cfg.rope_attention_factor)


def frequencies(head_dim: int, base: float, yarn: Yarn | None = None
                ) -> tuple[np.ndarray, float]:
  """Angle per position of each feature pair [H/2] (float32) and the cos/sin scale."""
  half = head_dim // 2
  freq = base ** (-np.arange(half, dtype=np.float64) / half)            # [H/2]
  if yarn is None:
    return freq.astype(np.float32), 1.0
  turns = lambda rotations: (head_dim * math.log(yarn.original_len / (rotations * 2 * math.pi))
                             / (2 * math.log(base)))                    # the pair index
  low, high = turns(yarn.beta_fast), turns(yarn.beta_slow)
  if yarn.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  ramp = np.clip((np.arange(half) - low) / max(high - low, 1e-3), 0.0, 1.0)  # 1: interpolate
  freq = freq / yarn.factor * ramp + freq * (1.0 - ramp)
  scale = yarn.attention_factor or (0.1 * math.log(yarn.factor) + 1.0 if yarn.factor > 1 else 1.0)
  return freq.astype(np.float32), float(scale)


def rope(x: jax.Array, positions: jax.Array, base: float = ROPE_BASE,
         yarn: Yarn | None = None) -> jax.Array:
  """x [B, T, N, H] rotated by positions [B, T] (any integers; computed in float32)."""
  freq, scale = frequencies(x.shape[-1], base, yarn)                    # [H/2]
  angle = positions.astype(jnp.float32)[..., None, None] * freq         # [B, T, 1, H/2]
  cos, sin = jnp.cos(angle) * scale, jnp.sin(angle) * scale
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)                  # [B, T, N, H/2] each
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
