"""Every shipped config loads and validates; every validation error fires with its message."""
import glob
import importlib.util
import os
import re

import pytest

from moejax import config as config_lib, validation
from moejax.errors import ConfigError
from tests.helpers import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(f for f in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                      if not os.path.basename(f).startswith('_'))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_config_files_load_and_validate(path, tmp_path):
  full = load(path)
  if full.data.source == 'tokens':     # its argument is a dataset directory
    from moejax.cli.prepare import prepare
    (tmp_path / 'a.txt').write_text('some English text, repeated. ' * 200)
    prepare([str(tmp_path / 'a.txt')], str(tmp_path / 'data'))
    full = tiny = load(path, str(tmp_path / 'data'))
  else:
    tiny = load(path, 'tiny')
  validation.validate(full, num_devices=full.mesh.tp * full.mesh.pp)
  # text.py's 4 micro-batches of 8 sequences (one routing group each) fill up to 4 stages.
  layouts = ((4, 4), (1, 1)) if full.data.source == 'tokens' else ((4, 4), (2, 8), (1, 1))
  for tp, pp in layouts:
    tiny.mesh.tp, tiny.mesh.pp = tp, pp
    validation.validate(tiny, num_devices=16)


def test_full_config_is_the_seed_model():
  c = load(os.path.join(ROOT, 'configs', 'tp4pp4.py'))
  d = config_lib.describe(c)
  assert (c.mesh.tp, c.mesh.pp) == (4, 4)
  assert d['global_batch'] == 128 and d['tokens_per_step'] == 131072
  assert d['local_experts_per_device'] == 16 and d['layers_per_stage'] == 2
  assert (c.model.vocab_size, c.model.d_model, c.moe.num_experts, c.moe.top_k) == (50257, 1024, 64, 1)
  assert c.moe.capacity_factor == 1.1 and c.optim.lr == 1e-4


@pytest.mark.parametrize('overrides,message', [
    ({'model.num_heads': 6}, 'model.num_heads=6 is not divisible by mesh.tp=4'),
    ({'moe.num_experts': 6}, 'moe.num_experts=6 is not divisible by mesh.tp=4'),
    ({'model.num_blocks': 6}, 'model.num_blocks=6 is not divisible by mesh.pp * pipeline.repeats'),
    ({'data.num_micro_batches': 6}, 'data.num_micro_batches=6 is not divisible by mesh.pp=4'),
    ({'data.num_micro_batches': 2}, 'data.num_micro_batches=2 < mesh.pp=4'),
    ({'data.seq_len': 64, 'model.max_len': 32}, 'is longer than the position table'),
    ({'moe.group_size': 12}, 'is not divisible by moe.group_size=12'),
    ({'model.num_kv_heads': 3}, 'model.num_kv_heads=3 must divide model.num_heads=4'),
    ({'model.norm': 'batchnorm'}, "model.norm='batchnorm' must be one of"),
    ({'model.qk_norm': 'layer'}, "model.qk_norm='layer' must be one of"),
    ({'moe.ffn': 'relu'}, "moe.ffn='relu' must be one of"),
    ({'moe.normalize_gates_over': 'all'}, "moe.normalize_gates_over='all' must be one of"),
    ({'model.family': 'llama'}, "model.family='llama' not one of"),
    ({'moe.group_size': 16, 'data.seq_len': 96, 'model.max_len': 96},
     'routing groups per sequence do not divide over mesh.tp=4'),
    ({'moe.group_size': 96, 'data.micro_batch_size': 2},
     'moe.group_size=96 is longer than data.seq_len=32 but is not a whole number'),
    ({'moe.top_k': 9}, 'moe.top_k=9 > moe.num_experts=8'),
    ({'moe.capacity_factor': 0.0}, 'capacity_factor'),
    ({'moe.sinkhorn_iters': -1}, 'moe.sinkhorn_iters=-1 must be an integer >= 0'),
    ({'model.dtype': 'float8'}, "model.dtype='float8'"),
    ({'pipeline.remat_policy': 'bogus'}, "pipeline.remat_policy='bogus'"),
    ({'data.source': 'nope'}, "data.source='nope'"),
    ({'model.d_model': 0}, 'model.d_model=0'),
    ({'optim.lr': -1}, 'optim.lr=-1.0 must be a finite number > 0'),
    ({'optim.lr': float('nan')}, 'optim.lr=nan must be a finite number > 0'),
    ({'optim.b1': 1.0}, 'optim.b1=1.0 must be in [0, 1)'),
    ({'optim.b2': -0.1}, 'optim.b2=-0.1 must be in [0, 1)'),
    ({'optim.warmup_steps': -5}, 'optim.warmup_steps=-5 must be an integer >= 0'),
    ({'optim.decay_steps': 0}, 'optim.decay_steps=0 must be a positive integer'),
    ({'optim.min_lr_ratio': 2.0}, 'optim.min_lr_ratio=2.0 must be in [0, 1]'),
    ({'optim.grad_clip': -1.0}, 'optim.grad_clip=-1.0 must be a finite number >= 0'),
    ({'optim.weight_decay': -0.1}, 'optim.weight_decay=-0.1 must be a finite number >= 0'),
    ({'checkpoint_keep': 0}, 'checkpoint_keep=0 must be >= 1'),
    ({'checkpoint_keep': -1}, 'checkpoint_keep=-1 must be >= 1'),
    ({'eval_every': 5, 'eval_batches': 0}, 'eval_batches=0 with eval_every=5'),
    ({'moe.dropout': 1.0}, 'moe.dropout=1.0 must be in [0, 1)'),
])
def test_validation_errors_name_the_keys(overrides, message):
  config = small_config(4, 4, **overrides)
  with pytest.raises(ConfigError, match=re.escape(message)):
    validation.validate(config, num_devices=16)


