"""Orbax checkpoints in one canonical, mesh-independent layout; exact resume on any mesh.

On disk: <workdir>/checkpoints/<step>/{state, config}. `state` holds the whole train state with
block params (and their optimizer moments) stacked [NB, ...] in block order, not the
stage-stacked training layout, so a checkpoint written on 4x4 restores on 2x8, 1x1 or with other
pipeline repeats; restore reads each device's shards straight onto the current mesh.
`config` is the run's config as JSON. Orbax writes into a temporary directory and renames it when
complete, so a killed save never hides the previous checkpoint.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp

from typing import Any

from moejax import config as config_lib
from moejax.checkpoint_dir import complete_steps, params_item, read_config
from moejax.data import tokens
from moejax.errors import ConfigError
from moejax.errors import CheckpointError
from moejax.train.plan import Plan
from moejax.train.state import TrainState

# A replicated array is written by its replicas in parallel slices only where each slice is at
# least this large: every slice shape costs a compiled slicing program at a run's first save,
# and a small array gains no write bandwidth from being split.
REPLICA_SLICE_MIN_BYTES = 16 << 20


def _use_array_handler() -> None:
  """Orbax's handler of jax.Arrays with REPLICA_SLICE_MIN_BYTES (its registry is global)."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=REPLICA_SLICE_MIN_BYTES), override=True)


# Config sections that change parameter shapes or meaning; a checkpoint must match them, except
# the keys that change how the same parameters are trained or run (listed at resume).
MODEL_SECTIONS = ('model', 'moe')


def _saved_value(saved: dict, section: str, key: str):
  """A saved config's value; a key the checkpoint predates means its default (moejax.config)."""
  values = saved.get(section, {})
  if key in values:
    return values[key]
  return config_lib.default_of(section, key)


