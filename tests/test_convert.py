"""The open families against transformers, and the conversions both ways.

tests/data/hf/<family> holds tiny random checkpoints and transformers' float32 logits on them
(made by tests/data/make_hf_families.py, transformers 5.24.0): the imported model must give those
logits on 1x1 and 4x4 meshes (dropless), and through the KV cache. Export then re-import is
bit-identical; a wrong, missing or extra tensor is one error naming it.
"""
import importlib
import json
import os
import shutil

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from moejax import config as config_lib, validation
from moejax.errors import ConfigError
from moejax.convert import families, hf as hf_lib, mapping
from moejax.convert.safetensors_io import Reader
from moejax.model import decode, params as params_lib
from moejax.train.plan import Plan
from tests.helpers import model_forward

pytestmark = pytest.mark.mesh

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'hf')
FAMILIES = ('olmoe', 'qwen3_moe', 'mixtral', 'qwen2_moe', 'gpt_oss', 'deepseek_v3')


def _config(family, tp=1, pp=1):
  config = importlib.import_module(f'configs.{family}').get_config(
      os.path.join(DATA, family) + ',cpu')
  config.mesh.tp, config.mesh.pp = tp, pp
  config.data.update(seq_len=16, micro_batch_size=2, num_micro_batches=4, source='random')
  config.moe.group_size = 16
  return config


def _load(family, config=None):
  m = config_lib.model_config(config or _config(family))
  return hf_lib.load_params(os.path.join(DATA, family), m, families.FAMILIES[family])


def _reference(family):
  ref = np.load(os.path.join(DATA, family, 'logits.npz'))
  return ref['ids'], ref['logits']                                     # [8, 16], [8, 16, V]


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('tp,pp', [(1, 1), (4, 4)])
def test_imported_model_gives_transformers_logits(family, tp, pp):
  config = _config(family, tp, pp)
  ids, expected = _reference(family)
  tokens = np.concatenate([ids.reshape(4, 2, 16), np.zeros((4, 2, 1), np.int32)], -1)
  _, metrics, logits = model_forward(config, _load(family, config), tokens, train=False)
  got = logits[..., :config.model.vocab_size].reshape(expected.shape)
  err = np.abs(got - expected).max() / np.abs(expected).max()
  assert err <= 1e-5, f'{family} on {tp}x{pp}: relative error {err:.2e}'
  assert metrics['dropped_frac'] == 0.0


@pytest.mark.parametrize('family,tp', [('olmoe', 4), ('mixtral', 4), ('qwen3_moe', 1),
                                       ('qwen2_moe', 4), ('gpt_oss', 4), ('deepseek_v3', 4)])
def test_cached_decoding_gives_transformers_logits(family, tp):
  """The KV-cache decoder (grouped-query heads, QK-norm, renormalised gates) on the same
  checkpoints: a prefill of 12 tokens, then 4 single-token steps."""
  config = _config(family, tp, 1)
  config.data.num_micro_batches = 1
  plan, params = Plan(config), _load(family, config)
  ids, expected = _reference(family)
  cfg = plan.model
  step = plan.jit(lambda p, c, x, at: decode.extend(p, c, x, at, cfg=cfg))
  cache = plan.jit(lambda: decode.empty_cache(cfg, 8, 16))()
  logits, cache = step(params, cache, jnp.asarray(ids[:, :12]), 0)
  outs = [np.asarray(logits)]
  for t in range(12, 16):
    logits, cache = step(params, cache, jnp.asarray(ids[:, t:t + 1]), t)
    outs.append(np.asarray(logits))
  got = np.concatenate(outs, axis=1)[..., :cfg.vocab_size]
  assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize('family', FAMILIES)
