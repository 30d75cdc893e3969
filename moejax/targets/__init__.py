"""Compile targets: this machine's own backend ('cpu'), or N abstract NVIDIA GPUs of one card.

A GPU target compiles the real GPU program (scheduled, async collectives, cuBLAS / Triton GEMMs)
on a machine without a GPU, from the card's description in `<name>.txtpb` (XLA's GPU
target-config text format: SM count, clocks, memory size and bandwidth, compute capability).
Only jax[cuda12]'s compiler plugin is needed, not a driver or a device.
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple

from moejax.errors import ConfigError

GPUS = ('h100', 'a100', 'h200')
TARGETS = ('cpu',) + GPUS
GPUS_PER_HOST = 8
INSTALL = 'pip install -r requirements.txt -r requirements-cuda12.txt'


def config_text(name: str) -> str:
  """The target-config text of GPU `name`."""
  with open(os.path.join(os.path.dirname(__file__), f'{name}.txtpb')) as f:
    return f.read()


def card_name(name: str) -> str:
  """The card as its target config names it (device_description_str)."""
  for line in config_text(name).splitlines():
    if line.startswith('device_description_str'):
      return line.split('"')[1]
  return name


class Rates(NamedTuple):
  """A card's rates for estimating a step's time (comment lines `# moejax KEY: VALUE` of its
  target file, each with its source), and its memory."""
  bf16_flops_per_s: float
  nvlink_bytes_per_s: float      # one direction, per GPU, inside a host
  network_bytes_per_s: float     # one direction, per GPU, between hosts
  f32_flops_per_s: float         # float32 without tensor cores (matmuls XLA keeps in f32)
  hbm_bytes_per_s: float         # device memory bandwidth
  memory_bytes: int


def rates(name: str) -> Rates:
  """The rates of GPU `name` from its target file."""
  text = config_text(name)
  found = dict(re.findall(r'^# moejax (\w+): (\S+)$', text, re.M))
  memory = re.search(r'device_memory_size: (\d+)', text)
  missing = [f for f in Rates._fields[:-1] if f not in found]
  if missing or not memory:
    raise ConfigError(f'moejax/targets/{name}.txtpb lacks {missing or "device_memory_size"}.')
  return Rates(*(float(found[f]) for f in Rates._fields[:-1]), int(memory.group(1)))


def cuda_available() -> bool:
  """Whether JAX's CUDA 12 plugin (which holds the GPU compiler) is installed."""
  import importlib.util
  try:
    return importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
  except ModuleNotFoundError:
    return False


def prepare(name: str) -> None:
  """Checks the target and, for a GPU, that the CUDA compiler plugin is installed; must run
  before JAX's first use (the plugin then registers without a driver)."""
  if name not in TARGETS:
    raise ConfigError(f'--target={name!r}: expected one of {", ".join(TARGETS)}.')
  if name == 'cpu':
    return
  if not cuda_available():
    raise ConfigError(f'--target={name} compiles the GPU program and needs JAX\'s CUDA 12 '
                      f'compiler plugin (no GPU needed); install it with: {INSTALL}')
  os.environ['JAX_SKIP_CUDA_CONSTRAINTS_CHECK'] = '1'
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')   # run nothing on a GPU; only compile for one


def devices(name: str, count: int) -> list:
  """`count` abstract devices of GPU `name`, 8 per host (an HGX node), for ahead-of-time
  compilation only: nothing can run on them."""
  from jax.experimental import topologies
  per_host = min(count, GPUS_PER_HOST)
  if count % per_host:
    raise ConfigError(f'{count} devices do not fill hosts of {GPUS_PER_HOST} GPUs; use a mesh '
                      f'of at most 8 devices or a multiple of 8.')
  topology = topologies.get_topology_desc(
      platform='cuda', target_config=config_text(name), topology=f'1x{count // per_host}x{per_host}')
  return list(topology.devices)
