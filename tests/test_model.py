"""Shapes, parameter shardings (golden table), and the router's gradient from the LM loss."""
import json
import os

import jax
import numpy as np
import pytest

from moejax import config as config_lib, kernels
from moejax.errors import ConfigError
from moejax.model import layers, params as params_lib
from moejax.train.plan import Plan
from tests.helpers import loss_and_grads, small_config
from configs import tp4pp4

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden_param_specs_tp4pp4.json')


def _specs_and_shapes(config):
  plan = Plan(config)
  shardings, shapes = plan.param_sharding, plan.abstract_state.params
  flat = {}
  for (path, sh), shape in zip(jax.tree_util.tree_leaves_with_path(shardings),
                               jax.tree.leaves(shapes)):
    flat[jax.tree_util.keystr(path)] = f'{sh.spec} {list(shape.shape)}'
  return flat


def test_param_shardings_match_golden_table():
  """Every parameter's PartitionSpec on the full tp4pp4 config; update the JSON deliberately."""
  actual = _specs_and_shapes(tp4pp4.get_config())
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert actual == golden


def test_param_count_matches_design():
  shapes = jax.eval_shape(lambda k: params_lib.init_canonical(
      config_lib.model_config(tp4pp4.get_config()), k), jax.random.key(0))
  total = sum(np.prod(a.shape) for a in jax.tree.leaves(shapes))
  v, d, e, f, nb, pos = 50304, 1024, 64, 2048, 8, 1024        # padded vocab; N*H = d_model
  attn = 3 * d * d + 3 * d + d * d + d                        # wqkv, bqkv, wo, bo
  moe = d * e + e * d * f + e * f + e * f * d + e * d        # router, w1, b1, w2, b2
  block = attn + moe + 2 * 2 * d                              # + two LayerNorms
  assert total == v * d + pos * d + nb * block + 2 * d + d * v
  assert 2.2e9 < total < 2.4e9     # the seed design guide: about 2.29 B parameters


def test_output_shapes_and_router_gradient_from_lm_loss():
  config = small_config(1, 1)
  loss, metrics, grads = loss_and_grads(config)
  nb, e = config.model.num_blocks, config.moe.num_experts
  assert np.isfinite(loss)
  assert metrics['expert_load'].shape == (nb, e)
  assert grads['blocks']['moe']['w1'].shape == (nb, e, 32, 48)
  # The gate is the softmax probability, so the router learns from the LM loss.
  router = grads['blocks']['moe']['router']
  assert router.shape == (nb, 32, e)
  assert np.all(np.abs(router).max(axis=(1, 2)) > 0)


def test_bfloat16_compute_tracks_float32():
  """bf16 matmuls with float32 master weights: same loss to ~1%, gradients aligned, any mesh."""
  ref_loss, _, ref_grads = loss_and_grads(small_config(1, 1))
  loss, _, grads = loss_and_grads(small_config(2, 2, **{'model.dtype': 'bfloat16'}))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-2)
  a = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  b = np.concatenate([np.ravel(g) for g in jax.tree.leaves(ref_grads)])
  assert a.dtype == np.float32                                # master weights stay float32
  assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


