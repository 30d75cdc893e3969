"""The memory check: a compiled step that cannot fit stops before anything is allocated, on an
accelerator (its per-device limit) and on a CPU host (the local devices together, against the
memory the machine has available)."""
from __future__ import annotations

import os

import jax

from moejax.errors import DeviceMemoryError


def step_need(analysis) -> int:
  """Bytes one device holds at the step's peak: arguments, outputs not aliased, temporaries."""
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes -
          analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def host_available() -> int | None:
  """Bytes of memory this machine can still give (MemAvailable), or None where unknown."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return None


def check_memory(compiled, mesh) -> None:
  """Stops before allocation when the step's per-device need exceeds what the device has (on a
  CPU: the local devices' needs together exceed the host's available memory)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  device, need = local[0], step_need(analysis)
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'bytes_limit' in stats:
    have = stats['bytes_limit']
    if need > have:
      raise DeviceMemoryError(
          f'The train step needs {need / 2**30:.2f} GiB per device (arguments '
          f'{analysis.argument_size_in_bytes / 2**30:.2f}, temporaries '
          f'{analysis.temp_size_in_bytes / 2**30:.2f}) but {device.device_kind} has '
          f'{have / 2**30:.2f} GiB: use more devices (mesh.tp/mesh.pp), fewer micro-batch '
          f'sequences (data.micro_batch_size), model.dtype=bfloat16, or a stricter '
          f'pipeline.remat_policy.')
  elif device.platform == 'cpu':
    _check_host(need, len(local))


def _check_host(need: int, devices: int) -> None:
  have = host_available()
  if have is None or need * devices <= have:
    return
  raise DeviceMemoryError(
      f'The train step needs {need * devices / 2**30:.1f} GiB of host memory ({devices} '
      f'simulated CPU devices x {need / 2**30:.2f} GiB each) but this machine has '
      f'{have / 2**30:.1f} GiB available: on a CPU use the config\'s :tiny variant (e.g. '
      f'--config=configs/tp4pp4.py:tiny), fewer micro-batches (data.num_micro_batches) or '
      f'shorter sequences; the full model needs accelerators.')
