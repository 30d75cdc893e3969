"""Where a run starts: the newest checkpoint that restores (unreadable ones renamed aside, with
a report of the run settings changed since), else a fresh state with params from init_from."""
from __future__ import annotations

import json
import os

import jax

from moejax import runtime
from moejax.errors import CheckpointError, ConfigError
from moejax.checkpoint_dir import read_config, read_data_identity, saved_config
from moejax.train.checkpoint import Checkpointer
from moejax.train.plan import Plan
from moejax.train.state import TrainState


def initial_state(plan: Plan, ckpt: Checkpointer) -> TrainState:
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
    state = state.replace(params=ckpt.restore_params(source, fresh=state.params))
    print(f'Initialised params from {source} (optimizer state fresh, step 0).', flush=True)
  return state


def check_same_data(workdir: str, plan: Plan, allow_other_data: bool) -> None:
  """Before compiling: a resume must read the token files its newest checkpoint was trained on
  (compared by content, not by data.path); other content is a ConfigError naming both, unless
  `allow_other_data` (then a notice)."""
  if plan.data.source != 'tokens':
    return
  try:
    step, _ = saved_config(workdir)
  except (ConfigError, CheckpointError):
    return                                   # nothing to resume: any data is fine
  step_dir = os.path.join(workdir, 'checkpoints', str(step))
  saved = read_data_identity(step_dir)
  if not saved:
    return                                   # a checkpoint older than the record, or synthetic
  from moejax.data import tokens
  now = tokens.identity(plan.data.path)
  if now == saved:
    return
  differ = '; '.join(f'{k}: checkpoint {saved.get(k)}, now {now.get(k)}'
                     for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
  if allow_other_data:
    print(f'warning: data.path={plan.data.path} holds other token files than checkpoint '
          f'{step_dir} was trained on ({differ}); continuing on them (--allow_other_data).',
          flush=True)
    return
  raise ConfigError(
      f'data.path={plan.data.path} holds other token files than checkpoint {step_dir} was '
      f'trained on ({differ}): resuming would continue on other data. Point data.path at the '
      f'run\'s dataset, use a new --workdir, or pass --allow_other_data to continue on this '
      f'data on purpose.')


def _restore_newest(ckpt: Checkpointer, steps: list[int]) -> TrainState | None:
  """The newest step that restores on every process; one that fails on any process is reported,
  renamed aside by process 0, and the previous step is tried by all."""
  for step in reversed(steps):
    error = None
    try:
      state = ckpt.restore(step)
    except CheckpointError as e:
      error = e
    if runtime.any_process(error is not None):
      _set_aside(ckpt, step, error)
      continue
    if jax.process_index() == 0:
      print(f'Resumed from {ckpt.directory}/{step} (step {int(state.step)}).' +
            _changes(ckpt, step), flush=True)
    return state
  if jax.process_index() == 0:
    print('warning: no checkpoint restores; starting from step 0.', flush=True)
  return None


def _set_aside(ckpt: Checkpointer, step: int, error: CheckpointError | None) -> None:
  """Process 0 renames the failed step aside (nothing deleted); every process then forgets it."""
  why = error or f'Cannot restore checkpoint {ckpt.directory}/{step} on another process.'
  if jax.process_index() == 0:
    aside = ckpt.set_aside(step)
    print(f'warning: {why}\n  Renamed it to {aside} (nothing deleted) and trying the previous '
          f'checkpoint.', flush=True)
  elif error is not None:
    print(f'warning: {why}', flush=True)
  runtime.barrier(f'set_aside_{step}')
  ckpt.manager.reload()


def _changes(ckpt: Checkpointer, step: int) -> str:
  """' Changed since the checkpoint: key old -> new, ...' for run settings that differ."""
  try:
    saved = read_config(os.path.join(ckpt.directory, str(step)))
  except CheckpointError:
    return ''
  now = json.loads(ckpt.config.to_json_best_effort())
  flat = lambda d, p='': {k2: v2 for k, v in d.items() for k2, v2 in (
      flat(v, f'{p}{k}.').items() if isinstance(v, dict) else [(f'{p}{k}', v)])}
  old, new = flat(saved), flat(now)
  diffs = [f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k)]
  return (' Changed since the checkpoint: ' + ', '.join(diffs) + '.') if diffs else ''