def test_too_few_devices():
  with pytest.raises(ConfigError, match='only 8 are available'):
    validation.validate(small_config(4, 4), num_devices=8)


def test_unknown_and_missing_keys():
  config = small_config(1, 1)
  config.moe.capacity = 2
  with pytest.raises(ConfigError, match=r"Unknown config keys: \['moe.capacity'\]"):
    validation.validate(config, num_devices=16)
  config = small_config(1, 1)
  del config.moe['d_ff']
  with pytest.raises(ConfigError, match=r"Missing config keys: \['moe.d_ff'\]"):
    validation.validate(config, num_devices=16)


def test_derived_numbers_are_computed():
  d = config_lib.describe(small_config(2, 4))
  assert d['tokens_per_step'] == 16 * 1 * 32 and d['local_experts_per_device'] == 4
  assert d['padded_vocab'] % 128 == 0


def test_a_new_key_is_one_field(monkeypatch):
  """Adding a key is a field of a config dataclass (its key, rule and default) plus its line in
  the config files: the key is then known, read, checked and defaulted for older configs and
  checkpoints, with nothing else edited."""
  import dataclasses
  from moejax.train import checkpoint
  extended = dataclasses.make_dataclass(
      'ModelConfig', [('dummy_width', int, config_lib.key('model.dummy_width', config_lib.POSITIVE,
                                                          default=7))],
      bases=(config_lib.ModelConfig,), frozen=True)
  monkeypatch.setattr(config_lib, 'ModelConfig', extended)
  assert 'model.dummy_width' in config_lib.known_keys()
  config = small_config(1, 1)
  assert config_lib.model_config(config).dummy_width == 7          # a config without it
  assert checkpoint._saved_value({'model': {}}, 'model', 'dummy_width') == 7   # an old checkpoint
  config.model.dummy_width = 3
  validation.validate(config, num_devices=16)
  assert config_lib.model_config(config).dummy_width == 3
  config.model.dummy_width = 0
  with pytest.raises(ConfigError, match='model.dummy_width=0 must be a positive integer'):
    validation.validate(config, num_devices=16)
  monkeypatch.undo()
  with pytest.raises(ConfigError, match=r"Unknown config keys: \['model.dummy_width'\]"):
    validation.validate(config, num_devices=16)


def test_the_config_reference_is_generated_from_the_declarations():
  """docs/config_keys.md is what `python -m moejax.config_reference` prints (regenerate it after
  changing a key), and every key has a description there."""
  import os
  from moejax import config_reference
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  page = open(os.path.join(root, 'docs', 'config_keys.md')).read()
  assert page == config_reference.render(), (
      'stale: python -m moejax.config_reference > docs/config_keys.md')
  rows = [l for l in page.splitlines() if l.startswith('| `')]
  assert len(rows) == len(config_lib.known_keys())
  assert not [r for r in rows if r.rstrip().endswith('|  |')], 'a key without a description'
