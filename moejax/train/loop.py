"""The training loop: a Plan of the config, restore or init, step, log, evaluate, checkpoint.

Nothing broken is saved: a step's loss and gradient norm (finite, loss below LOSS_BOUND x
ln(vocab)) and its updated params (finite) are checked before its checkpoint is written, and the
next step's loss confirms the saved params (one scalar read, on the step after each save only).
SIGTERM and the first SIGINT finish the step, save and exit cleanly; a second SIGINT exits now.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from moejax import config as config_lib, runtime, validation
from moejax.errors import (CheckpointError, ClusterError, ConfigError, DeviceMemoryError,
                           DivergedError)
from moejax.data import buckets as buckets_lib
from moejax.data.source import Source, global_batch
from moejax.data.synthetic import SyntheticSource
from moejax.data.tokens import TokenSource
from moejax.parallel import experts as ep_lib
from moejax.train import metrics as metrics_lib
from moejax.train import workdir as workdir_lib
from moejax.train.checkpoint import Checkpointer, saved_config
from moejax.train.plan import Plan
from moejax.train.state import TrainState

LOSS_BOUND = 10.0   # x ln(vocab): a loss above it is garbage data or a diverged run


def make_source(plan: Plan) -> Source:
  """The plan's token source (negative steps are its evaluation batches)."""
  lay, vocab, seed = plan.layout, plan.model.vocab_size, plan.run.seed
  shape = (lay.num_micro_batches, lay.micro_batch_size, lay.seq_len)
  if plan.data.source == 'tokens':
    return TokenSource(plan.data.path, *shape, seed, vocab, pack=plan.data.pack)
  return SyntheticSource(plan.data.source, vocab, *shape, seed)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to config.num_steps; returns the last logged record."""
  validation.validate(config, jax.device_count())
  if jax.process_count() > 1 and config_lib.layout(config).devices != jax.device_count():
    raise ClusterError(
        f'mesh.dp * mesh.tp * mesh.pp = {config_lib.layout(config).devices} but the '
        f'{jax.process_count()} processes have {jax.device_count()} devices together: a '
        f'multi-process mesh must use every device; change the mesh or the number of processes.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'Cannot create --workdir={workdir}: {e.strerror}.') from e
  with workdir_lib.RunLock(workdir, enabled=jax.process_index() == 0):
    num_steps = config_lib.run_config(config).num_steps
    done = _finished_step(workdir, num_steps)
    if done is not None:
      print(f'Already at step {done} (num_steps={num_steps}): nothing to train. Raise '
            f'--config.num_steps to continue.', flush=True)
      return {}
    return _train(config, workdir)


def _say(message: str) -> None:
  """A console line from process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


