"""The training loop: build mesh and state, restore or init, step, log, checkpoint."""
from __future__ import annotations

import logging
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from moejax import config as config_lib
from moejax.data.synthetic import SyntheticSource
from moejax.parallel import mesh as mesh_lib
from moejax.train import metrics as metrics_lib
from moejax.train import optimizer, state as state_lib, step as step_lib
from moejax.train.checkpoint import Checkpointer


def make_source(config: ml_collections.ConfigDict) -> SyntheticSource:
  d = config.data
  return SyntheticSource(d.source, config.model.vocab_size, d.num_micro_batches,
                         d.micro_batch_size, d.seq_len, config.seed)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to config.num_steps; returns the last logged record."""
  config_lib.validate(config, jax.device_count())
  cfg, lay = config_lib.model_config(config), config_lib.layout(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.mesh_for(lay)
  tx, sched = optimizer.make(config.optim), optimizer.schedule(config.optim)
  state_sh = state_lib.shardings(cfg, lay, tx, mesh)
  ckpt = Checkpointer(workdir, config, cfg, lay, tx, mesh, state_sh)
  state = _initial_state(config, ckpt, cfg, lay, tx, mesh)
  start = int(state.step)
  train_step = step_lib.make_train_step(cfg, lay, tx, sched, mesh, state_sh, config.seed)
  source = make_source(config)
  data_sharding = step_lib.batch_sharding(mesh)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  derived = config_lib.describe(config)
  logging.info('mesh tp=%d pp=%d on %d %s devices; %s', lay.tp, lay.pp, lay.tp * lay.pp,
               jax.devices()[0].platform, derived)

  preempted = _PreemptionFlag()
  record: dict = {}
  last_time, last_step = time.perf_counter(), start
  for step in range(start, config.num_steps):
    batch = jax.device_put(source.batch(step), data_sharding)
    state, metrics = train_step(state, batch)
    done = step + 1
    if config.checkpoint_every and done % config.checkpoint_every == 0:
      ckpt.save(state)
    if preempted.set:
      ckpt.save(state, force=True)
      ckpt.close()
      print(f'SIGTERM: saved checkpoint at step {done} and stopped.', flush=True)
      return record
    if done % config.log_every == 0 or done == config.num_steps:
      metrics = jax.device_get(metrics)       # the only host sync: at log time
      now = time.perf_counter()
      tps = (done - last_step) * lay.tokens_per_step / max(now - last_time, 1e-9)
      last_time, last_step = now, done
      record = metrics_lib.summarise(metrics, step=done, tokens_per_sec=tps)
      metrics_lib.check_finite(record)
      if jax.process_index() == 0:
        print(metrics_lib.format_line(record), flush=True)
      writer.write(record)
  ckpt.save(state)
  ckpt.close()
  preempted.restore()
  return record


def _initial_state(config, ckpt: Checkpointer, cfg, lay, tx, mesh) -> state_lib.TrainState:
  """Resume from the newest complete checkpoint; else init (optionally params from init_from)."""
  if ckpt.latest_step() is not None:
    state = ckpt.restore()
    print(f'Resumed from {ckpt.directory}/{ckpt.latest_step()} (step {int(state.step)}).',
          flush=True)
    return state
  state = state_lib.create(cfg, lay, tx, mesh, config.seed)
  if config.init_from:
    source = config.init_from
    if os.path.isdir(os.path.join(source, 'checkpoints')):
      source = os.path.join(source, 'checkpoints')
    if not os.path.isdir(source):
      raise config_lib.ConfigError(f'init_from={config.init_from!r}: no such directory.')
    params = ckpt.restore(directory=source).params
    state = state.replace(params=params)
    print(f'Initialised params from {source} (optimizer state fresh, step 0).', flush=True)
  return state


class _PreemptionFlag:
  """Turns SIGTERM into a flag checked at step boundaries (save, then exit cleanly)."""

  def __init__(self):
    self.set = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.set = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)
