"""Process setup that must happen before JAX's first operation."""
from __future__ import annotations

import jax
import ml_collections


def setup_devices(config: ml_collections.ConfigDict) -> None:
  """On a CPU-only host, simulates as many devices as the mesh needs (and says so once)."""
  need = config.mesh.tp * config.mesh.pp
  jax.config.update('jax_num_cpu_devices', max(need, 1))  # affects the CPU backend only
  if jax.default_backend() == 'cpu' and need > 1:
    print(f'No accelerator found: simulating {need} CPU devices for the '
          f'{config.mesh.tp}x{config.mesh.pp} mesh (numbers are real, speed is not).',
          flush=True)