def _finished_step(workdir: str, num_steps: int) -> int | None:
  """The newest checkpoint's step if it is at or past num_steps (read without JAX)."""
  try:
    step, _ = saved_config(workdir)
  except (ConfigError, CheckpointError):
    return None
  return step if step >= num_steps else None


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  plan = Plan(config)
  source = make_source(plan)             # checks the data before anything is compiled
  cfg, lay, run, data_sharding = plan.model, plan.layout, plan.run, plan.batch_sharding
  buckets = plan.buckets()
  sources = [make_source(b) for b in buckets] if len(buckets) > 1 else [source]
  train_steps, ckpt = _compile(buckets), Checkpointer(workdir, plan)
  state = _initial_state(plan, ckpt)
  start = int(state.step)
  evaluate = make_eval(plan, source)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  if start and jax.process_index() == 0 and workdir_lib.drop_records_after(writer.path, start):
    _say(f'Dropped metrics.jsonl records of steps after {start} (they are re-run now).')
  guard = _Guard(ckpt, plan.all_finite, LOSS_BOUND * math.log(cfg.vocab_size))
  stop = _StopFlag()
  profile = run.profile_steps
  record: dict = {}
  clock = _Clock(start, run.num_steps, lay.tokens_per_step)
  try:
    for step in range(start, run.num_steps):
      done = step + 1
      if profile and done == profile.start:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'), create_perfetto_trace=True)
      b = buckets_lib.choose(run.seed, step, len(buckets))
      state, metrics = train_steps[b](state, global_batch(sources[b], step, data_sharding))
      guard.confirm(metrics, done)
      if profile and done == profile[-1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        _say(f'Profiled steps {profile.start}-{profile[-1]} into {workdir}/profile (open '
             f'with TensorBoard\'s profile plugin or Perfetto).')
      if run.checkpoint_every and done % run.checkpoint_every == 0:
        guard.save(state, metrics, done)
      if stop.signal:
        guard.save(state, metrics, done, force=True)
        ckpt.close()
        print(f'{stop.signal}: saved checkpoint at step {done} and stopped.', flush=True)
        return record
      if done % run.log_every == 0 or done == run.num_steps:
        record = clock.record(jax.device_get(metrics), done)   # the host sync: at log time
        if len(buckets) > 1:
          record['seq_len'] = buckets[b].layout.seq_len
        guard.check(record, done)
        _say(metrics_lib.format_line(record, total=run.num_steps))
        writer.write(record)
      if run.eval_every and done % run.eval_every == 0:
        eval_record = dict(evaluate(state.params), step=done)
        _say(metrics_lib.format_line(eval_record, prefix='eval'))
        writer.write({'step': done, **{'eval_' + k: v for k, v in eval_record.items()
                                       if k != 'step'}})
    guard.save(state, metrics, run.num_steps)
    ckpt.close()
    loss = f'loss {record["loss"]:.4f}; ' if 'loss' in record else ''
    _say(f'Finished at step {run.num_steps}: {loss}checkpoint {ckpt.directory}/'
         f'{run.num_steps}; metrics {writer.path}; TensorBoard: tensorboard '
         f'--logdir={os.path.join(workdir, "tensorboard")}')
  finally:
    writer.close()
    stop.restore()
  return record


def _compile(plans: list[Plan]) -> list:
  """The train step of each bucket compiled ahead of time from abstract inputs, after a memory
  check that runs before anything is allocated."""
  plan = plans[0]
  cfg, lay = plan.model, plan.layout
  platform = plan.mesh.devices.flat[0].platform
  experts = (f'dropless experts, {ep_lib.ragged_kind(platform)} all-to-all'
             if cfg.dispatch == 'dropless' else 'experts at capacity')
  shapes = (f'buckets {", ".join(f"{p.layout.micro_batch_size}x{p.layout.seq_len}" for p in plans)}'
            f' rows x tokens' if len(plans) > 1 else f'{lay.micro_batch_size}x{lay.seq_len}')
  _say(f'Compiling the train step for {lay.devices} {platform} devices '
       f'(dp={lay.dp} tp={lay.tp} pp={lay.pp}, {lay.tokens_per_step:,} tokens per step as '
       f'{lay.num_micro_batches} micro-batches of {shapes}, {experts})...')
  started = time.perf_counter()
  compiled = []
  for p in plans:
    compiled.append(p.train_step().lower(p.abstract_state, p.batch_abstract()).compile())
    check_memory(compiled[-1], p.mesh)
  _say(f'Compiled in {time.perf_counter() - started:.0f}s.')
  return compiled


class _Clock:
  """Throughput since the last log line, and time left from a smoothed step time (the first
  interval includes warm-up)."""

  def __init__(self, start: int, num_steps: int, tokens_per_step: int):
    self.last_time, self.last_step = time.perf_counter(), start
    self.num_steps, self.tokens_per_step = num_steps, tokens_per_step
    self.seconds_per_step: float | None = None

  def record(self, metrics, step: int) -> dict:
    now = time.perf_counter()
    recent = max(now - self.last_time, 1e-9) / (step - self.last_step)
    self.last_time, self.last_step = now, step
    self.seconds_per_step = recent if self.seconds_per_step is None else (
        0.7 * self.seconds_per_step + 0.3 * recent)
    record = metrics_lib.summarise(metrics, step=step,
                                   tokens_per_sec=self.tokens_per_step / recent)
    record['seconds_left'] = self.seconds_per_step * (self.num_steps - step)
    return record


class _Guard:
  """Saves only sound steps and confirms each save with the next step's loss.

  A step is sound when its loss and gradient norm are finite, its loss is below `bound` and the
  updated params are finite. The saved params are confirmed by the loss the next step computes
  from them; if that is unsound, the save is renamed aside (`<step>.diverged-<time>`), so the
  newest complete checkpoint is always one whose params gave a sound loss.
  """

  def __init__(self, ckpt: Checkpointer, all_finite, bound: float):
    self.ckpt, self.bound = ckpt, bound
    self.unconfirmed: int | None = None
    self._finite = all_finite   # run at save time only, never in the step

  def _sound(self, loss: float, grad_norm: float, params_finite: bool = True) -> bool:
    return (math.isfinite(loss) and math.isfinite(grad_norm) and loss < self.bound and
            params_finite)

  def check(self, metrics, step: int, params_finite: bool = True) -> None:
    """Raises DivergedError for an unsound step (after setting aside an unconfirmed save)."""
    loss, grad_norm = float(metrics['loss']), float(metrics['grad_norm'])
    if self._sound(loss, grad_norm, params_finite):
      if self.unconfirmed is not None and step > self.unconfirmed:
        self.unconfirmed = None
      return
    aside = ''
    try:
      self.ckpt.wait()
      if self.unconfirmed is not None and self.unconfirmed in self.ckpt.all_steps():
        aside = (f' Its input, checkpoint {self.unconfirmed}, was renamed to '
                 f'{self.ckpt.set_aside(self.unconfirmed, "diverged")}.')
      good = self.ckpt.latest_step()
    except CheckpointError:
      good = None
    where = (f'the newest checkpoint, {self.ckpt.directory}/{good}, gave sound losses; the run '
             f'resumes from it' if good is not None else 'no sound checkpoint is left')
    raise DivergedError(
        f'Step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}'
        f'{"" if params_finite else ", non-finite parameters"} (a sound step has a finite loss '
        f'below {self.bound:.1f} = {LOSS_BOUND:g} x ln(vocab)). Stopped without saving it.'
        f'{aside} {where[0].upper() + where[1:]}. Try a lower optim.lr, a longer '
        f'optim.warmup_steps or optim.grad_clip, or check the data.')

  def confirm(self, metrics, step: int) -> None:
    """After the step that follows a save: its loss vouches for the saved params."""
    if self.unconfirmed is not None and step == self.unconfirmed + 1:
      self.check(jax.device_get({'loss': metrics['loss'], 'grad_norm': metrics['grad_norm']}),
                 step)

  def save(self, state, metrics, step: int, force: bool = False) -> None:
    finite = self._finite(state.params)
    host = jax.device_get({'loss': metrics['loss'], 'grad_norm': metrics['grad_norm'],
                           'finite': finite})
    self.check(host, step, bool(host['finite']))
    self.ckpt.save(state, force=force)
    self.unconfirmed = step


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


def make_eval(plan: Plan, source: Source):
  """Mean metrics over run.eval_batches fixed batches (steps -1, -2, ...)."""
  eval_step = plan.eval_step()
  batches = [global_batch(source, -1 - i, plan.batch_sharding)
             for i in range(plan.run.eval_batches)]

  def evaluate(params) -> dict:
    results = [jax.device_get(eval_step(params, b)) for b in batches]
    loss = float(np.mean([r['loss'] for r in results]))
    ce = float(np.mean([r['ce'] for r in results]))
    kept = np.sum([r['expert_load'] for r in results], axis=0)
    routed = np.sum([r['expert_assigned'] for r in results], axis=0)
    return {'loss': loss, 'ce': ce, 'ppl': float(np.exp(ce)),
            'dropped_frac': float(np.mean([r['dropped_frac'] for r in results])),
            'balance': metrics_lib.expert_balance(routed),
            'expert_share': metrics_lib.expert_share(kept)}
  return evaluate


def _initial_state(plan: Plan, ckpt: Checkpointer) -> TrainState:
  """Resume from the newest checkpoint that restores; else init (params from init_from)."""
  init_from = plan.run.init_from
  steps = ckpt.all_steps()
  if runtime.agree(len(steps)):
    state = _restore_newest(ckpt, steps)
    if state is not None:
      return state
  state = plan.create_state()
  if init_from:
    source = init_from
    if os.path.isdir(os.path.join(source, 'checkpoints')):
      source = os.path.join(source, 'checkpoints')
    if not os.path.isdir(source):
      raise ConfigError(f'init_from={init_from!r}: no such directory.')
    state = state.replace(params=ckpt.restore_params(source))
    print(f'Initialised params from {source} (optimizer state fresh, step 0).', flush=True)
  return state


def _restore_newest(ckpt: Checkpointer, steps: list[int]) -> TrainState | None:
  """The newest step that restores; unreadable ones are reported and renamed aside."""
  for step in reversed(steps):
    try:
      state = ckpt.restore(step)
    except CheckpointError as e:
      if jax.process_count() > 1:
        raise
      aside = ckpt.set_aside(step)
      print(f'warning: {e}\n  Renamed it to {aside} (nothing deleted) and trying the previous '
            f'checkpoint.', flush=True)
      continue
    if jax.process_index() == 0:
      print(f'Resumed from {ckpt.directory}/{step} (step {int(state.step)}).' +
            _changes(ckpt, step), flush=True)
    return state
  print('warning: no checkpoint restores; starting from step 0.', flush=True)
  return None


def _changes(ckpt: Checkpointer, step: int) -> str:
  """' Changed since the checkpoint: key old -> new, ...' for run settings that differ."""
  try:
    with open(os.path.join(ckpt.directory, str(step), 'config', 'metadata')) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return ''
  now = json.loads(ckpt.config.to_json_best_effort())
  flat = lambda d, p='': {k2: v2 for k, v in d.items() for k2, v2 in (
      flat(v, f'{p}{k}.').items() if isinstance(v, dict) else [(f'{p}{k}', v)])}
  old, new = flat(saved), flat(now)
  diffs = [f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k)]
  return (' Changed since the checkpoint: ' + ', '.join(diffs) + '.') if diffs else ''


_ACTIVE: list = []    # the running loop's _StopFlag, for signals taken by another thread


def deliver(signum: int) -> bool:
  """Hands a signal taken by a waiting thread (moejax.cli.train) to the running loop; False
  when no loop is running."""
  if not _ACTIVE:
    return False
  _ACTIVE[-1]._handle(signum, None)
  return True


class _StopFlag:
  """SIGTERM and a first SIGINT become a flag checked at step boundaries (save, then exit);
  a second SIGINT exits at once (an unfinished save stays invisible under its temporary name)."""

  def __init__(self):
    self.signal = ''
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    _ACTIVE.append(self)

  def _handle(self, signum, frame):
    del frame
    if self.signal == 'SIGINT' and signum == signal.SIGINT:
      os.write(2, b'Second SIGINT: exiting now without saving.\n')
      os._exit(130)
    self.signal = self.signal or signal.Signals(signum).name
    if signum == signal.SIGINT:
      os.write(2, b'SIGINT: finishing this step and saving (Ctrl-C again to exit now).\n')

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    _ACTIVE.remove(self)
