"""Reading and writing Hugging Face safetensors checkpoints with NumPy alone: a reader over one
file or an indexed set of shards that reads a tensor when asked, and a writer that lays the
shards out first and writes each tensor into place as it comes, then the index."""
from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np

from moejax.errors import ConfigError

INDEX = 'model.safetensors.index.json'
DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}


_NUMPY = {'F32': np.float32, 'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F64': np.float64}
_RAW = {'U8': np.uint8}   # read as stored (MXFP4 blocks and scales), never as float


# Bytes per element of every safetensors dtype (the format's own list).
ITEMSIZE = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E5M2': 1, 'F8_E4M3': 1, 'I16': 2, 'U16': 2,
            'F16': 2, 'BF16': 2, 'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8}
MAX_HEADER = 100 * 2**20      # the format's own limit on the JSON header
READ_PIECE = 64 * 2**20       # bytes read (and converted to float32) at a time


def _header(path: str) -> tuple[dict, int]:
  """A safetensors file's header {name: {dtype, shape, data_offsets}} and where data starts,
  checked against the file's size before any tensor is read: ConfigError naming the file."""
  size = os.path.getsize(path)
  bad = lambda why: ConfigError(f'{path} is not a valid safetensors file: {why}. Re-download or '
                                f're-convert it.')
  with open(path, 'rb') as f:
    if size < 8:
      raise bad(f'{size} bytes, shorter than the 8-byte header length')
    length = int.from_bytes(f.read(8), 'little')
    if length > min(MAX_HEADER, size - 8):
      raise bad(f'its header claims {length} bytes of the file\'s {size}')
    try:
      header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise bad(f'its header is not JSON ({e})') from None
  if not isinstance(header, dict):
    raise bad('its header is not a JSON object')
  header.pop('__metadata__', None)
  data = size - 8 - length
  for name, entry in header.items():
    _check_entry(name, entry, data, bad)
  return header, 8 + length


