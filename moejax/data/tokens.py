"""Token datasets on disk, and the memory-mapped source that trains from them.

A dataset directory holds `train.bin` and `val.bin` (flat token ids, uint16 or uint32) and
`meta.json` (tokenizer, vocab size, dtype, token counts, largest id). Training samples windows of
seq_len + 1 tokens starting at multiples of seq_len; within each epoch the windows are a
permutation drawn from (seed, epoch), and the n-th sequence of the run is window
perm[n mod windows], n = (step * M + micro) * B + row: a pure function of (seed, step, micro,
row), so every process reads its own rows and a resumed run continues at the same window.
Evaluation (negative steps) reads the validation split in order, the same windows every time.

With packing (data.pack), rows hold whole documents instead (moejax.data.packing): the train
split's documents in an order drawn from (seed, epoch), packed first-fit into rows of seq_len + 1
tokens, each row [3, seq_len + 1] (tokens, segment ids, positions); the n-th row of the run is a
function of (seed, n). Document boundaries come from `<split>_docs.npy` (written by prepare:
each document's start, then the split's end), or from the <eos> tokens of older datasets.
"""
from __future__ import annotations

import functools
import json
import os
import time

import numpy as np

from moejax.errors import ConfigError, DataError
from moejax.data import packing
from moejax.data.source import Source

META = 'meta.json'
SPLITS = ('train', 'val')
SCAN_SECONDS = 10.0        # time budget for checking every id of the files at start
SCAN_CHUNK = 1 << 24       # tokens per chunk of that check


def read_meta(path: str) -> dict:
  """The dataset's metadata, after checking that its files exist and match it."""
  meta_file = os.path.join(path, META)
  if not os.path.isdir(path) or not os.path.isfile(meta_file):
    raise ConfigError(f'data.path={path!r} is not a token dataset (no {META}); create one with '
                      f'python -m moejax.cli.prepare --input=FILE.txt --out={path or "DIR"}.')
  with open(meta_file) as f:
    meta = json.load(f)
  for split in SPLITS:
    file = os.path.join(path, f'{split}.bin')
    if not os.path.isfile(file):
      raise ConfigError(f'{file} is missing; re-run python -m moejax.cli.prepare.')
    size = os.path.getsize(file)
    expect = meta[f'{split}_tokens'] * np.dtype(meta['dtype']).itemsize
    if size == 0:
      raise ConfigError(f'{file} is empty; prepare the dataset from a non-empty text.')
    if size != expect:
      raise ConfigError(f'{file} has {size} bytes but {META} says {expect}; the dataset is '
                        f'truncated or mixed up: re-run python -m moejax.cli.prepare.')
  return meta


IDENTITY_BLOCKS = 16        # blocks hashed per file for its identity
IDENTITY_BLOCK = 1 << 16    # bytes per block


