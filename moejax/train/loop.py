"""The training loop: a Plan of the config, restore or init (resume.py), step, log, evaluate
(evaluation.py), checkpoint through the save guard (guard.py: nothing broken is saved), stop at a
step boundary on SIGTERM or a first SIGINT (signals.py).
"""
from __future__ import annotations

import math
import os
import time

import jax
import ml_collections

from moejax import config as config_lib, kernels, validation
from moejax.errors import CheckpointError, ClusterError, ConfigError
from moejax.data import buckets as buckets_lib
from moejax.data.source import Source, global_batch
from moejax.data.synthetic import SyntheticSource
from moejax.data.tokens import TokenSource
from moejax.model import dispatch
from moejax.model.moe import group_parts
from moejax.train import ending, evaluation, metrics as metrics_lib, peers, resume, signals, stall
from moejax.train import workdir as workdir_lib
from moejax.checkpoint_dir import saved_config
from moejax.train.checkpoint import Checkpointer
from moejax.train.guard import LOSS_BOUND, Guard
from moejax.train.memory import check_memory
from moejax.train.plan import Plan
from moejax.train.stop_vote import StopVote

def make_source(plan: Plan) -> Source:
  """The plan's token source (negative steps are its evaluation batches)."""
  lay, vocab, seed = plan.layout, plan.model.vocab_size, plan.run.seed
  shape = (lay.num_micro_batches, lay.micro_batch_size, lay.seq_len)
  if plan.data.source == 'tokens':
    return TokenSource(plan.data.path, *shape, seed, vocab, pack=plan.data.pack)
  return SyntheticSource(plan.data.source, vocab, *shape, seed)


def train(config: ml_collections.ConfigDict, workdir: str, allow_other_data: bool = False) -> dict:
  """Trains to config.num_steps; returns the last logged record. `allow_other_data`: resume on
  token files other than the checkpoint's (refused otherwise)."""
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
  lock = workdir_lib.RunLock(workdir, enabled=jax.process_index() == 0)
  end = lambda why: ending.end_run(why, newest_checkpoint(workdir), lambda: lock.__exit__())
  lost = lambda why: end(f'{why}; stopping this process too')
  with lock, peers.PeerWatch(lost) as watch:
    if jax.process_count() > 1:
      workdir_lib.check_shared(lock)
    num_steps = config_lib.run_config(config).num_steps
    done = _finished_step(workdir, num_steps)
    if done is not None:
      print(f'Already at step {done} (num_steps={num_steps}): nothing to train. Raise '
            f'--config.num_steps to continue.', flush=True)
      return {}
    try:
      return _train(config, workdir, allow_other_data, end)
    except jax.errors.JaxRuntimeError as e:
      watch.failed_collective(e)   # a peer died inside a collective: one line, never returns
      raise


def _say(message: str) -> None:
  """A console line from process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


def newest_checkpoint(workdir: str) -> str:
  """The newest complete checkpoint's path (read without JAX), or 'none'."""
  try:
    step, _ = saved_config(workdir)
  except (ConfigError, CheckpointError):
    return 'none'
  return os.path.join(os.path.abspath(workdir), 'checkpoints', str(step))


def _finished_step(workdir: str, num_steps: int) -> int | None:
  """The newest checkpoint's step if it is at or past num_steps (read without JAX)."""
  try:
    step, _ = saved_config(workdir)
  except (ConfigError, CheckpointError):
    return None
  return step if step >= num_steps else None


