"""A trained run, or an imported checkpoint, reopened for inference: its saved config (an
import's model, with its family's CPU run settings), on a mesh of the caller's choice."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections


def open_config(workdir: str, step: int, tp: int, pp: int) -> tuple[int, ml_collections.ConfigDict]:
  """(step, config) of the run's checkpoint, laid out on tp x pp; sets up devices for it.

  Must run before JAX's first operation (it may simulate CPU devices).
  """
  from moejax import runtime
  step, config = inference_config(workdir, step, tp, pp)
  runtime.setup_devices(config)
  return step, config


def inference_config(workdir: str, step: int, tp: int, pp: int
                     ) -> tuple[int, ml_collections.ConfigDict]:
  """(step, config) of the run's checkpoint laid out on tp x pp (an import's model with its
  family's CPU run settings)."""
  from moejax.checkpoint_dir import saved_config
  step, config = saved_config(workdir, step)
  if 'mesh' not in config:          # moejax.cli.convert import: the model sections only
    config = _with_run_settings(config)
  config.mesh.tp, config.mesh.pp, config.mesh.dp = tp, pp, 1
  config.pipeline.repeats = 1
  return step, config


def _with_run_settings(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An imported model's sections inside its family's CPU-sized run settings (the config file
  configs/<family>.py:tiny, read from the working directory as --config reads it)."""
  from moejax.errors import ConfigError
  from moejax.perf import shapes
  family = model.model.get('family', '')
  path = os.path.join('configs', f'{family}.py')
  if not family or not os.path.isfile(path):
    raise ConfigError(f'An imported checkpoint of family {family!r} needs its run settings from '
                      f'{path}: run from the moejax repository root.')
  config = shapes.load(path, 'tiny')
  for section in model:
    config[section].update(model[section].to_dict())
  config.model.dtype = 'float32'
  config.moe.group_size = config.data.seq_len
  return config


@dataclasses.dataclass
class Restored:
  plan: Any           # moejax.train.plan.Plan of the config's mesh
  params: Any         # training layout, sharded on plan.mesh


def restore(workdir: str, config: ml_collections.ConfigDict, step: int) -> Restored:
  """The checkpoint's params re-sharded onto config's mesh (config validated first): a run's
  train state, or the params of an import."""
  from moejax.train.checkpoint import Checkpointer
  from moejax.train.plan import Plan
  plan = Plan(config)
  checkpoints = os.path.join(workdir, 'checkpoints')
  checkpointer = Checkpointer(workdir, plan)
  if os.path.isdir(os.path.join(checkpoints, str(step), 'params')):
    return Restored(plan, checkpointer.restore_params(checkpoints))
  return Restored(plan, checkpointer.restore(step).params)