def test_export_then_import_is_bit_identical(family, tmp_path):
  src = os.path.join(DATA, family)
  hf_lib.import_checkpoint(src, str(tmp_path / 'run'))
  files = hf_lib.export_checkpoint(str(tmp_path / 'run'), str(tmp_path / 'out'),
                                   dtype='float32', max_shard_bytes=100_000)
  assert sum(f.endswith('.safetensors') for f in files) > 1     # sharded, with an index
  original, exported = Reader(src), Reader(str(tmp_path / 'out'))
  assert exported.names() == original.names()                   # every expert, nothing more
  for name in original.names():
    np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)
  again = _load_dir(family, str(tmp_path / 'out'))
  jax.tree.map(np.testing.assert_array_equal, again, _load(family))
  hf = json.load(open(tmp_path / 'out' / 'config.json'))
  assert families.sections(hf) == families.sections(families.read_hf_config(src))


def test_mxfp4_experts_dequantize_as_transformers_does():
  """GPT-OSS's published layout: MXFP4 codes and scales become transformers' float values
  exactly, and quantize() writes codes that read back to the same values."""
  from moejax.convert import mxfp4
  ref = np.load(os.path.join(DATA, 'gpt_oss_mxfp4', 'dequantized.npz'))
  got = np.swapaxes(mxfp4.dequantize(ref['blocks'], ref['scales']), -1, -2)   # [E, in, out]
  np.testing.assert_array_equal(got, ref['values'])
  again = mxfp4.dequantize(*mxfp4.quantize(np.swapaxes(got, -1, -2)))
  np.testing.assert_array_equal(np.swapaxes(again, -1, -2), got)
  assert not np.array_equal(mxfp4.dequantize(ref['blocks'] ^ 1, ref['scales']),
                            np.swapaxes(got, -1, -2))                 # a changed code shows


@pytest.mark.parametrize('tp,pp', [(1, 1), (4, 4)])
def test_an_mxfp4_checkpoint_imports_to_transformers_logits(tp, pp, tmp_path):
  """The tiny GPT-OSS with MXFP4 experts (random codes): imported, its logits are those
  transformers computes from them; exported, it is written unquantized and reads back the same."""
  src = os.path.join(DATA, 'gpt_oss_mxfp4')
  config = _config('gpt_oss', tp, pp)
  ids, expected = _reference('gpt_oss_mxfp4')
  params = hf_lib.load_params(src, config_lib.model_config(config), families.FAMILIES['gpt_oss'])
  tokens = np.concatenate([ids.reshape(4, 2, 16), np.zeros((4, 2, 1), np.int32)], -1)
  _, _, logits = model_forward(config, params, tokens, train=False)
  got = logits[..., :config.model.vocab_size].reshape(expected.shape)
  assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
  if tp == 1:
    hf_lib.import_checkpoint(src, str(tmp_path / 'run'))
    hf_lib.export_checkpoint(str(tmp_path / 'run'), str(tmp_path / 'out'), dtype='float32')
    names = Reader(str(tmp_path / 'out')).names()
    assert 'model.layers.0.mlp.experts.gate_up_proj' in names
    assert not any(n.endswith(('_blocks', '_scales')) for n in names)
    jax.tree.map(np.testing.assert_array_equal, _load_dir('gpt_oss', str(tmp_path / 'out')),
                 params)


def test_mxfp4_tensors_of_another_dtype_are_refused(tmp_path):
  out = tmp_path / 'bad'
  out.mkdir()
  shutil.copy(os.path.join(DATA, 'gpt_oss_mxfp4', 'config.json'), out)
  reader = Reader(os.path.join(DATA, 'gpt_oss_mxfp4'))
  tensors = {n: reader.get(n) for n in reader.names()}
  name = 'model.layers.1.mlp.experts.down_proj_scales'
  tensors[name] = tensors[name].astype(np.float32)
  save_file(tensors, str(out / 'model.safetensors'))
  with pytest.raises(ConfigError, match=f'{name} of dtype F32 \\(expected U8\\)'):
    hf_lib.import_checkpoint(str(out), str(tmp_path / 'run'))


def _load_dir(family, directory):
  return hf_lib.load_params(directory, config_lib.model_config(_config(family)),
                            families.FAMILIES[family])


def _copy(family, tmp_path, edit):
  """A copy of a family's checkpoint with its tensors edited by edit(dict) -> dict."""
  out = tmp_path / f'{family}_edited'
  out.mkdir()
  shutil.copy(os.path.join(DATA, family, 'config.json'), out)
  reader = Reader(os.path.join(DATA, family))
  save_file(edit({n: reader.get(n) for n in reader.names()}), str(out / 'model.safetensors'))
  return str(out)


