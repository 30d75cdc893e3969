"""What the config files in configs/ share: the run-control keys, the AdamW block, an open
family's config, and `sibling` to load another config file. The config files are files loaded by
path (`--config=configs/tp4pp4.py`), not a package: installing moejax adds no `configs`."""
import importlib.util
import os
import types

import ml_collections


def run_keys(config: ml_collections.ConfigDict, *, num_steps: int, log_every: int,
             checkpoint_every: int) -> None:
  """The run-control keys every config has (the public interface keeps these names)."""
  config.num_steps = num_steps              # optimizer steps to train (resume continues to this)
  config.seed = 0                           # params, data and dropout are functions of seed and step
  config.log_every = log_every              # console line + metrics.jsonl record every N steps
  config.checkpoint_every = checkpoint_every  # save every N steps (0: only at the end)
  config.checkpoint_keep = 3                # newest checkpoints kept
  config.eval_every = 0                     # evaluate every N steps (0: never)
  config.eval_batches = 2                   # fixed evaluation batches (steps -1, -2, ... of the source)
  config.init_from = ''                     # checkpoint dir to load params from (fine-tuning)
  config.profile_steps = ''                 # 'N' or 'FIRST-LAST': jax.profiler trace of those steps
  config.stall_timeout_s = 1800.0           # no step finished this long: end with every thread's stack


def adamw(lr: float, *, warmup_steps: int, decay_steps: int) -> ml_collections.ConfigDict:
  """AdamW with linear warmup, cosine decay and global-norm clipping."""
  return ml_collections.ConfigDict(dict(
      lr=lr,                      # peak learning rate
      warmup_steps=warmup_steps,  # linear warmup from 0
      decay_steps=decay_steps,    # cosine decay length after warmup (to min_lr_ratio * lr)
      min_lr_ratio=0.1,           # final lr / peak lr
      b1=0.9,                     # Adam beta1
      b2=0.95,                    # Adam beta2
      weight_decay=0.1,           # decoupled decay on matrices (not norms or biases)
      grad_clip=1.0,              # global-norm clip (0 disables)
  ))


def sibling(config_file: str, name: str) -> types.ModuleType:
  """The config file `name`.py in the folder of `config_file` (a config's __file__)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'moejax_config_file_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def open_family(arg: str | None, family: str, variants: dict[str, dict],
                run_settings) -> ml_collections.ConfigDict:
  """A config of an open MoE family: `arg` names a variant (a transformers config.json's fields
  in `variants`: 'tiny' trains on CPU, the others are the published sizes) or is a Hugging Face
  checkpoint directory whose config.json decides the model (`DIR,cpu`: with CPU-sized run
  settings: one device, short sequences). Run settings come from `run_settings` (configs/tp4pp4.py's
  get_config: 'tiny' for 'tiny' and ',cpu', else 'full')."""
  from moejax.convert import families
  from moejax.errors import ConfigError

  arg = arg or 'tiny'
  hf_dir, _, size = arg.partition(',')
  if hf_dir in variants:
    hf, hf_dir = dict(variants[hf_dir], model_type=family), ''
    cpu = arg == 'tiny'
  elif os.path.isdir(hf_dir):
    hf = families.read_hf_config(hf_dir)
    cpu = size == 'cpu'
    if hf.get('model_type') != family:
      raise ConfigError(f'{hf_dir}/config.json is a {hf.get("model_type")!r} model, not '
                        f'{family!r}: use configs/{hf.get("model_type")}.py.')
  else:
    raise ConfigError(f'configs/{family}.py:{arg}: expected one of {sorted(variants)} or a '
                      f'Hugging Face checkpoint directory (optionally DIR,cpu).')
  c = run_settings('tiny' if cpu else 'full')
  for section, keys in families.sections(hf).items():
    c[section].update(keys)
  c.hf_dir = os.path.abspath(hf_dir) if hf_dir else ''
  if cpu:
    c.model.dtype = 'float32'
    c.moe.group_size = c.data.seq_len
    if hf_dir:   # a real checkpoint on a CPU: one device, whatever its head and expert counts
      c.mesh.tp = c.mesh.pp = 1
      c.data.update(num_micro_batches=4, micro_batch_size=2)
  else:   # routing groups of tp4pp4's (each tp shard of a sequence holds whole groups)
    c.model.dtype = 'bfloat16'
  return c
