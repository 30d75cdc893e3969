"""The device-memory check: a compiled step that cannot fit stops before anything is allocated."""
from __future__ import annotations

import jax

from moejax.errors import DeviceMemoryError


def check_memory(compiled, mesh) -> None:
  """Stops before allocation when the step's per-device need exceeds what the device has."""
  analysis = compiled.memory_analysis()
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if analysis is None or not stats or 'bytes_limit' not in stats:
    return                                              # e.g. CPU: no per-device limit
  need = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes -
          analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  have = stats['bytes_limit']
  if need > have:
    raise DeviceMemoryError(
        f'The train step needs {need / 2**30:.2f} GiB per device (arguments '
        f'{analysis.argument_size_in_bytes / 2**30:.2f}, temporaries '
        f'{analysis.temp_size_in_bytes / 2**30:.2f}) but {device.device_kind} has '
        f'{have / 2**30:.2f} GiB: use more devices (mesh.tp/mesh.pp), fewer micro-batch '
        f'sequences (data.micro_batch_size), model.dtype=bfloat16, or a stricter '
        f'pipeline.remat_policy.')
