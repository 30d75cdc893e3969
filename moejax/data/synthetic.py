"""Synthetic token sources; every sequence is a pure function of (seed, step, micro, row).

- 'random': uniform random tokens (the seed's source; nothing to learn, loss stays ~ln V).
- 'learnable': each sequence is an arithmetic progression mod V with a random start and a
  random stride in [1, 8]; after two tokens the rest is predictable in context, so a small model
  drives the loss far below ln V.
"""
from __future__ import annotations

import numpy as np

from moejax.data.source import Source

MAX_STRIDE = 8


class SyntheticSource(Source):
  """Batches [M, B, T+1] int32 of the chosen kind."""

  def __init__(self, kind: str, vocab_size: int, num_micro_batches: int, micro_batch_size: int,
               seq_len: int, seed: int):
    if kind not in ('random', 'learnable'):
      raise ValueError(f"data.source={kind!r}: expected 'random' or 'learnable'.")
    super().__init__(num_micro_batches, micro_batch_size, seq_len)
    self.kind, self.vocab, self.seed = kind, vocab_size, seed

  def sequence(self, step: int, micro: int, row: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, 0 if step >= 0 else 1, abs(step), micro, row])
    t = self.shape[-1]
    if self.kind == 'random':
      return rng.integers(0, self.vocab, t, dtype=np.int64).astype(np.int32)
    start, stride = rng.integers(0, self.vocab), rng.integers(1, MAX_STRIDE + 1)
    return ((start + stride * np.arange(t)) % self.vocab).astype(np.int32)
