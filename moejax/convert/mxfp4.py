"""MXFP4 (OCP Microscaling, FP4 E2M1 elements): how GPT-OSS's published checkpoints store their
experts' weights, and how they become float on import.

A tensor [..., R, C] is stored as `blocks` uint8 [..., R, C/32, 16] (two 4-bit codes per byte,
the low nibble the earlier element) and `scales` uint8 [..., R, C/32] (a power-of-two exponent
per group of 32 elements along C, biased by 127). A 4-bit code is sign (bit 3), exponent (bits
1-2, bias 1) and mantissa (bit 0): the values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives.
"""
from __future__ import annotations

import numpy as np

GROUP = 32   # elements per scale
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                 -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """blocks [..., r, g, 16] uint8, scales [..., r, g] uint8 (g scale groups of 32 values
  along a row) -> float32 [..., r, g*32]."""
  if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
    raise ValueError(f'MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not '
                     f'match (blocks [..., G, 16] for scales [..., G])')
  codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)                # [..., g, 16, 2]
  values = E2M1[codes].reshape(scales.shape + (GROUP,))                  # [..., g, 32]
  power = np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127)       # [..., g]
  values *= power[..., None].astype(np.float32)
  return values.reshape(scales.shape[:-1] + (-1,))                       # [..., r, g*32]


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float [..., R, C] (C a multiple of 32) -> (blocks, scales) as `dequantize` reads them:
  each group's scale is the power of two that brings its largest magnitude within 6, each
  element rounded to the nearest E2M1 value."""
  *lead, cols = x.shape
  groups = x.reshape(tuple(lead) + (cols // GROUP, GROUP)).astype(np.float32)  # [..., g, 32]
  top = np.max(np.abs(groups), axis=-1)                                  # [..., g]
  exp = np.where(top > 0, np.ceil(np.log2(np.maximum(top, 1e-38) / 6.0)), 0).astype(np.int32)
  exp = np.clip(exp, -127, 127)
  scaled = groups / np.ldexp(np.float32(1.0), exp)[..., None]            # [..., g, 32]
  codes = np.argmin(np.abs(np.abs(scaled)[..., None] - E2M1[:8]), axis=-1).astype(np.uint8)
  codes = codes | np.where(scaled < 0, 8, 0).astype(np.uint8)
  pairs = codes.reshape(codes.shape[:-1] + (GROUP // 2, 2))
  blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)       # [..., G, 16]
  return blocks, (exp + 127).astype(np.uint8)