def identity(path: str) -> dict[str, str]:
  """What identifies the dataset's token files, whatever their directory: per file its size and a
  SHA-256 of IDENTITY_BLOCKS evenly spaced blocks (the first and last included), e.g.
  {'train.bin': '1048576 bytes, sampled sha256 3f2a..'}. Milliseconds for any size."""
  import hashlib
  out = {}
  for split in SPLITS:
    file = os.path.join(path, f'{split}.bin')
    size = os.path.getsize(file)
    digest = hashlib.sha256(str(size).encode())
    last = max(size - IDENTITY_BLOCK, 0)
    with open(file, 'rb') as f:
      for i in range(IDENTITY_BLOCKS):
        f.seek(last * i // (IDENTITY_BLOCKS - 1))
        digest.update(f.read(IDENTITY_BLOCK))
    out[f'{split}.bin'] = f'{size} bytes, sampled sha256 {digest.hexdigest()[:16]}'
  return out


def check(path: str, vocab_size: int, seq_len: int) -> dict:
  """Errors before training for a dataset the model cannot train on."""
  meta = read_meta(path)
  if meta['vocab_size'] > vocab_size:
    raise ConfigError(
        f'The dataset {path} was prepared with tokenizer {meta["tokenizer"]!r} of '
        f'{meta["vocab_size"]} ids but model.vocab_size={vocab_size}; set '
        f'--config.model.vocab_size={meta["vocab_size"]} or prepare it with the model\'s '
        f'tokenizer.')
  if meta['max_id'] >= vocab_size:
    raise ConfigError(
        f'The dataset {path} holds token id {meta["max_id"]} but model.vocab_size={vocab_size} '
        f'(its tokenizer {meta["tokenizer"]!r} has {meta["vocab_size"]} ids); set '
        f'--config.model.vocab_size={meta["vocab_size"]} or prepare it with the model\'s '
        f'tokenizer.')
  for split in SPLITS:
    if meta[f'{split}_tokens'] < seq_len + 1:
      raise ConfigError(
          f'The {split} split of {path} has {meta[f"{split}_tokens"]} tokens, fewer than one '
          f'window of data.seq_len + 1 = {seq_len + 1}; use a longer text, a smaller '
          f'--val_fraction when preparing, or a shorter data.seq_len.')
  return meta


def document_bounds(path: str, split: str, data: np.ndarray, eos_id: int | None) -> np.ndarray:
  """[docs + 1] start offsets of a split's documents, then its end."""
  file = os.path.join(path, f'{split}_docs.npy')
  if os.path.isfile(file):
    return np.load(file)
  if eos_id is None:
    return np.asarray([0, len(data)], np.int64)
  ends = np.flatnonzero(np.asarray(data) == eos_id) + 1
  return np.unique(np.concatenate([[0], ends, [len(data)]])).astype(np.int64)


class TokenSource(Source):
  """Windows of a prepared token dataset, read through np.memmap."""

  def __init__(self, path: str, num_micro_batches: int, micro_batch_size: int, seq_len: int,
               seed: int, vocab_size: int, pack: bool = False):
    super().__init__(num_micro_batches, micro_batch_size, seq_len, packed=pack)
    self.meta = check(path, vocab_size, seq_len)
    self.seed, self.seq_len = seed, seq_len
    self.path, self.vocab_size = path, vocab_size
    self.data = {s: np.memmap(os.path.join(path, f'{s}.bin'), dtype=self.meta['dtype'], mode='r')
                 for s in SPLITS}
    self.windows = {s: (len(a) - 1) // seq_len for s, a in self.data.items()}
    self.pack = pack
    if pack:
      self.bounds = {s: document_bounds(path, s, self.data[s], self.meta.get('eos_id'))
                     for s in SPLITS}
      self._val_rows = packing.pack(range(len(self.bounds['val']) - 1),
                                    np.diff(self.bounds['val']), seq_len + 1)
      self._epoch_rows: list[int] = []      # rows in each packed epoch so far
    self._scan()

  def _scan(self) -> None:
    """Checks every id against the vocabulary, as far as SCAN_SECONDS allows (each window
    served is checked as well)."""
    deadline = time.monotonic() + SCAN_SECONDS
    for split, data in self.data.items():
      for start in range(0, len(data), SCAN_CHUNK):
        if time.monotonic() > deadline:
          return
        self._check_ids(split, start, data[start:start + SCAN_CHUNK])

  def _check_ids(self, split: str, start: int, ids: np.ndarray) -> None:
    if len(ids) and int(ids.max()) >= self.vocab_size:
      offset = start + int(np.argmax(ids >= self.vocab_size))
      raise DataError(
          f'{os.path.join(self.path, split + ".bin")}: token id {int(self.data[split][offset])} '
          f'at token offset {offset} is not below model.vocab_size={self.vocab_size}. The file '
          f'is corrupt or was written by another tokenizer: re-run python -m moejax.cli.prepare '
          f'(or set model.vocab_size to the tokenizer\'s).')

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.windows['train'])

  def window(self, step: int, micro: int, row: int) -> tuple[str, int]:
    """(split, window index) of one sequence of a step."""
    m, b = self.shape[:2]
    if step < 0:
      n = ((-step - 1) * m + micro) * b + row
      return 'val', n % self.windows['val']
    n = (step * m + micro) * b + row
    epoch, k = divmod(n, self.windows['train'])
    return 'train', int(self._order(epoch)[k])

  @functools.lru_cache(maxsize=2)
  def _packed_epoch(self, epoch: int) -> list[list[packing.Piece]]:
    lengths = np.diff(self.bounds['train'])
    order = np.random.default_rng([self.seed, epoch]).permutation(len(lengths))
    return packing.pack(order, lengths, self.seq_len + 1)

  def _packed_row(self, step: int, micro: int, row: int) -> tuple[str, list[packing.Piece]]:
    m, b = self.shape[:2]
    if step < 0:
      n = ((-step - 1) * m + micro) * b + row
      return 'val', self._val_rows[n % len(self._val_rows)]
    n, epoch = (step * m + micro) * b + row, 0
    while True:
      if epoch == len(self._epoch_rows):
        self._epoch_rows.append(len(self._packed_epoch(epoch)))
      if n < self._epoch_rows[epoch]:
        return 'train', self._packed_epoch(epoch)[n]
      n -= self._epoch_rows[epoch]
      epoch += 1

  def sequence(self, step: int, micro: int, row: int) -> np.ndarray:
    if self.pack:
      split, pieces = self._packed_row(step, micro, row)
      starts = self.bounds[split]

      def read(doc: int, start: int, length: int) -> np.ndarray:
        at = int(starts[doc]) + start
        ids = np.asarray(self.data[split][at:at + length], dtype=np.int32)
        self._check_ids(split, at, ids)
        return ids
      return packing.row_arrays(pieces, read, self.seq_len + 1)
    split, w = self.window(step, micro, row)
    start = w * self.seq_len
    ids = np.asarray(self.data[split][start:start + self.seq_len + 1], dtype=np.int32)
    self._check_ids(split, start, ids)
    return ids
