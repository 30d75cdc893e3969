"""Sequence-length buckets: several row lengths in one run, the tokens per step fixed.

data.buckets = 'T1,T2,...' gives each step one row length; a step at length Tb has
micro_batch_size * seq_len / Tb rows per micro-batch (the tokens per step of the config), and its
bucket is a pure function of (seed, step), so a resumed run takes the same buckets. Each bucket
is one compiled train step, compiled once at start.
"""
from __future__ import annotations

import numpy as np


def choose(seed: int, step: int, count: int) -> int:
  """The bucket (index) of a step."""
  if count <= 1:
    return 0
  return int(np.random.default_rng([seed, 2, step]).integers(count))
