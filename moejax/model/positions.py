"""Position information: rotary embeddings (RoPE) for queries and keys.

RoPE rotates each (i, i + H/2) pair of a head's features by angle position * base^(-2i/H)
(GPT-NeoX's half split): a query-key score then depends on the two positions only through their
difference, so a model trained at one length can be run at others (no position table to
outgrow). The learned table of the seed's GPT-2 layout lives in layers.Embedder.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ROPE_BASE = 10_000.0


def rope(x: jax.Array, positions: jax.Array, base: float = ROPE_BASE) -> jax.Array:
  """x [B, T, N, H] rotated by positions [B, T] (any integers; computed in float32)."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)        # [H/2]
  angle = positions.astype(jnp.float32)[..., None, None] * freq         # [B, T, 1, H/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)                  # [B, T, N, H/2] each
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