def test_fused_expert_tensors_are_accepted(tmp_path):
  """transformers' in-memory layout (experts.gate_up_proj [E, 2F, D], experts.down_proj
  [E, D, F]) imports to the same parameters as the per-expert tensors."""
  def fuse(tensors):
    out = {n: a for n, a in tensors.items() if '.experts.' not in n}
    for b in range(4):
      p = f'model.layers.{b}.mlp.experts'
      gate = [tensors[f'{p}.{e}.gate_proj.weight'] for e in range(8)]
      up = [tensors[f'{p}.{e}.up_proj.weight'] for e in range(8)]
      out[f'{p}.gate_up_proj'] = np.stack([np.concatenate(gu) for gu in zip(gate, up)])
      out[f'{p}.down_proj'] = np.stack([tensors[f'{p}.{e}.down_proj.weight'] for e in range(8)])
    return out
  fused = _load_dir('olmoe', _copy('olmoe', tmp_path, fuse))
  jax.tree.map(np.testing.assert_array_equal, fused, _load('olmoe'))


@pytest.mark.quick
@pytest.mark.parametrize('edit,message', [
    (lambda t: {n: a for n, a in t.items() if n != 'model.layers.2.mlp.experts.5.up_proj.weight'},
     'missing tensors: model.layers.2.mlp.experts.5.up_proj.weight'),
    (lambda t: {**t, 'model.layers.0.mlp.shared_expert.weight': np.zeros((4, 4), np.float32)},
     'no place for: model.layers.0.mlp.shared_expert.weight'),
    (lambda t: {**t, 'model.layers.1.self_attn.q_norm.weight': np.ones(8, np.float32)},
     r'model.layers.1.self_attn.q_norm.weight \[8\] \(expected \[32\]\)'),
])
def test_a_wrong_checkpoint_is_one_error_naming_the_tensor(tmp_path, edit, message):
  bad = _copy('olmoe', tmp_path, edit)
  with pytest.raises(ConfigError, match=message):
    hf_lib.import_checkpoint(bad, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()                      # nothing written


@pytest.mark.quick
def test_the_mapping_uses_every_tensor_and_fills_every_parameter_once():
  """Walking the table both ways: every HF name of a checkpoint (every row of a fused one)
  appears in exactly one application, and every parameter slice is the target of exactly one."""
  for family in FAMILIES:
    m = config_lib.model_config(_config(family))
    table = mapping.rules(m, families.FAMILIES[family])
    names = [(n, use.row) for use in mapping.uses(table, m) for n in use.names]
    assert len(names) == len(set(names))
    assert sorted({n for n, _ in names}) == Reader(os.path.join(DATA, family)).names()
    paths = [p for rule in table for p in rule.paths]
    assert len(paths) == len(set(paths))


@pytest.mark.quick
@pytest.mark.parametrize('family', ['qwen2_moe', 'qwen3_moe'])
def test_qwens_dense_layers_import_and_export_or_are_refused(family):
  """Qwen's dense layers (mlp_only_layers, and decoder_sparse_step: layer i is MoE when
  (i + 1) % step == 0): a leading run becomes model.dense_blocks, a run before every MoE layer
  model.dense_per_block, and both export back to keys that place the same layers; any other
  placement is one error naming the dense layers."""
  hf = families.read_hf_config(os.path.join(DATA, family))
  cases = [  # (keys, dense_blocks, dense_per_block, num_blocks, exported keys)
      ({'mlp_only_layers': [1, 0], 'decoder_sparse_step': 1}, 2, 0, 4, ([0, 1], 1)),
      ({'mlp_only_layers': [], 'decoder_sparse_step': 2}, 0, 1, 3, ([], 2)),
      ({'mlp_only_layers': [1], 'decoder_sparse_step': 2}, 2, 1, 2, ([1], 2)),
      ({'mlp_only_layers': [0, 1, 2, 4], 'decoder_sparse_step': 1}, 2, 1, 2, ([1], 2)),
      ({'mlp_only_layers': [0, 1, 2, 3, 4], 'decoder_sparse_step': 1}, 5, 0, 1, ([0, 1, 2, 3, 4], 1)),
      ({'mlp_only_layers': [0, 1, 3], 'decoder_sparse_step': 1}, 0, 0, 0, None),
      ({'mlp_only_layers': [], 'decoder_sparse_step': 4}, 0, 0, 0, None),   # 4, 5 dense last
      ({'mlp_only_layers': list(range(6)), 'decoder_sparse_step': 1}, 0, 0, 0, None)]
  for keys, dense, between, blocks, exported in cases:
    case = {**hf, 'num_hidden_layers': 6, **keys}
    if exported is None:
      with pytest.raises(ConfigError, match=r'makes layers \[.*\] of 0..5 dense .*last layer'):
        families.model_keys(case)
      continue
    got = families.model_keys(case)
    assert (got['model.dense_blocks'], got['model.dense_per_block'],
            got['model.num_blocks'], got['model.dense_d_ff']) == (
                dense, between, blocks, hf['intermediate_size']), keys
    m = config_lib.model_config(ml_collections.ConfigDict(families.sections(case)))
    back = families.hf_config(families.FAMILIES[family], m)
    assert (back['mlp_only_layers'], back['decoder_sparse_step']) == exported, keys
    assert back['num_hidden_layers'] == 6 and back['intermediate_size'] == hf['intermediate_size']


def test_own_family_export_and_conflicting_overrides_are_refused(tmp_path):
  from configs import tp4pp4
  with pytest.raises(ConfigError, match='no Hugging Face architecture'):
    families.check_exportable(None, config_lib.model_config(tp4pp4.get_config('tiny')))
  config = _config('mixtral')
  config.model.num_kv_heads = 4
  with pytest.raises(ConfigError, match=r'model.num_kv_heads=4 conflicts with .*gives 2'):
    validation.validate(config, 16)


def test_transformers_loads_the_export(tmp_path):
  """Runs where torch and transformers are installed (not CI's requirements; see
  tests/data/make_hf_families.py): transformers' logits of an export equal the original's."""
  torch = pytest.importorskip('torch', reason='torch is not in CI; run by hand (README)')
  transformers = pytest.importorskip('transformers')
  for family in FAMILIES:
    hf_lib.import_checkpoint(os.path.join(DATA, family), str(tmp_path / family))
    out = str(tmp_path / f'{family}_out')
    hf_lib.export_checkpoint(str(tmp_path / family), out, dtype='float32')
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation='eager')
    ids, expected = _reference(family)
    with torch.no_grad():
      got = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('family,kv_spec', [('qwen3_moe', 'tp'), ('mixtral', None)])