def test_the_default_model_initialises_as_before():
  """The open families' options left at their defaults change nothing: the seed's model draws
  the same initial parameters as before they existed (a fingerprint of every leaf, recorded at
  commit 8f8f974; Linen draws init keys in declaration order, so reordering declarations fails
  here)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden_init_fingerprint.json')
  expected = json.load(open(path))
  params = params_lib.init_canonical(config_lib.model_config(small_config(1, 1)),
                                     jax.random.key(0))
  got = {jax.tree_util.keystr(k): float(np.sum(np.asarray(v, np.float64) * np.cos(
      np.arange(v.size)).reshape(v.shape))) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  assert got.keys() == expected.keys()
  for key, value in expected.items():   # other draws differ at O(1); XLA's optimisation
    assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), key  # level moves ~1e-8


def test_the_attention_kernel_is_cudnn_only_where_it_applies():
  def kernel(platform, packed=False, **model):
    c = tp4pp4.get_config('tiny')
    c.model.update(**model)
    return kernels.attention(config_lib.model_config(c), platform, packed)
  bf16 = dict(dtype='bfloat16')
  assert kernel('cpu', **bf16) == ('xla', 'XLA attention')
  assert kernel('cuda', **bf16) == ('cudnn', 'cuDNN fused attention')
  assert kernel('cuda', attention='xla', **bf16)[0] == 'xla'
  kind, why = kernel('cuda', packed=True, **bf16)
  assert kind == 'xla' and 'packed documents' in why
  kind, why = kernel('cuda')                                     # the tiny config is float32
  assert kind == 'xla' and 'model.dtype=float32' in why
  assert kernel('cuda', head_dim=256, **bf16)[0] == 'xla'
  with pytest.raises(ConfigError, match=r'model.attention=cudnn cannot apply: the devices are '
                                        r'cpu, not NVIDIA GPUs\. Use model.attention=auto'):
    kernel('cpu', attention='cudnn', **bf16)
  with pytest.raises(ConfigError, match='packed documents'):
    kernel('cuda', packed=True, attention='cudnn', **bf16)


def test_the_grouped_matmul_is_tokamax_mosaic_on_nvidia_targets(monkeypatch):
  import importlib.util

  assert kernels.grouped_matmul('cpu') == ('xla', 'XLA ragged_dot')
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)      # no tokamax
  kind, why = kernels.grouped_matmul('cuda')
  assert kind == 'xla' and 'pip install -r requirements-cuda12.txt' in why
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: object())
  kind, why = kernels.grouped_matmul('cuda')          # compiled here for abstract GPUs
  assert kind == 'xla' and 'ahead-of-time' in why
  monkeypatch.setattr(kernels.jax, 'default_backend', lambda: 'cuda')   # on a GPU
  assert kernels.grouped_matmul('cuda') == ('mosaic', 'tokamax Mosaic GPU grouped matmul')


def test_one_choice_of_kernels_says_the_compile_line():
  """kernels.choose gathers the three choices; the line names each, as the console prints it."""
  c = tp4pp4.get_config('tiny')
  c.moe.dispatch = 'dropless'
  cfg = config_lib.model_config(c)
  cpu = kernels.choose(cfg, 'cpu', packed=False, rows=True)
  assert (cpu.attention, cpu.grouped_matmul, cpu.exchange) == ('xla', 'xla', 'padded')
  assert cpu.line == ('dropless experts by ragged rows (padded all-to-all, XLA ragged_dot), '
                      'XLA attention')
  gpu = kernels.choose(cfg, 'cuda', packed=False, rows=True)
  assert gpu.exchange == 'ragged' and 'ragged all-to-all' in gpu.line
  c.moe.dispatch = 'capacity'
  line = kernels.choose(config_lib.model_config(c), 'cpu', False, rows=False).line
  assert line == 'capacity experts in fixed buffers, XLA attention'


def test_cudnn_attention_keeps_whole_a_dimension_its_mesh_axes_do_not_divide(monkeypatch):
  """Init traces one sequence through each block under the run's mesh (dp=2 here): cuDNN's
  shard_map keeps that batch whole on each shard (it once failed every dp > 1 GPU layout)."""
  called = []
  monkeypatch.setattr(layers.mesh_lib, 'platform', lambda: 'cuda')
  monkeypatch.setattr(layers.jax.nn, 'dot_product_attention',
                      lambda q, k, v, **_: called.append(q.shape) or q)
  c = tp4pp4.get_config('tiny')
  c.model.dtype = 'bfloat16'
  c.mesh.update(dp=2, tp=2, pp=4, experts_over_dp=True)
  plan = Plan(c)
  with plan.active():
    params = jax.eval_shape(lambda k: params_lib.init(plan.model, plan.layout, k),
                            jax.random.key(0))
  assert called and all(shape[0] == 1 for shape in called), called   # the one sequence, whole
  assert params['blocks']['attn']['wqkv'].shape[:3] == (4, 1, 2)
