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
  plan: Any           # moejax.train.plan.Plan of the config's mesh
  params: Any         # training layout, sharded on plan.mesh


def restore(workdir: str, config: ml_collections.ConfigDict, step: int) -> Restored:
  """The checkpoint's params re-sharded onto config's mesh (config validated first)."""
  from moejax.train.checkpoint import Checkpointer
  from moejax.train.plan import Plan
  plan = Plan(config)
  return Restored(plan, Checkpointer(workdir, plan).restore(step).params)