def test_key_value_heads_split_over_tp_where_they_divide(family, kv_spec):
  """4 key/value heads split over tp=4; 2 are replicated. Experts and query heads split."""
  config = importlib.import_module(f'configs.{family}').get_config('tiny')
  plan = Plan(config)
  attn, moe = plan.param_sharding['blocks']['attn'], plan.param_sharding['blocks']['moe']
  assert attn['wkv'].spec[-2] == kv_spec
  assert attn['wq'].spec[-2] == 'tp' and moe['w3'].spec[3] == 'tp'


@pytest.mark.parametrize('family', FAMILIES)
def test_tiny_family_configs_train(family):
  """Each family's :tiny config takes train steps on a 2x2 mesh; the loss falls."""
  from tests.helpers import train_steps
  config = importlib.import_module(f'configs.{family}').get_config('tiny')
  config.mesh.tp, config.mesh.pp = 2, 2
  config.model.num_blocks = 4
  config.data.update(num_micro_batches=4, seq_len=32)
  config.moe.group_size = 32
  config.optim.warmup_steps = 1
  _, losses = train_steps(config, 6)
  assert np.isfinite(losses[-1]) and losses[-1] < losses[0]


def test_sample_and_evaluate_open_an_import(tmp_path):
  """An imported (params-only) checkpoint is a run the inference commands open: its family's
  run settings around the saved model, its params restored; greedy tokens equal those of the
  same params loaded straight from the Hugging Face files."""
  import subprocess
  import sys
  from moejax import generate as gen
  from moejax.cli import run_dir
  from tests.helpers import subprocess_env
  workdir = str(tmp_path / 'run')
  hf_lib.import_checkpoint(os.path.join(DATA, 'qwen3_moe'), workdir)
  step, config = run_dir.inference_config(workdir, -1, 1, 1)
  config.data.update(num_micro_batches=1, micro_batch_size=1)
  run = run_dir.restore(workdir, config, step)
  greedy = gen.Sampling()
  ids = gen.generate(run.plan, run.params, [1, 2, 3], 4, greedy)
  m = config_lib.model_config(config)
  direct = run.plan.params_to_training(run.plan.jit(lambda p: p)(
      hf_lib.load_params(os.path.join(DATA, 'qwen3_moe'), m, families.FAMILIES['qwen3_moe'])))
  assert ids.tolist() == gen.generate(run.plan, direct, [1, 2, 3], 4, greedy).tolist()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-m', 'moejax.cli.evaluate', f'--workdir={workdir}',
                        '--eval_batches=1'], cwd=root, capture_output=True, text=True,
                       timeout=300, env=subprocess_env())
  assert out.returncode == 0 and 'validation loss' in out.stdout, out.stderr[-2000:]


