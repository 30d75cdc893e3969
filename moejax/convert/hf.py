"""Hugging Face checkpoints in and out.

`import_checkpoint`: a transformers checkpoint of an open family -> a params-only moejax
checkpoint (<workdir>/checkpoints/0/{params, config}) that a run loads with init_from. The
checkpoint is checked first from its headers (every tensor used exactly once, every parameter
filled exactly once); then each canonical parameter array is filled from its tensors and written
before the next is read (host memory: about one parameter array, not the model).
`export_checkpoint`: any moejax checkpoint of such a family (from any mesh) -> safetensors shards,
their index and config.json, reading one block's (or expert's) slice at a time and writing each
tensor into its place in its shard.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from moejax import config as config_lib
from moejax.config import ModelConfig
from moejax.convert import families, mapping
from moejax.convert.safetensors_io import Reader, Writer
from moejax.errors import ConfigError
from moejax.model import params as params_lib
from moejax import checkpoint_dir

Path = tuple[str, ...]

CHUNK = 64 * 2**20   # bytes per stored chunk of an imported array
IN_FLIGHT = 4        # slices an import writes while it reads the next

# The tensors of an MXFP4 checkpoint stored as bytes (moejax.convert.mxfp4).
QUANTIZED = ('_blocks', '_scales')

# moejax parameters with no Hugging Face counterpart: they start at their init on import.
MOEJAX_ONLY = {('blocks', 'moe', 'select_bias'), ('mtp', 'block', 'moe', 'select_bias')}


def _nest(flat: dict[Path, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _listing(names: list[str], limit: int = 8) -> str:
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def hf_shapes(table: list[mapping.Rule], m: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The shape of every Hugging Face tensor of model m, from the table itself (each rule's hook
  applied to one application's worth of zeros)."""
  shapes = params_lib.canonical_shapes(dataclasses.replace(m, num_blocks=1))
  out = {}
  for rule in table:
    skip = {'model': 0, 'block': 1, 'expert': 2}[rule.scope]
    hf = [a.shape for a in rule.to_hf(tuple(np.zeros(shapes[p][skip:], np.float32)
                                            for p in rule.paths))]
    if rule.rows:                        # one application is one expert's row
      hf = [(m.num_experts,) + tuple(shape) for shape in hf]
    for use in mapping.uses([rule], m):
      out.update(zip(use.names, hf))
  return out


def mtp_tensors(reader: Reader, m: ModelConfig, family: families.Family) -> list[str]:
  """A DeepSeek-V3 checkpoint's multi-token-prediction tensors the import leaves out: its layers
  past the model's and its model.mtp_depth depths (each depth's copies of the token table and
  LM head, embed_tokens and shared_head.head, too: they are the model's)."""
  if not family.latent:
    return []
  layers = m.num_layers
  match = lambda n: re.match(r'model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)?', n)
  return [n for n in reader.names() if match(n) and (
      int(match(n).group(1)) >= layers + m.mtp_depth or
      (int(match(n).group(1)) >= layers and match(n).group(2)))]


def with_mtp_found(config: ml_collections.ConfigDict, reader: Reader
                   ) -> tuple[ml_collections.ConfigDict, str]:
  """The imported config with model.mtp_depth 0 where config.json names MTP modules that the
  checkpoint does not hold (transformers saves none), and a note saying so ('' otherwise)."""
  m = config_lib.model_config(config)
  if not m.mtp_depth or any(n.startswith(f'model.layers.{m.num_layers}.eh_proj')
                            for n in reader.names()):
    return config, ''
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.mtp_depth = 0
  return config, (f'config.json names {m.mtp_depth} multi-token-prediction module(s) that the '
                  'checkpoint does not hold: imported without (model.mtp_depth=N on a '
                  'fine-tune starts them fresh).')


