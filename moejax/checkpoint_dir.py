"""A checkpoint directory read without JAX: which steps are complete, the config and data
identity a step was saved with, and where its params are. The one reader of that layout for
training (moejax.train.checkpoint), conversion (moejax.convert.hf) and inference (cli)."""
from __future__ import annotations

import json
import os

import ml_collections

from moejax.errors import CheckpointError, ConfigError


def complete_steps(directory: str) -> list[int]:
  """The complete checkpoints' steps under a checkpoints directory, oldest first: Orbax writes a
  step under a temporary name and renames it to the bare number when complete."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def saved_config(workdir: str, step: int = -1) -> tuple[int, ml_collections.ConfigDict]:
  """(step, config) of a run's newest (or given) complete checkpoint, read without JAX."""
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory):
    raise ConfigError(f'{directory} does not exist: train first, or pass the run\'s --workdir.')
  steps = complete_steps(directory)
  if not steps or (step >= 0 and step not in steps):
    raise ConfigError(f'No complete checkpoint{"" if step < 0 else f" at step {step}"} in '
                      f'{directory} (complete steps: {steps or "none"}).')
  step = steps[-1] if step < 0 else step
  return step, ml_collections.ConfigDict(read_config(os.path.join(directory, str(step))))


def read_config(step_dir: str) -> dict:
  """The config a checkpoint step was saved with (JSON), or CheckpointError: the one reader of a
  checkpoint's config."""
  try:
    with open(os.path.join(step_dir, 'config', 'metadata')) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'Checkpoint {step_dir} has no readable config ({e}); it is corrupt '
                          f'or not a moejax checkpoint.') from e


def read_data_identity(step_dir: str) -> dict[str, str] | None:
  """The token files' identity a checkpoint step was saved with, or None (an older checkpoint,
  or unreadable)."""
  try:
    with open(os.path.join(step_dir, 'data', 'metadata')) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def params_item(step_dir: str) -> tuple[str, tuple[str, ...]]:
  """The Orbax tree holding params in a checkpoint step, and the params' key prefix in it: an
  imported checkpoint's `params` tree (moejax.convert.hf), or a run's train `state`."""
  if os.path.isdir(os.path.join(step_dir, 'params')):
    return os.path.join(step_dir, 'params', 'state'), ()
  return os.path.join(step_dir, 'state'), ('params',)