# The import's peak above the process at rest: VmHWM (ru_maxrss would count the forking
# parent's memory from before the exec).
_PEAK = '''
import os, sys
from moejax.convert import hf
status = lambda key: next(int(l.split()[1]) for l in open('/proc/self/status')
                          if l.startswith(key + ':')) / 1024
before = status('VmRSS')
hf.import_checkpoint(sys.argv[1], sys.argv[2])
print(status('VmHWM') - before)
'''


def test_import_memory_is_bounded_by_a_layer_not_the_model(tmp_path):
  """An 8-layer checkpoint (388 MiB in bfloat16; every stacked expert matrix 256 MiB in
  float32): the import's peak above the process's resting size stays under one layer (49 MiB
  in bfloat16) plus a fixed 64 MiB, where building a stacked array would take 256 MiB."""
  import subprocess
  import sys
  from configs import olmoe
  from moejax.perf import random_hf
  from tests.helpers import subprocess_env
  config = olmoe.get_config('tiny')
  config.model.update(d_model=512, num_blocks=8, vocab_size=1000)
  config.moe.update(d_ff=512, num_experts=32)
  size = random_hf.write(config, str(tmp_path / 'hf'), 0, 'bfloat16')
  layer = size / 8 / 2**20
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', _PEAK, str(tmp_path / 'hf'), str(tmp_path / 'run')],
                       cwd=root, capture_output=True, text=True, timeout=300,
                       env=subprocess_env())
  assert out.returncode == 0, out.stderr[-2000:]
  peak = float(out.stdout.split()[-1])
  print(f'import peak above rest: {peak:.1f} MiB; one layer {layer:.1f} MiB')
  assert peak < layer + 64, f'{peak:.0f} MiB'
  m = config_lib.model_config(config)
  again = _restored(str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, again,
               hf_lib.load_params(str(tmp_path / 'hf'), m, families.FAMILIES['olmoe']))


def _restored(workdir):
  """Every array of an imported checkpoint, read back through Orbax."""
  from moejax import checkpoint_dir
  item, prefix = checkpoint_dir.params_item(os.path.join(workdir, 'checkpoints', '0'))
  m = config_lib.model_config(checkpoint_dir.read_config(os.path.join(workdir, 'checkpoints', '0')))
  return hf_lib._nest({p: hf_lib.restore_array(item, prefix + p)
                       for p in params_lib.canonical_shapes(m)})