class Checkpointer:
  """Saves and restores the train state of one run directory."""

  def __init__(self, workdir: str, plan: Plan):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.plan, self.config = plan, plan.config
    self._data_identity: dict[str, str] | None = None
    _use_array_handler()
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, item_names=('state', 'config', 'data'),
          options=ocp.CheckpointManagerOptions(max_to_keep=plan.run.checkpoint_keep, create=True,
                                               enable_async_checkpointing=True))
    except OSError as e:
      raise ConfigError(f'Cannot use checkpoint directory {self.directory}: {e}') from e

  def data_identity(self) -> dict[str, str]:
    """What identifies the run's token files (saved with every checkpoint; {} for synthetic
    data, which the config's seed identifies)."""
    if self._data_identity is None:
      data = self.plan.data
      self._data_identity = tokens.identity(data.path) if data.source == 'tokens' else {}
    return self._data_identity

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, state: TrainState, *, force: bool = False) -> None:
    """Starts an asynchronous save of `state` at its step (training continues meanwhile).

    A failed save (disk full, permissions) raises CheckpointError after removing its own
    temporary directory; earlier checkpoints are untouched."""
    step = int(state.step)
    if self.manager.latest_step() == step:
      return
    self._warn_if_short_of_space()
    canonical = self.plan.to_canonical(state)
    config_json = json.loads(self.config.to_json_best_effort())
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(canonical), config=ocp.args.JsonSave(config_json),
          data=ocp.args.JsonSave(self.data_identity())), force=force)
    except Exception as e:   # this save, or an earlier asynchronous one, failed
      self._failed(e)

  def _failed(self, error: Exception):
    try:   # let earlier in-flight saves finish first: their temporary directories are not ours
      self.manager.wait_until_finished()
    except Exception:
      pass
    for tmp in glob.glob(os.path.join(self.directory, '*.orbax-checkpoint-tmp*')):
      shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0
    good = self.all_steps()
    raise CheckpointError(
        f'Saving a checkpoint under {self.directory} '
        f'failed ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ""}); '
        f'{free / 2**20:.0f} MiB free there. '
        f'The newest complete checkpoint is {good[-1] if good else "none"}. Free disk space (or '
        f'lower checkpoint_keep, or use a --workdir with room) and run the same command to '
        f'resume.') from error

  def _warn_if_short_of_space(self) -> None:
    steps = self.all_steps()
    if not steps:
      return
    last = os.path.join(self.directory, str(steps[-1]))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(last) for f in fs)
    free = shutil.disk_usage(self.directory).free
    if free < size:
      print(f'warning: {free / 2**20:.0f} MiB free under {self.directory}, but the last '
            f'checkpoint took {size / 2**20:.0f} MiB: the next save will probably fail.',
            flush=True)

  def set_aside(self, step: int, why: str = 'corrupt') -> str:
    """Renames a step out of the way (nothing is deleted), so the step number is free again;
    returns the new path."""
    path = os.path.join(self.directory, str(step))
    aside = f'{path}.{why}-{time.strftime("%Y%m%d-%H%M%S")}'
    os.rename(path, aside)
    self.manager.reload()
    return aside

  def check_compatible(self, step: int, directory: str | None = None,
                       new_keys: tuple = ()) -> None:
    """Raises ConfigError naming the keys if the checkpoint is of another model (keys
    `new_keys`, (section, key) pairs, may differ)."""
    directory = directory or self.directory
    saved = read_config(os.path.join(directory, str(step)))
    run_keys = set(config_lib.run_keys()) | set(new_keys)
    diffs = [f'{s}.{k}: checkpoint {_saved_value(saved, s, k)!r} vs config {v!r}'
             for s in MODEL_SECTIONS for k, v in self.config[s].items()
             if _saved_value(saved, s, k) != v and (s, k) not in run_keys]
    if diffs:
      raise ConfigError(f'Checkpoint {os.path.join(directory, str(step))} is of a different '
                        'model: ' + '; '.join(diffs) + '. Use a new --workdir, or the '
                        'checkpoint\'s model settings.')

  def restore_params(self, directory: str, fresh: Any = None) -> Any:
    """Params (training layout) of the newest checkpoint under `directory`: a run's, or a
    params-only one (moejax.cli.convert import). Given `fresh` params (training layout), an
    imported checkpoint without multi-token-prediction depths gets fresh['mtp'] when the config
    asks for them (model.mtp_depth: fine-tuning with MTP on)."""
    steps = complete_steps(directory)
    if not steps or not os.path.isdir(os.path.join(directory, str(steps[-1]), 'params')):
      return self.restore(directory=directory).params
    step = steps[-1]
    abstract = self.plan.canonical_abstract.params
    new_mtp = (fresh is not None and 'mtp' in abstract and
               not _saved_value(read_config(os.path.join(directory, str(step))), 'model',
                                'mtp_depth'))
    self.check_compatible(step, directory, (('model', 'mtp_depth'),) if new_mtp else ())
    if new_mtp:
      abstract = {k: v for k, v in abstract.items() if k != 'mtp'}
    tree, _ = params_item(os.path.join(directory, str(step)))
    try:
      with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as reader:
        params = reader.restore(tree, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      raise CheckpointError(f'Cannot restore params from {directory}/{step}: '
                            f'{type(e).__name__}: {first}') from e
    if new_mtp:   # outside 'blocks': the same in both layouts
      print(f'The multi-token-prediction depths (model.mtp_depth) start fresh: {directory} '
            'has none.', flush=True)
      params = dict(params, mtp=fresh['mtp'])
    return self.plan.params_to_training(params)

  def restore(self, step: int | None = None, directory: str | None = None) -> TrainState:
    """The newest (or given) complete checkpoint, re-sharded onto the current mesh."""
    manager = self.manager
    if directory is not None:
      manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=('state', 'config'),
                                      options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ConfigError(f'No complete checkpoint in {directory or self.directory}.')
    self.check_compatible(step, manager.directory)
    asyncio_log = logging.getLogger('asyncio')
    level, asyncio_log.level = asyncio_log.level, logging.CRITICAL   # one message, not a page
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(self.plan.canonical_abstract)))['state']
    except Exception as e:   # tensorstore, pytree and file errors of a damaged step
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      raise CheckpointError(f'Cannot restore checkpoint {manager.directory}/{step}: '
                            f'{type(e).__name__}: {first}') from e
    finally:
      asyncio_log.setLevel(level)
    return self.plan.to_training(restored)

  def wait(self) -> None:
    """Waits for an in-flight save; raises CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._failed(e)

  def close(self) -> None:
    self.wait()
    self.manager.close()