def _check(reader: Reader, table: list[mapping.Rule], m: ModelConfig,
           shapes: dict[Path, tuple[int, ...]], ignored: list[str] = ()) -> list[str]:
  """Problems of a checkpoint against the table, from its headers alone: missing, misshaped,
  extra (beyond `ignored`) or twice-used tensors, parameters not filled exactly once."""
  names = set(reader.names())
  used: dict[str, int] = {}
  filled: dict[Path, np.ndarray] = {}
  missing, misshaped = [], []
  expected = hf_shapes(table, m)
  for use in mapping.uses(table, m):
    rule = use.rule
    absent = [n for n in use.names if n not in names]
    wrong = [f'{n} {list(reader.shape(n))} (expected {list(expected[n])})'
             for n in use.names if n in names and reader.shape(n) != expected[n]]
    wrong += [f'{n} of dtype {reader.dtype(n)} (expected {"U8" if packed else "a float"})'
              for n in use.names if n in names
              and (reader.dtype(n) == 'U8') != (packed := n.endswith(QUANTIZED))]
    if use.row:                          # a tensor's later rows: checked at its row 0
      absent = wrong = []
    missing += absent
    misshaped += wrong
    for n in use.names:
      used[n] = used.get(n, 0) + (use.row is None or use.row == 0)
    for path in rule.paths:
      count = filled.setdefault(path, np.zeros(shapes[path][:len(use.index)], np.int32))
      count[use.index] += 1
  extra = sorted(names - set(used) - set(ignored))
  twice = sorted(n for n, c in used.items() if c > 1)
  unfilled = ['/'.join(p) for p in shapes
              if p not in MOEJAX_ONLY and not (p in filled and np.all(filled[p] == 1))]
  problems = [(f'missing tensors: {_listing(missing)}' if missing else ''),
              (f'tensors of the wrong shape: {_listing(misshaped)}' if misshaped else ''),
              (f'tensors moejax has no place for: {_listing(extra)}' if extra else ''),
              (f'tensors used twice: {_listing(twice)}' if twice else ''),
              (f'parameters not filled exactly once: {_listing(unfilled)}' if unfilled else '')]
  return [p for p in problems if p]


def import_notes(hf_dir: str) -> list[str]:
  """What an import of hf_dir changed or left out, one sentence each."""
  hf = families.read_hf_config(hf_dir)
  family, reader = families.family_of(hf), Reader(hf_dir)
  notes = []
  if any(n.endswith(QUANTIZED) for n in reader.names()):
    notes.append('The MXFP4 experts were dequantized to float32.')
  config, missing = with_mtp_found(imported_config(hf), reader)
  m = config_lib.model_config(config)
  layers = m.num_layers + m.mtp_depth
  mtp = [n for n in mtp_tensors(reader, m, family) if int(n.split('.')[2]) >= layers]
  if missing:
    notes.append(missing)
  if mtp:
    notes.append(f'Left out the {len(mtp)} tensors of the multi-token-prediction module '
                 f'({mtp[0]}, ...); model.mtp_depth=N trains new ones.')
  return notes


def checked_table(hf_dir: str, m: ModelConfig, family: families.Family
                  ) -> tuple[Reader, list[mapping.Rule]]:
  """The checkpoint's reader and weight-name table, after the whole checkpoint was checked
  against the table from its headers (a ConfigError naming what is wrong)."""
  reader = Reader(hf_dir)
  fused = any(n.endswith('experts.gate_up_proj') for n in reader.names())
  quantized = any(n.endswith(QUANTIZED) for n in reader.names())
  table = mapping.rules(m, family, fused_experts=fused, quantized=quantized)
  problems = _check(reader, table, m, params_lib.canonical_shapes(m),
                    mtp_tensors(reader, m, family))
  if problems:
    raise ConfigError(f'{hf_dir} does not hold a {family.name} model matching its config.json '
                      f'({m.num_blocks} layers, {m.num_experts} experts): ' +
                      '; '.join(problems) + '. Nothing was written.')
  return reader, table