def test_conversion_in_small_chunks_gives_the_same_arrays(tmp_path, monkeypatch):
  """With 4 KiB chunks every array is cut, and the vocabulary tables move in spans of 32 rows
  (4 spans of 100, the last short), both ways: what Orbax restores is still exactly the
  checkpoint's parameters, and the export holds exactly its tensors."""
  monkeypatch.setattr(hf_lib, 'CHUNK', 4096)
  src = os.path.join(DATA, 'gpt_oss')
  spans = []
  real_get = Reader.get
  monkeypatch.setattr(Reader, 'get', lambda self, name, row=None, span=None: (
      spans.append(span) if name == 'lm_head.weight' else None,
      real_get(self, name, row, span))[1])
  hf_lib.import_checkpoint(src, str(tmp_path / 'run'))
  assert spans == [(0, 32), (32, 64), (64, 96), (96, 100)], spans
  jax.tree.map(np.testing.assert_array_equal, _restored(str(tmp_path / 'run')), _load('gpt_oss'))
  hf_lib.export_checkpoint(str(tmp_path / 'run'), str(tmp_path / 'out'), dtype='float32')
  original, exported = Reader(src), Reader(str(tmp_path / 'out'))
  assert exported.names() == original.names()
  for name in original.names():
    np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)


def test_a_deepseek_checkpoints_mtp_module_is_left_out_and_said(tmp_path):
  """DeepSeek-V3 stores its multi-token-prediction module as a layer past the model's: the
  import leaves it out and names it; the model's tensors import."""
  def add_mtp(tensors):
    out = dict(tensors)
    out.update({n.replace('layers.4.', 'layers.5.'): a for n, a in tensors.items()
                if n.startswith('model.layers.4.')})
    out['model.layers.5.eh_proj.weight'] = np.zeros((32, 64), np.float32)
    return out
  src = _copy('deepseek_v3', tmp_path, add_mtp)
  assert hf_lib.import_notes(src) == [
      'Left out the 39 tensors of the multi-token-prediction module '
      '(model.layers.5.eh_proj.weight, ...); model.mtp_depth=N trains new ones.']
  hf_lib.import_checkpoint(src, str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, _restored(str(tmp_path / 'run')),
               _load('deepseek_v3'))


def _with_mtp(tmp_path) -> str:
  """The tiny DeepSeek-V3 checkpoint with one multi-token-prediction layer as DeepSeek stores
  it (layer 5 past the model's 1 dense + 4 MoE: a block's tensors, enorm, hnorm, eh_proj
  [D, 2D], shared_head.norm, and copies of the token table and head), config.json naming it."""
  rng = np.random.default_rng(0)
  def add_mtp(tensors):
    out = dict(tensors)
    out.update({n.replace('layers.4.', 'layers.5.'): a + 0.01 * rng.standard_normal(a.shape)
                for n, a in tensors.items() if n.startswith('model.layers.4.')})
    mtp = 'model.layers.5.'
    out.update({mtp + 'enorm.weight': 1 + 0.1 * rng.standard_normal(32),
                mtp + 'hnorm.weight': 1 + 0.1 * rng.standard_normal(32),
                mtp + 'shared_head.norm.weight': 1 + 0.1 * rng.standard_normal(32),
                mtp + 'eh_proj.weight': 0.1 * rng.standard_normal((32, 64)),
                mtp + 'embed_tokens.weight': tensors['model.embed_tokens.weight'],
                mtp + 'shared_head.head.weight': tensors['lm_head.weight']})
    return {n: np.asarray(a, np.float32) for n, a in out.items()}
  src = _copy('deepseek_v3', tmp_path, add_mtp)
  hf = json.load(open(os.path.join(src, 'config.json')))
  json.dump(dict(hf, num_nextn_predict_layers=1), open(os.path.join(src, 'config.json'), 'w'))
  return src


