"""A random Hugging Face checkpoint of an open family at its published widths (the first N
layers), written locally to measure conversions at real size (nothing is downloaded).

  python -m moejax.perf.random_hf --config=configs/olmoe.py:1b-7b --layers=4 --out=/tmp/olmoe_random

Tensors are drawn one at a time and written into place in 5 GB shards (host memory: about one
tensor).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags


def write(config, out: str, layers: int, dtype: str) -> int:
  """Writes the checkpoint; returns its bytes."""
  import dataclasses

  from moejax import config as config_lib
  from moejax.convert import families, mapping
  from moejax.convert.hf import hf_shapes
  from moejax.convert.safetensors_io import Writer
  m = config_lib.model_config(config)
  if layers:
    m = dataclasses.replace(m, num_blocks=layers)
  family = families.FAMILIES[m.family]
  rng = np.random.default_rng(0)
  table = mapping.rules(m, family)
  shapes = hf_shapes(table, m)
  uses = list(mapping.uses(table, m))
  names = list(dict.fromkeys(n for use in uses for n in use.names))   # fused: once
  writer = Writer(out, [(n, shapes[n]) for n in names], 5 * 10**9, dtype)
  for use in uses:   # a fused tensor row by row (one expert at a time)
    for name in use.names:
      shape = shapes[name] if use.row is None else shapes[name][1:]
      writer.add(name, 0.02 * rng.standard_normal(shape, dtype=np.float32), use.row)
  writer.finish()
  hf = families.hf_config(family, m)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  return writer.total


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program (tests import `write`)."""
  flags.DEFINE_string('config', None,
                      'A family config with its variant, e.g. configs/olmoe.py:1b-7b.')
  flags.DEFINE_integer('layers', 0, 'Layers to write (0: all).')
  flags.DEFINE_string('out', None, 'Directory to write.')
  flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Tensor dtype.')
  flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  del argv
  import importlib.util
  path, _, arg = flags.FLAGS.config.partition(':')
  spec = importlib.util.spec_from_file_location('family_config', path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.getcwd())
  spec.loader.exec_module(module)
  start = time.time()
  size = write(module.get_config(arg or None), flags.FLAGS.out, flags.FLAGS.layers,
               flags.FLAGS.dtype)
  print(f'Wrote {size / 2**30:.2f} GiB to {flags.FLAGS.out} in {time.time() - start:.0f} s.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
