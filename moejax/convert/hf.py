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

import dataclasses
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
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

# The tensors of an MXFP4 checkpoint stored as bytes (moejax.convert.mxfp4).
QUANTIZED = ('_blocks', '_scales')

# moejax parameters with no Hugging Face counterpart: they start at their init on import.
MOEJAX_ONLY = {('blocks', 'moe', 'select_bias')}


def canonical_shapes(m: ModelConfig) -> dict[Path, tuple[int, ...]]:
  tree = jax.eval_shape(lambda k: params_lib.init_canonical(m, k), jax.random.key(0))
  return {tuple(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


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
  shapes = canonical_shapes(dataclasses.replace(m, num_blocks=1))
  out = {}
  for rule in table:
    skip = {'model': 0, 'block': 1, 'expert': 2}[rule.scope]
    hf = [a.shape for a in rule.to_hf(tuple(np.zeros(shapes[p][skip:], np.float32)
                                            for p in rule.paths))]
    for use in mapping.uses([rule], m):
      out.update(zip(use.names, hf))
  return out


def _check(reader: Reader, table: list[mapping.Rule], m: ModelConfig,
           shapes: dict[Path, tuple[int, ...]]) -> list[str]:
  """Problems of a checkpoint against the table, from its headers alone: missing, misshaped,
  extra or twice-used tensors, parameters not filled exactly once."""
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
    missing += absent
    misshaped += wrong
    for n in use.names:
      used[n] = used.get(n, 0) + 1
    for path in rule.paths:
      count = filled.setdefault(path, np.zeros(shapes[path][:len(use.index)], np.int32))
      count[use.index] += 1
  extra = sorted(names - set(used))
  twice = sorted(n for n, c in used.items() if c > 1)
  unfilled = ['/'.join(p) for p in shapes
              if p not in MOEJAX_ONLY and not (p in filled and np.all(filled[p] == 1))]
  problems = [(f'missing tensors: {_listing(missing)}' if missing else ''),
              (f'tensors of the wrong shape: {_listing(misshaped)}' if misshaped else ''),
              (f'tensors moejax has no place for: {_listing(extra)}' if extra else ''),
              (f'tensors used twice: {_listing(twice)}' if twice else ''),
              (f'parameters not filled exactly once: {_listing(unfilled)}' if unfilled else '')]
  return [p for p in problems if p]


def is_quantized(hf_dir: str) -> bool:
  """Whether a checkpoint stores experts as MXFP4 blocks and scales."""
  return any(n.endswith(QUANTIZED) for n in Reader(hf_dir).names())


def stream_params(hf_dir: str, m: ModelConfig, family: families.Family
                  ) -> Iterator[tuple[Path, np.ndarray, str]]:
  """(path, canonical float32 array, scope) of every parameter, one rule's arrays at a time,
  after the whole checkpoint was checked against the table (ConfigError naming what is wrong).
  scope: the rule's ('model', 'block' or 'expert')."""
  reader = Reader(hf_dir)
  fused = any(n.endswith('experts.gate_up_proj') for n in reader.names())
  quantized = any(n.endswith(QUANTIZED) for n in reader.names())
  table = mapping.rules(m, family, fused_experts=fused, quantized=quantized)
  shapes = canonical_shapes(m)
  problems = _check(reader, table, m, shapes)
  if problems:
    raise ConfigError(f'{hf_dir} does not hold a {family.name} model matching its config.json '
                      f'({m.num_blocks} layers, {m.num_experts} experts): ' +
                      '; '.join(problems) + '. Nothing was written.')
  for rule in table:
    arrays = {p: np.zeros(shapes[p], np.float32) for p in rule.paths}
    for use in mapping.uses([rule], m):
      values = rule.to_moejax(tuple(reader.get(n) for n in use.names))
      for path, value in zip(rule.paths, values):
        target = arrays[path][use.index]
        target[tuple(slice(0, n) for n in value.shape)] = value   # padded vocabulary rows: zero
    yield from ((path, array, rule.scope) for path, array in arrays.items())
    del arrays
  for path in MOEJAX_ONLY & set(shapes):   # no Hugging Face counterpart: their init (zeros)
    yield path, np.zeros(shapes[path], np.float32), 'block'


def load_params(hf_dir: str, m: ModelConfig, family: families.Family) -> dict[str, Any]:
  """Canonical params (numpy float32, blocks [NB, ...]) from a checkpoint directory, whole."""
  return _nest({path: array for path, array, _ in stream_params(hf_dir, m, family)})


def imported_config(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """The model and moe sections of an imported checkpoint (what init_from compares)."""
  sections = families.sections(hf)
  return ml_collections.ConfigDict({k: dict(v) for k, v in sections.items()})


def _save_context(scope: str):
  """How an imported array is written: nothing changes it meanwhile, so Orbax need not copy it
  first; float32 weights barely compress; OCDBT would buffer all its chunks until the commit
  (each of these doubles the peak); chunks of at most 64 MiB cut along blocks, then experts,
  first, so export reads a block's (an expert's) slice from its own chunks."""
  from orbax.checkpoint.experimental import v1 as ocp_v1
  context = ocp_v1.Context()
  context.memory.deepcopy_host_arrays = False
  context.array.saving.use_compression = False
  context.array.saving.use_ocdbt = False
  context.array.saving.storage_options.chunk_byte_size = CHUNK
  # Orbax cuts the listed axes to single entries first (a whole-model array: no such axis).
  context.array.saving.storage_options.shard_axes = {'model': (), 'block': (0,),
                                                     'expert': (0, 1)}[scope]
  return context


def import_checkpoint(hf_dir: str, workdir: str) -> str:
  """Writes <workdir>/checkpoints/0 (params and config) from a transformers checkpoint, one
  parameter array at a time (Orbax partial saves, finalised into one tree); returns the
  checkpoint directory. It appears under its step number only when complete."""
  from orbax.checkpoint.experimental import v1 as ocp_v1
  hf = families.read_hf_config(hf_dir)
  family = families.family_of(hf)
  config = imported_config(hf)
  m = config_lib.model_config(config)
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory)):
    raise ConfigError(f'{directory} already holds checkpoints; import into a new --workdir.')
  leaves = stream_params(hf_dir, m, family)
  first = next(leaves)                                   # the whole checkpoint is checked here
  tmp = os.path.join(directory, '0.import-tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, 'config'))
  for path, array, scope in itertools.chain([first], leaves):
    with _save_context(scope):
      ocp_v1.partial.save(os.path.join(tmp, 'params'), _nest({path: array}))
    del array
  ocp_v1.partial.finalize(os.path.join(tmp, 'params'))
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
  writer = Writer(out_dir, [(n, shapes[n]) for use in mapping.uses(table, m) for n in use.names],
                  max_shard_bytes, dtype)
  for rule in table:
    arrays = [_open_array(item_dir, prefix + p) for p in rule.paths]
    for use in mapping.uses([rule], m):
      slices = tuple(np.asarray(a[use.index], np.float32) for a in arrays)
      for n, a in zip(use.names, rule.to_hf(slices)):
        writer.add(n, a)
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