def vocab_rows(m: ModelConfig) -> int:
  """Vocabulary entries a conversion moves at a time: one stored chunk's worth."""
  return max(1, CHUNK // (4 * m.d_model))


def stream_slices(reader: Reader, table: list[mapping.Rule], m: ModelConfig
                  ) -> Iterator[tuple[Path, mapping.Use, np.ndarray]]:
  """(path, application, float32 value) of every parameter slice the checkpoint fills (a
  whole array, a block's or an expert's; a vocabulary table's real rows in spans of
  vocab_rows), one application at a time: host memory holds one application's tensors (the
  caller drops each value before asking for the next)."""
  for use in mapping.pieces(table, m, vocab_rows(m)):
    values = use.rule.to_moejax(tuple(reader.get(n, use.row, use.span) for n in use.names))
    for path, value in zip(use.rule.paths, values):
      yield path, use, np.asarray(value, np.float32)
    del values, value


def load_params(hf_dir: str, m: ModelConfig, family: families.Family) -> dict[str, Any]:
  """Canonical params (numpy float32, blocks [NB, ...]) from a checkpoint directory, whole."""
  shapes = params_lib.canonical_shapes(m)
  arrays = {p: np.zeros(s, np.float32) for p, s in shapes.items()}   # MOEJAX_ONLY: zeros
  for path, use, value in stream_slices(*checked_table(hf_dir, m, family), m):
    arrays[path][use.region(value.shape)] = value
  return _nest(arrays)


def _zero_padding(target, index: tuple[int, ...], shape: tuple[int, ...]) -> None:
  """Writes zeros where a slice of `shape` at `index` leaves target's slice unfilled (padded
  vocabulary rows or columns; with shape (): the whole array): Orbax restores no array with
  chunks never written."""
  full = target.shape[len(index):]
  shape = shape or (0,) + tuple(full[1:])
  for axis, (have, want) in enumerate(zip(shape, full)):
    if have < want:
      where = index + tuple(slice(0, n) for n in full[:axis]) + (slice(have, want),)
      target[where].write(np.zeros(full[:axis] + (want - have,) + full[axis + 1:],
                                   np.float32)).result()


def imported_config(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """The model and moe sections of an imported checkpoint (what init_from compares)."""
  sections = families.sections(hf)
  return ml_collections.ConfigDict({k: dict(v) for k, v in sections.items()})


def chunk_shape(shape: tuple[int, ...], lead: int, itemsize: int = 4,
                vocab: tuple[int, int] | None = None) -> tuple[int, ...]:
  """Chunks of a stored array written in slices of its `lead` leading axes (0: whole; 1: a
  block's; 2: an expert's): those axes cut to single entries, then further leading axes until
  a chunk holds at most CHUNK bytes, so each slice is written (and read back) as whole chunks
  of its own, never read and rewritten. vocab: (axis, rows) of a vocabulary table, written in
  spans of that many rows: chunks of one span."""
  if vocab is not None:
    return tuple(min(vocab[1], n) if axis == vocab[0] else n for axis, n in enumerate(shape))
  chunk = [1] * lead + list(shape[lead:])
  for axis in range(lead, len(shape)):
    if math.prod(chunk) * itemsize <= CHUNK:
      break
    rest = math.prod(chunk[axis + 1:]) * itemsize
    chunk[axis] = max(1, min(chunk[axis], CHUNK // max(rest, 1)))
  return tuple(max(c, 1) for c in chunk)


def _create_array(leaf_dir: str, shape: tuple[int, ...], chunk: tuple[int, ...]):
  """An empty float32 zarr3 array (zeros) of `shape` at leaf_dir, as Orbax stores an array, in
  chunks of `chunk`."""
  import tensorstore as ts
  spec = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': leaf_dir},
          'metadata': {'shape': list(shape), 'data_type': 'float32', 'fill_value': 0.0,
                       'chunk_grid': {'name': 'regular',
                                      'configuration': {'chunk_shape': list(chunk)}},
                       'codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}}]}}
  return ts.open(spec, create=True, delete_existing=True).result()


def _tree_metadata(params_dir: str, shapes: dict[Path, tuple[int, ...]]) -> None:
  """Orbax's tree of params at params_dir, each leaf a placeholder that _create_array then
  replaces with the real array (Orbax's metadata records no shapes: a restore reads each
  array's own zarr.json)."""
  from orbax.checkpoint.experimental import v1 as ocp_v1
  context = ocp_v1.Context()
  context.array.saving.use_ocdbt = False
  with context:
    ocp_v1.save(params_dir, _nest({p: np.zeros((1,) * len(s), np.float32)
                                          for p, s in shapes.items()}))


def import_checkpoint(hf_dir: str, workdir: str) -> str:
  """Writes <workdir>/checkpoints/0 (params and config) from a transformers checkpoint;
  returns the checkpoint directory, which appears under its step number only when complete.
  Each rule application's slice (a block's, an expert's, a span of a vocabulary table's rows)
  is converted and written into its place in the stored array before the next is read: host
  memory holds a few slices, not a stacked array, a whole table or the model."""
  hf = families.read_hf_config(hf_dir)
  family = families.family_of(hf)
  config, _ = with_mtp_found(imported_config(hf), Reader(hf_dir))
  m = config_lib.model_config(config)
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if checkpoint_dir.complete_steps(directory):
    raise ConfigError(f'{directory} already holds checkpoints; import into a new --workdir.')
  reader, table = checked_table(hf_dir, m, family)
  shapes = params_lib.canonical_shapes(m)
  chunks = {p: chunk_shape(shapes[p], {'model': 0, 'block': 1, 'expert': 2}[rule.scope],
                          vocab=(None if rule.vocab_axis is None
                                 else (rule.vocab_axis, vocab_rows(m))))
            for rule in table for p in rule.paths}
  tmp = os.path.join(directory, '0.import-tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, 'config'))
  params_dir = os.path.join(tmp, 'params')
  _tree_metadata(params_dir, shapes)
  state = os.path.join(params_dir, 'state')
  arrays = {p: _create_array(os.path.join(state, '.'.join(p)), s,
                             chunks.get(p) or chunk_shape(s, 1))
            for p, s in shapes.items()}
  pending = collections.deque()        # writes in flight: at most IN_FLIGHT slices held
  written = set()
  for path, use, value in stream_slices(reader, table, m):
    pending.append(arrays[path][use.region(value.shape)].write(value))
    while len(pending) > (IN_FLIGHT if use.span is None else 0):   # a table's span: alone
      pending.popleft().result()
    written.add(path)
    if use.span is None:
      _zero_padding(arrays[path], use.index, value.shape)
    del value                            # before the next is read
  for write in pending:
    write.result()
  for rule in table:                     # a vocabulary table's padded rows
    for path in rule.paths if rule.vocab_axis is not None else ():
      full = list(shapes[path])
      full[rule.vocab_axis] = m.vocab_size
      _zero_padding(arrays[path], (), tuple(full))
  for path in set(arrays) - written:     # MOEJAX_ONLY: their init, zeros
    _zero_padding(arrays[path], (), ())
  with open(os.path.join(tmp, 'config', 'metadata'), 'w') as f:
    json.dump(config.to_dict(), f)
  os.rename(tmp, os.path.join(directory, '0'))
  return os.path.join(directory, '0')


def restore_array(item_dir: str, path: tuple[str, ...]) -> np.ndarray:
  """One array of a saved tree, restored alone into host memory."""
  leaf = ocp.RestoreArgs(restore_type=np.ndarray)
  item = restore = None
  for key in reversed(path):
    item = {key: 0 if item is None else item}
    restore = {key: leaf if restore is None else restore}
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore, partial_restore=True))
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


def _open_array(item_dir: str, path: tuple[str, ...]):
  """One saved array, opened for reading slices of it (a block's, an expert's): the
  tensorstore array Orbax wrote, else (another layout) the array restored whole."""
  import tensorstore as ts
  name = '.'.join(path)
  item = os.path.abspath(item_dir)
  specs = [   # an imported checkpoint: zarr3 arrays in files; a run's: zarr (v2) in OCDBT
      {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': os.path.join(item, name)}},
      {'driver': 'zarr', 'path': name, 'kvstore': {'driver': 'ocdbt', 'base': f'file://{item}'}}]
  for spec in specs:
    try:
      return _Slices(ts.open(spec, open=True, read=True).result())
    except Exception:
      continue
  return restore_array(item_dir, path)   # another layout: Orbax reads the array whole


class _Slices:
  """array[index] reads just that slice from disk."""

  def __init__(self, array):
    self.array = array

  def __getitem__(self, index):
    return self.array[index].read().result()


def exported_family(workdir: str, step: int = -1) -> families.Family:
  """The family a run's checkpoint exports as (a ConfigError where it has none)."""
  _, saved = checkpoint_dir.saved_config(workdir, step)
  name = saved.model.get('family', '') if 'model' in saved else ''
  families.check_exportable(families.FAMILIES.get(name), config_lib.model_config(saved))
  return families.FAMILIES[name]


def export_checkpoint(workdir: str, out_dir: str, step: int = -1, dtype: str = 'bfloat16',
                      max_shard_bytes: int = 5 * 10**9, tokenizer_dir: str = '') -> list[str]:
  """Writes a transformers checkpoint of a run's newest (or given) complete step; returns the
  files written."""
  family = exported_family(workdir, step)
  step, saved = checkpoint_dir.saved_config(workdir, step)
  m = config_lib.model_config(saved)
  item_dir, prefix = checkpoint_dir.params_item(os.path.join(workdir, 'checkpoints', str(step)))
  table = mapping.rules(m, family)
  shapes = hf_shapes(table, m)
  names = dict.fromkeys(n for use in mapping.uses(table, m) for n in use.names)  # fused: once
  writer = Writer(out_dir, [(n, shapes[n]) for n in names],
                  max_shard_bytes, dtype)
  for rule in table:
    arrays = [_open_array(item_dir, prefix + p) for p in rule.paths]
    for use in mapping.pieces([rule], m, vocab_rows(m)):
      slices = tuple(np.asarray(a[use.where()], np.float32) for a in arrays)
      for n, a in zip(use.names, rule.to_hf(slices)):
        writer.add(n, a, use.row, use.span)
      del slices, a                      # before the next is read
    del arrays
  files = writer.finish()
  hf = families.hf_config(family, m)
  hf['torch_dtype'] = hf['dtype'] = dtype
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  files.append('config.json')
  for tok in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, tok)):
      shutil.copy(os.path.join(tokenizer_dir, tok), os.path.join(out_dir, tok))
      files.append(tok)
  return files
