"""Reading and writing Hugging Face safetensors checkpoints with NumPy alone: a lazy reader over
one file or an indexed set of shards, and a writer that flushes a shard whenever it reaches the
size limit (so at most one shard's tensors wait in host memory) and writes the index."""
from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from moejax.errors import ConfigError

INDEX = 'model.safetensors.index.json'
DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}


_NUMPY = {'F32': np.float32, 'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F64': np.float64}


def _header(path: str) -> tuple[dict, int]:
  """A safetensors file's header {name: {dtype, shape, data_offsets}} and where data starts."""
  with open(path, 'rb') as f:
    size = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(size))
  header.pop('__metadata__', None)
  return header, 8 + size


class Reader:
  """The tensors of a checkpoint directory, each read from its file when asked for (plain
  reads, not a memory map: host memory holds the tensors asked for, not the files)."""

  def __init__(self, directory: str):
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    else:
      files = sorted(n for n in os.listdir(directory) if n.endswith('.safetensors'))
      if not files:
        raise ConfigError(f'{directory} has no *.safetensors files (and no {INDEX}).')
    self.directory = directory
    self.entries: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise ConfigError(f'{path} (listed in {INDEX}) does not exist.')
      header, start = _header(path)
      self.entries.update({k: (path, v, start) for k, v in header.items()})

  def names(self) -> list[str]:
    return sorted(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name][1]['shape'])

  def get(self, name: str) -> np.ndarray:
    """The tensor in float32."""
    path, entry, start = self.entries[name]
    if entry['dtype'] not in _NUMPY:
      raise ConfigError(f'{name} in {path} has dtype {entry["dtype"]}; moejax reads '
                        f'{sorted(_NUMPY)}.')
    dtype = np.dtype(_NUMPY[entry['dtype']])
    begin, end = entry['data_offsets']
    count = (end - begin) // dtype.itemsize
    array = np.fromfile(path, dtype=dtype, count=count, offset=start + begin)
    return array.reshape(entry['shape']).astype(np.float32, copy=False)


def parse_size(text: str) -> int:
  """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
  match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*', str(text), re.IGNORECASE)
  if not match:
    raise ConfigError(f'max_shard_size={text!r}: expected a size like 5GB or 500MB.')
  unit = (match.group(2) or 'B').upper()
  base = 1024 if 'I' in unit else 1000
  power = 'BKMGT'.index(unit[0]) if unit[0] in 'KMGT' else 0
  return int(float(match.group(1)) * base ** power)


class Writer:
  """Shards of at most `max_bytes` (a tensor larger than that gets a shard of its own)."""

  def __init__(self, directory: str, max_bytes: int, dtype: str):
    os.makedirs(directory, exist_ok=True)
    self.directory, self.max_bytes, self.dtype = directory, max_bytes, DTYPES[dtype]
    self.pending: dict[str, np.ndarray] = {}
    self.pending_bytes = 0
    self.files: list[list[str]] = []
    self.total = 0

  def add(self, name: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array.astype(self.dtype))
    if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
      self._flush()
    self.pending[name] = array
    self.pending_bytes += array.nbytes
    self.total += array.nbytes

  def _flush(self) -> None:
    number = len(self.files)
    save_file(self.pending, os.path.join(self.directory, f'part-{number}.tmp'),
              metadata={'format': 'pt'})
    self.files.append(sorted(self.pending))
    self.pending, self.pending_bytes = {}, 0

  def finish(self) -> list[str]:
    """Names the shards model-0000i-of-0000n.safetensors, writes the index; returns the files."""
    if self.pending:
      self._flush()
    count = len(self.files)
    weight_map, out = {}, []
    for i, names in enumerate(self.files):
      name = ('model.safetensors' if count == 1 else
              f'model-{i + 1:05d}-of-{count:05d}.safetensors')
      os.replace(os.path.join(self.directory, f'part-{i}.tmp'), os.path.join(self.directory, name))
      weight_map.update({n: name for n in names})
      out.append(name)
    if count > 1:
      with open(os.path.join(self.directory, INDEX), 'w') as f:
        json.dump({'metadata': {'total_size': self.total}, 'weight_map': weight_map}, f, indent=2)
    return out
