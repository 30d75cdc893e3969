"""The training loop: build mesh and state, restore or init, step, log, checkpoint."""
from __future__ import annotations

import logging
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from moejax import config as config_lib, runtime
from moejax.data.source import Source, global_batch
from moejax.data.synthetic import SyntheticSource
from moejax.data.tokens import TokenSource
from moejax.parallel import mesh as mesh_lib
from moejax.train import metrics as metrics_lib
from moejax.train import optimizer, state as state_lib, step as step_lib
from moejax.train.checkpoint import Checkpointer


def make_source(config: ml_collections.ConfigDict) -> Source:
  """The configured token source (negative steps are its evaluation batches)."""
  d = config.data
  if d.source == 'tokens':
    return TokenSource(d.path, d.num_micro_batches, d.micro_batch_size, d.seq_len, config.seed,
                       config.model.vocab_size)
  return SyntheticSource(d.source, config.model.vocab_size, d.num_micro_batches,
                         d.micro_batch_size, d.seq_len, config.seed)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to config.num_steps; returns the last logged record."""
  config_lib.validate(config, jax.device_count())
  cfg, lay = config_lib.model_config(config), config_lib.layout(config)
  if jax.process_count() > 1 and lay.devices != jax.device_count():
    raise config_lib.ConfigError(
        f'mesh.dp * mesh.tp * mesh.pp = {lay.devices} but the {jax.process_count()} processes '
        f'have {jax.device_count()} devices together: a multi-process mesh must use every '
        f'device; change the mesh or the number of processes.')
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.mesh_for(lay)
  tx, sched = optimizer.make(config.optim), optimizer.schedule(config.optim)
  state_sh = state_lib.shardings(cfg, lay, tx, mesh)
  data_sharding = step_lib.batch_sharding(mesh)
  # Compile ahead of time from abstract inputs, and check memory before allocating anything.
  batch_abstract = jax.ShapeDtypeStruct(
      (lay.num_micro_batches, lay.micro_batch_size, lay.seq_len + 1), np.int32,
      sharding=data_sharding)
  train_step = step_lib.make_train_step(cfg, lay, tx, sched, mesh, state_sh, config.seed).lower(
      state_lib.abstract(cfg, lay, tx, mesh), batch_abstract).compile()
  check_memory(train_step, mesh)
  ckpt = Checkpointer(workdir, config, cfg, lay, tx, mesh, state_sh)
  state = _initial_state(config, ckpt, cfg, lay, tx, mesh)
  start = int(state.step)
  source = make_source(config)
  evaluate = make_eval(config, cfg, lay, mesh, state_sh.params, source, data_sharding)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  derived = config_lib.describe(config)
  logging.info('mesh dp=%d tp=%d pp=%d on %d %s devices in %d processes; %s', lay.dp, lay.tp,
               lay.pp, lay.devices, jax.devices()[0].platform, jax.process_count(), derived)

  preempted = _PreemptionFlag()
  profile = config_lib.profile_steps(config)
  record: dict = {}
  last_time, last_step = time.perf_counter(), start
  for step in range(start, config.num_steps):
    done = step + 1
    if profile and done == profile.start:
      jax.profiler.start_trace(os.path.join(workdir, 'profile'), create_perfetto_trace=True)
    batch = global_batch(source, step, data_sharding)
    state, metrics = train_step(state, batch)
    if profile and done == profile[-1]:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      if jax.process_index() == 0:
        print(f'Profiled steps {profile.start}-{profile[-1]} into {workdir}/profile '
              f'(open with TensorBoard\'s profile plugin or Perfetto).', flush=True)
    if config.checkpoint_every and done % config.checkpoint_every == 0:
      ckpt.save(state)
    if preempted.set:
      ckpt.save(state, force=True)
      ckpt.close()
      writer.close()
      print(f'SIGTERM: saved checkpoint at step {done} and stopped.', flush=True)
      return record
    if done % config.log_every == 0 or done == config.num_steps:
      metrics = jax.device_get(metrics)       # the only host sync: at log time
      now = time.perf_counter()
      seconds_per_step = max(now - last_time, 1e-9) / (done - last_step)
      tps = lay.tokens_per_step / seconds_per_step
      last_time, last_step = now, done
      record = metrics_lib.summarise(metrics, step=done, tokens_per_sec=tps)
      record['seconds_left'] = seconds_per_step * (config.num_steps - done)
      metrics_lib.check_finite(record)
      if jax.process_index() == 0:
        print(metrics_lib.format_line(record, total=config.num_steps), flush=True)
      writer.write(record)
    if config.eval_every and done % config.eval_every == 0:
      eval_record = dict(evaluate(state.params), step=done)
      if jax.process_index() == 0:
        print(metrics_lib.format_line(eval_record, prefix='eval'), flush=True)
      writer.write({'step': done, **{'eval_' + k: v for k, v in eval_record.items()
                                     if k != 'step'}})
  ckpt.save(state)
  ckpt.close()
  writer.close()
  preempted.restore()
  return record


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
    raise config_lib.ConfigError(
        f'The train step needs {need / 2**30:.2f} GiB per device (arguments '
        f'{analysis.argument_size_in_bytes / 2**30:.2f}, temporaries '
        f'{analysis.temp_size_in_bytes / 2**30:.2f}) but {device.device_kind} has '
        f'{have / 2**30:.2f} GiB: use more devices (mesh.tp/mesh.pp), fewer micro-batch '
        f'sequences (data.micro_batch_size), model.dtype=bfloat16, or a stricter '
        f'pipeline.remat_policy.')


def make_eval(config, cfg, lay, mesh, param_sharding, source, data_sharding):
  """Mean metrics over config.eval_batches fixed batches (steps -1, -2, ...)."""
  eval_step = step_lib.make_eval_step(cfg, lay, mesh, param_sharding)
  batches = [global_batch(source, -1 - i, data_sharding) for i in range(config.eval_batches)]

  def evaluate(params) -> dict:
    results = [jax.device_get(eval_step(params, b)) for b in batches]
    loss = float(np.mean([r['loss'] for r in results]))
    ce = float(np.mean([r['ce'] for r in results]))
    kept = np.sum([r['expert_load'] for r in results], axis=0)
    return {'loss': loss, 'ce': ce, 'ppl': float(np.exp(ce)),
            'dropped_frac': float(np.mean([r['dropped_frac'] for r in results])),
            'balance': metrics_lib.expert_balance(kept),
            'expert_share': metrics_lib.expert_share(kept)}
  return evaluate


def _initial_state(config, ckpt: Checkpointer, cfg, lay, tx, mesh) -> state_lib.TrainState:
  """Resume from the newest complete checkpoint; else init (optionally params from init_from)."""
  latest = runtime.agree(-1 if ckpt.latest_step() is None else ckpt.latest_step())
  if latest >= 0:
    state = ckpt.restore(latest)
    if jax.process_index() == 0:
      print(f'Resumed from {ckpt.directory}/{latest} (step {int(state.step)}).', flush=True)
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