def test_a_deepseek_mtp_layer_imports_and_exports(tmp_path):
  """config.json's num_nextn_predict_layers=1 with its layer: imported as model.mtp_depth=1 (the
  projection's halves, norms and block in place), exported back to the same tensors (the
  token-table and head copies left out); without the layer the import turns MTP off and says
  so."""
  src = _with_mtp(tmp_path)
  assert hf_lib.import_notes(src) == []
  hf_lib.import_checkpoint(src, str(tmp_path / 'run'))
  from moejax.checkpoint_dir import saved_config
  _, saved = saved_config(str(tmp_path / 'run'))
  assert saved.model.mtp_depth == 1
  params, reader = _restored(str(tmp_path / 'run')), Reader(src)
  w = reader.get('model.layers.5.eh_proj.weight')
  np.testing.assert_array_equal(params['mtp']['proj'][0, 0], w[:, :32].T)   # the embedding's
  np.testing.assert_array_equal(params['mtp']['proj'][0, 1], w[:, 32:].T)   # the hidden state's
  np.testing.assert_array_equal(params['mtp']['block']['ln1']['scale'][0],
                                reader.get('model.layers.5.input_layernorm.weight'))
  hf_lib.export_checkpoint(str(tmp_path / 'run'), str(tmp_path / 'out'), dtype='float32')
  exported = Reader(str(tmp_path / 'out'))
  copies = {'model.layers.5.embed_tokens.weight', 'model.layers.5.shared_head.head.weight'}
  assert set(exported.names()) == set(reader.names()) - copies
  for name in exported.names():
    np.testing.assert_array_equal(exported.get(name), reader.get(name), err_msg=name)
  assert json.load(open(tmp_path / 'out' / 'config.json'))['num_nextn_predict_layers'] == 1

  def drop_mtp(tensors):
    return {n: a for n, a in tensors.items() if not n.startswith('model.layers.5.')}
  (tmp_path / 'bare').mkdir()
  bare = _copy('deepseek_v3', tmp_path / 'bare', drop_mtp)
  hf = json.load(open(os.path.join(bare, 'config.json')))
  json.dump(dict(hf, num_nextn_predict_layers=1), open(os.path.join(bare, 'config.json'), 'w'))
  assert hf_lib.import_notes(bare) == [
      'config.json names 1 multi-token-prediction module(s) that the checkpoint does not hold: '
      'imported without (model.mtp_depth=N on a fine-tune starts them fresh).']
  hf_lib.import_checkpoint(bare, str(tmp_path / 'bare_run'))
  assert saved_config(str(tmp_path / 'bare_run'))[1].model.mtp_depth == 0


@pytest.mark.parametrize('family,mtp_depth', [('deepseek_v3', 0), ('deepseek_v3', 1),
                                              ('gpt_oss', 0)])
def test_an_imported_model_fine_tunes_on_4x4_like_1x1_resumes_and_exports(tmp_path, family,
                                                                          mtp_depth):
  """init_from an import of a tiny DeepSeek-V3 (its MTP depth, when asked, starting fresh) or
  GPT-OSS: 4x4 for 2 steps, resumed to 3, logs the losses of 3 straight steps on 4x4 bit for bit
  and on 1x1 to rtol 1e-4; the result exports (MTP layer included) and imports back."""
  from moejax.train import loop
  from tests.test_checkpoint import losses
  hf_lib.import_checkpoint(os.path.join(DATA, family), str(tmp_path / 'imp'))

  def config(tp, pp, steps):
    c = _config(family, tp, pp)
    c.model.mtp_depth = mtp_depth
    c.update(init_from=str(tmp_path / 'imp'), num_steps=steps, log_every=1, checkpoint_every=0)
    return c
  loop.train(config(4, 4, 2), str(tmp_path / 'a'))
  loop.train(config(4, 4, 3), str(tmp_path / 'a'))
  loop.train(config(4, 4, 3), str(tmp_path / 'straight'))
  loop.train(config(1, 1, 3), str(tmp_path / 'b'))
  a, b = losses(tmp_path / 'a'), losses(tmp_path / 'b')
  assert sorted(a) == [1, 2, 3] and a == losses(tmp_path / 'straight')
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-4)
  with open(tmp_path / 'a' / 'metrics.jsonl') as f:
    records = [json.loads(l) for l in f]
  assert ('mtp_ce' in records[-1]) == bool(mtp_depth), records[-1].keys()
  hf_lib.export_checkpoint(str(tmp_path / 'a'), str(tmp_path / 'out'), dtype='float32')
  names = set(Reader(str(tmp_path / 'out')).names())
  assert names >= set(Reader(os.path.join(DATA, family)).names())
  assert any('eh_proj' in n for n in names) == bool(mtp_depth)
  hf_lib.import_checkpoint(str(tmp_path / 'out'), str(tmp_path / 'again'))
