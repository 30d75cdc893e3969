"""What the trainer needs of a data source, and global batches built from each process's share.

A source defines `sequence(step, micro, row)` -> [T+1] token ids (or a packed row [3, T+1]:
tokens, segment ids, positions), a pure function of its
arguments (negative steps are evaluation batches). Any slice of a step's [M, B, T+1] batch can
then be loaded alone: each process reads only the sequences of its own devices, and resume
continues at exactly the sequence it would have reached.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Sharding


class Source:
  """Base of token sources: batches [M, B, T+1] int32 from per-sequence reads."""

  def __init__(self, num_micro_batches: int, micro_batch_size: int, seq_len: int,
               packed: bool = False):
    self.shape = (num_micro_batches, micro_batch_size) + ((3,) if packed else ()) + (seq_len + 1,)

  def sequence(self, step: int, micro: int, row: int) -> np.ndarray:
    raise NotImplementedError

  def batch(self, step: int, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Tokens [M, B, T+1] (packed rows: [M, B, 3, T+1]) of `step`, or only the block `index`
    (slices over those axes)."""
    m, b = self.shape[:2]
    index = tuple(index or ()) + (slice(None),) * (len(self.shape) - len(index or ()))
    micros = range(*index[0].indices(m))
    rows = range(*index[1].indices(b))
    out = np.stack([np.stack([self.sequence(step, i, j) for j in rows]) for i in micros])
    return out[(slice(None), slice(None)) + tuple(index[2:])]


def global_batch(source: Source, step: int, sharding: Sharding) -> jax.Array:
  """The step's batch as one global array; this process loads only its devices' blocks."""
  cache: dict = {}

  def load(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in cache:          # tp replicas of a block ask for the same rows
      cache[key] = source.batch(step, index)
    return cache[key]
  return jax.make_array_from_callback(source.shape, sharding, load)