def _check_entry(name: str, entry, data: int, bad) -> None:
  """One tensor's dtype, shape and offsets: a known dtype, whole byte ranges inside the data."""
  if not isinstance(entry, dict) or entry.get('dtype') not in ITEMSIZE:
    raise bad(f'tensor {name!r} has dtype {getattr(entry, "get", lambda k: None)("dtype")!r}, '
              f'not one of {sorted(ITEMSIZE)}')
  shape, offsets = entry.get('shape'), entry.get('data_offsets')
  if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
      or not isinstance(offsets, list) or len(offsets) != 2
      or not all(isinstance(o, int) for o in offsets)):
    raise bad(f'tensor {name!r} has shape {shape!r} and offsets {offsets!r}')
  begin, end = offsets
  need = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[entry['dtype']]
  if not 0 <= begin <= end <= data or end - begin != need:
    raise bad(f'tensor {name!r} ({entry["dtype"]} {shape}, {need} bytes) claims bytes '
              f'{begin}..{end} of the {data} the file holds')


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
      pickles = [n for n in os.listdir(directory) if n.endswith(('.bin', '.pt', '.pth'))]
      if not files and pickles:
        raise ConfigError(f'{directory} holds only PyTorch pickles ({", ".join(sorted(pickles))}'
                          f'), which moejax never unpickles: convert them to safetensors first '
                          f'(transformers: model.save_pretrained(DIR, safe_serialization=True)).')
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

  def dtype(self, name: str) -> str:
    return self.entries[name][1]['dtype']

  def get(self, name: str, row: int | None = None,
          span: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor, its `row` along the first axis alone, or its rows span[0]:span[1] (only
    those bytes are read): floats in float32, uint8 (MXFP4 blocks and scales) as stored."""
    path, entry, start = self.entries[name]
    kinds = {**_NUMPY, **_RAW}
    if entry['dtype'] not in kinds:
      raise ConfigError(f'{name} in {path} has dtype {entry["dtype"]}; moejax reads '
                        f'{sorted(kinds)}.')
    dtype = np.dtype(kinds[entry['dtype']])
    begin, end = entry['data_offsets']
    shape = list(entry['shape'])
    if row is not None or span is not None:
      lo, hi = (row, row + 1) if span is None else span
      step = (end - begin) // shape[0]
      begin, end = begin + lo * step, begin + hi * step
      shape = shape[1:] if span is None else [hi - lo] + shape[1:]
    count = (end - begin) // dtype.itemsize
    if entry['dtype'] in _RAW:
      return np.fromfile(path, dtype=dtype, count=count, offset=start + begin).reshape(shape)
    out = np.empty(count, np.float32)          # filled in pieces: never two copies whole
    piece = READ_PIECE // dtype.itemsize
    with open(path, 'rb') as f:
      for at in range(0, count, piece):
        n = min(piece, count - at)
        f.seek(start + begin + at * dtype.itemsize)
        out[at:at + n] = np.fromfile(f, dtype=dtype, count=n)
    return out.reshape(shape)


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
  """Safetensors shards of at most `max_bytes`, laid out before anything is written: every
  tensor's name and shape is known up front (the weight-name table), so each shard's header is
  written first and each tensor goes straight to its place in its file when it arrives. Host
  memory holds one tensor at a time."""

  def __init__(self, directory: str, specs: list[tuple[str, tuple[int, ...]]], max_bytes: int,
               dtype: str):
    os.makedirs(directory, exist_ok=True)
    self.directory, self.dtype = directory, np.dtype(DTYPES[dtype])
    code = {v: k for k, v in _NUMPY.items()}[DTYPES[dtype]]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
      nbytes = int(np.prod(shape)) * self.dtype.itemsize
      if shards[-1] and size + nbytes > max_bytes:
        shards.append([])
        size = 0
      shards[-1].append((name, shape))
      size += nbytes
    count = len(shards)
    self.files = [('model.safetensors' if count == 1 else
                   f'model-{i + 1:05d}-of-{count:05d}.safetensors') for i in range(count)]
    self.place: dict[str, tuple[str, int, tuple[int, ...]]] = {}
    self.total = 0
    for file, shard in zip(self.files, shards):
      header, offset = {'__metadata__': {'format': 'pt'}}, 0
      for name, shape in shard:
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        header[name] = {'dtype': code, 'shape': list(shape), 'data_offsets': [offset, offset + nbytes]}
        offset += nbytes
      text = json.dumps(header, separators=(',', ':')).encode()
      text += b' ' * (-len(text) % 8)                                   # 8-byte aligned data
      path = os.path.join(directory, file + '.tmp')
      with open(path, 'wb') as f:
        f.write(len(text).to_bytes(8, 'little') + text)
        f.truncate(8 + len(text) + offset)
      for name, shape in shard:
        self.place[name] = (path, 8 + len(text) + header[name]['data_offsets'][0], tuple(shape))
      self.total += offset
    self.written: set = set()             # names written whole or every row; (name, row, span)
    self.rows: dict[str, int] = {}        # rows written so far of tensors written by rows

  def add(self, name: str, array: np.ndarray, row: int | None = None,
          span: tuple[int, int] | None = None) -> None:
    """Writes tensor `name`, its `row` along the first axis, or its rows span[0]:span[1] (every
    row once, by rows or by spans)."""
    path, offset, shape = self.place[name]
    want = (shape if row is None and span is None else shape[1:] if span is None
            else (span[1] - span[0],) + shape[1:])
    key = name if row is None and span is None else (name, row, span)
    if tuple(array.shape) != want or key in self.written:
      raise ValueError(f'{name}: shape {array.shape} (planned {want}) or written twice')
    if row is not None or span is not None:
      offset += (row if span is None else span[0]) * int(np.prod(shape[1:])) * \
          self.dtype.itemsize
    rows = max(1, READ_PIECE // max(1, array[:1].size * self.dtype.itemsize)) if array.ndim else 1
    with open(path, 'r+b') as f:      # converted in pieces: no whole copy of a large tensor
      f.seek(offset)
      for lo in range(0, max(1, len(array) if array.ndim else 1), rows):
        piece = array[lo:lo + rows] if array.ndim else array
        f.write(np.ascontiguousarray(piece, dtype=self.dtype).tobytes())
    self.written.add(key)
    if key != name:
      self.rows[name] = self.rows.get(name, 0) + (1 if span is None else span[1] - span[0])
      if self.rows[name] == shape[0]:
        self.written.add(name)

  def finish(self) -> list[str]:
    """Renames the complete shards into place and writes the index; returns the files."""
    left = sorted(set(self.place) - self.written)
    if left:
      raise ValueError(f'tensors never written: {left[:5]}')
    for file in self.files:
      os.replace(os.path.join(self.directory, file + '.tmp'), os.path.join(self.directory, file))
    if len(self.files) > 1:
      weight_map = {name: os.path.basename(path)[:-len('.tmp')]
                    for name, (path, _, _) in self.place.items()}
      with open(os.path.join(self.directory, INDEX), 'w') as f:
        json.dump({'metadata': {'total_size': self.total}, 'weight_map': weight_map}, f, indent=2)
    return list(self.files)