def _train(config: ml_collections.ConfigDict, workdir: str, allow_other_data: bool,
           on_stall) -> dict:
  plan = Plan(config, validated=True)   # validated once, in train()
  source = make_source(plan)             # checks the data before anything is compiled
  resume.check_same_data(workdir, plan, allow_other_data)
  cfg, lay, run, data_sharding = plan.model, plan.layout, plan.run, plan.batch_sharding
  buckets = plan.buckets()
  sources = [make_source(b) for b in buckets] if len(buckets) > 1 else [source]
  train_steps, ckpt = _compile(buckets), Checkpointer(workdir, plan)
  state = resume.initial_state(plan, ckpt)
  start = int(state.step)
  evaluate = evaluation.make_eval(plan, source)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  if jax.process_index() == 0:
    _repair_workdir(writer.path, ckpt.directory, start)
  guard = Guard(ckpt, plan.all_finite, LOSS_BOUND * math.log(cfg.vocab_size))
  stop = signals.StopFlag()
  vote = StopVote(plan.mesh) if jax.process_count() > 1 else None   # all stop at one step
  profile = run.profile_steps
  record: dict = {}
  clock = _Clock(start, run.num_steps, lay.tokens_per_step)
  stalls = stall.StallWatch(run.stall_timeout_s, start, on_stall, workdir)
  try:
    stalls.start()
    for step in range(start, run.num_steps):
      done = step + 1
      _profile(profile, done, workdir, None)
      b = buckets_lib.choose(run.seed, step, len(buckets))
      state, metrics = train_steps[b](state, global_batch(sources[b], step, data_sharding))
      stalls.step_dispatched(done, metrics['loss'])
      guard.confirm(metrics, done)
      _profile(profile, done, workdir, state)
      if run.checkpoint_every and done % run.checkpoint_every == 0:
        guard.save(state, metrics, done)
      stopping = vote.cast(bool(stop.signal)) if vote else bool(stop.signal)
      if done % run.log_every == 0 or done == run.num_steps or stopping:
        record = clock.record(jax.device_get(metrics), done)   # the host sync: at log time
        if len(buckets) > 1:
          record['seq_len'] = buckets[b].layout.seq_len
        guard.check(record, done)
        _say(metrics_lib.format_line(record, total=run.num_steps))
        writer.write(record)
      if stopping:
        guard.save(state, metrics, done, force=True)
        ckpt.close()
        _say(f'{stop.signal or "stop requested by another process"}: saved checkpoint at step '
             f'{done} and stopped.')
        return record
      if run.eval_every and done % run.eval_every == 0:
        _evaluate(evaluate, state.params, done, writer)
      stalls.moved_on()
    guard.save(state, metrics, run.num_steps)
    ckpt.close()
    _say_finished(record, run.num_steps, ckpt.directory, writer.path, workdir)
  finally:
    stalls.stop()
    writer.close()
    stop.restore()
  return record


def _say_finished(record: dict, step: int, checkpoints: str, metrics: str, workdir: str) -> None:
  loss = f'loss {record["loss"]:.4f}; ' if 'loss' in record else ''
  _say(f'Finished at step {step}: {loss}checkpoint {checkpoints}/{step}; metrics {metrics}; '
       f'TensorBoard: tensorboard --logdir={os.path.join(workdir, "tensorboard")}')


def _profile(steps: range, done: int, workdir: str, state) -> None:
  """Starts the trace before the first profiled step (state None), stops it after the last."""
  if steps and state is None and done == steps.start:
    jax.profiler.start_trace(os.path.join(workdir, 'profile'), create_perfetto_trace=True)
  elif steps and state is not None and done == steps[-1]:
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    _say(f'Profiled steps {steps.start}-{steps[-1]} into {workdir}/profile (open with '
         f'TensorBoard\'s profile plugin or Perfetto).')


def _evaluate(evaluate, params, step: int, writer: metrics_lib.MetricsWriter) -> None:
  """One evaluation: its console line and its eval_* record."""
  record = dict(evaluate(params), step=step)
  _say(metrics_lib.format_line(record, prefix='eval'))
  writer.write({'step': step, **{'eval_' + k: v for k, v in record.items() if k != 'step'}})


def _repair_workdir(metrics_path: str, checkpoint_dir: str, start: int) -> None:
  """What a run that died left behind: metrics of steps after the resumed one, a half-written
  metrics line, temporary checkpoint directories (removed, each with a notice)."""
  later, broken = workdir_lib.repair_metrics(metrics_path, start)
  if later:
    _say(f'Dropped {later} metrics.jsonl records of steps after {start} (they are re-run now).')
  if broken:
    _say(f'Dropped {broken} incomplete line(s) from {metrics_path} (a run stopped mid-write).')
  dead = workdir_lib.remove_dead_temporaries(checkpoint_dir)
  if dead:
    _say(f'Removed {len(dead)} unfinished checkpoint director{"y" if len(dead) == 1 else "ies"} '
         f'of a run that stopped mid-save: {", ".join(dead)} (complete checkpoints untouched).')


def _compile(plans: list[Plan]) -> list:
  """The train step of each bucket compiled ahead of time from abstract inputs, after a memory
  check that runs before anything is allocated."""
  plan = plans[0]
  cfg, lay = plan.model, plan.layout
  platform = plan.mesh.devices.flat[0].platform
  rows = dispatch.sends_rows(cfg.dispatch, group_parts(
      lay.micro_batch_size, lay.seq_len, cfg.group_size, lay.tp, lay.dp)[1].parts)
  chosen = kernels.choose(cfg, platform, plan.data.pack, rows)   # raises if one cannot apply
  shapes = (f'buckets {", ".join(f"{p.layout.micro_batch_size}x{p.layout.seq_len}" for p in plans)}'
            f' rows x tokens' if len(plans) > 1 else f'{lay.micro_batch_size}x{lay.seq_len}')
  _say(f'Compiling the train step for {lay.devices} {platform} devices '
       f'(dp={lay.dp} tp={lay.tp} pp={lay.pp}, {lay.tokens_per_step:,} tokens per step as '
       f'{lay.num_micro_batches} micro-batches of {shapes}, {chosen.line})...')
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


