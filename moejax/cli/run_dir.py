"""A trained run reopened for inference: its saved config, on a mesh of the caller's choice."""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections


def open_config(workdir: str, step: int, tp: int, pp: int) -> tuple[int, ml_collections.ConfigDict]:
  """(step, config) of the run's checkpoint, laid out on tp x pp; sets up devices for it.

  Must run before JAX's first operation (it may simulate CPU devices).
  """
  from moejax import runtime
  from moejax.train.checkpoint import saved_config
  step, config = saved_config(workdir, step)
  config.mesh.tp, config.mesh.pp, config.mesh.dp = tp, pp, 1
  config.pipeline.repeats = 1
  runtime.setup_devices(config)
  return step, config


@dataclasses.dataclass
class Restored:
  config: ml_collections.ConfigDict
  cfg: Any            # ModelConfig
  lay: Any            # Layout
  mesh: Any
  param_sharding: Any
  params: Any


def restore(workdir: str, config: ml_collections.ConfigDict, step: int) -> Restored:
  """The checkpoint's params re-sharded onto config's mesh (config validated first)."""
  import jax
  from moejax import config as config_lib
  from moejax.parallel import mesh as mesh_lib
  from moejax.train import optimizer, state as state_lib
  from moejax.train.checkpoint import Checkpointer
  config_lib.validate(config, jax.device_count())
  cfg, lay = config_lib.model_config(config), config_lib.layout(config)
  mesh = mesh_lib.mesh_for(lay)
  tx = optimizer.make(config.optim)
  sh = state_lib.shardings(cfg, lay, tx, mesh)
  state = Checkpointer(workdir, config, cfg, lay, tx, mesh, sh).restore(step)
  return Restored(config, cfg, lay, mesh, sh.params, state.params)
