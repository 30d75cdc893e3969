"""Shared test helpers: small configs and the 1x1-reference comparison."""
from __future__ import annotations

import os

import jax
import numpy as np

from configs import tp4pp4
from moejax import config as config_lib
from moejax.model import params as params_lib, transformer
from moejax.train import check
from moejax.train.plan import Plan


def subprocess_env(fast_compile: bool = True, **extra: str) -> dict[str, str]:
  """The environment of a test's subprocess (main.py and the CLIs): the test run's XLA flags
  without the simulated device count (they simulate their own), and `extra`. fast_compile=False:
  XLA's default optimisation, for runs of many steps (their execution outweighs compiling)."""
  flags = os.environ.get('MOEJAX_TEST_XLA_FLAGS', '') if fast_compile else ''
  return dict(os.environ, XLA_FLAGS=flags, **extra)


def readme_commands(heading: str) -> list[str]:
  """The commands of the first bash block after README.md's `heading` (comments left out)."""
  import os
  import re
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  section = open(os.path.join(root, 'README.md')).read().split(heading)[1]
  block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
  return [line for line in block.splitlines() if line and not line.startswith('#')]


def small_config(tp: int = 1, pp: int = 1, repeats: int = 1, dp: int = 1, **overrides):
  """A model small enough to compile in seconds; keys as in configs/tp4pp4.py."""
  c = tp4pp4.get_config('tiny')
  c.mesh.tp, c.mesh.pp, c.mesh.dp, c.pipeline.repeats = tp, pp, dp, repeats
  c.model.update(d_model=32, num_heads=4, head_dim=8, num_blocks=max(8, pp * repeats),
                 max_len=32)
  c.moe.update(num_experts=8, d_ff=48, group_size=8, z_loss_weight=1e-3)
  c.data.update(seq_len=32, micro_batch_size=1, num_micro_batches=16, source='random')
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    (c[section] if section else c)[name] = value
  return c


_RESULTS: dict[tuple[str, int], tuple] = {}


def loss_and_grads(config, seed: int = 0):
  """(loss, metrics, canonical grads) as numpy for a config's mesh, same params and batch;
  computed once per test process for each config and seed (several tests compare with the same
  1x1 reference), each caller given its own copies."""
  key = (config.to_json_best_effort(sort_keys=True), seed)
  if key not in _RESULTS:
    _RESULTS[key] = check.loss_and_grads(config, seed)
  return jax.tree.map(lambda a: a.copy() if isinstance(a, np.ndarray) else a, _RESULTS[key])


def train_steps(config, steps: int):
  """(state, [loss of each step]) after `steps` train steps of a config on its mesh, from its
  seed."""
  from moejax.data.source import global_batch
  from moejax.train import loop
  plan = Plan(config)
  state, fn, source = plan.create_state(), plan.train_step(), loop.make_source(plan)
  losses = []
  for step in range(steps):
    state, metrics = fn(state, global_batch(source, step, plan.batch_sharding))
    losses.append(metrics['loss'])
  return state, [float(loss) for loss in losses]


def without_key_bias(tree):
  """The tree with every key bias (bqkv[..., 1, :, :]) zeroed, for comparing trained states.

  The key bias's gradient is exactly zero (a query's softmax ignores a shift shared by all its
  keys), so Adam turns its rounding noise into full-size steps that differ across meshes.
  """
  def zero(path, a):
    if 'bqkv' not in jax.tree_util.keystr(path) or np.ndim(a) < 3:
      return a
    a = np.array(a)
    a[..., 1, :, :] = 0
    return a
  return jax.tree_util.tree_map_with_path(zero, tree)


def assert_trees_close(actual, expected, rtol: float = 1e-5):
  """Per leaf: max |a - e| <= rtol * max |e| (relative to the leaf's scale)."""
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e)
  for (path, a), e in zip(flat_a, flat_e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, (jax.tree_util.keystr(path), a.shape, e.shape)
    scale = max(np.abs(e).max(), 1e-30)
    err = np.abs(a - e).max() / scale
    assert err <= rtol, f'{jax.tree_util.keystr(path)}: relative error {err:.2e} > {rtol}'


def perturbed_params(config, seed: int = 0, scale: float = 0.1, router_scale: float = 1.0):
  """Canonical params (blocks [NB, ...]) with every leaf moved off its init: biases and norms
  non-trivial, router weights large enough that no two experts nearly tie."""
  cfg = config_lib.model_config(config)
  params = jax.device_get(params_lib.init_canonical(cfg, jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  def move(path, a):
    name = jax.tree_util.keystr(path)
    s = router_scale if 'router' in name else scale
    return (np.asarray(a) + s * rng.standard_normal(a.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(move, params)


def model_forward(config, params, tokens, train: bool = True):
  """(loss, metrics, logits [M, B, T, V]) of the model on a config's mesh for canonical params."""
  from moejax.model.layers import Head
  plan = Plan(config)
  cfg, lay = plan.model, plan.layout
  staged = jax.device_put(params_lib.tree_to_stages(params, lay), plan.param_sharding)

  def fn(p, tokens, rng):
    loss, metrics = transformer.loss_fn(p, tokens, rng, cfg=cfg, lay=lay, train=train)
    hidden, _ = transformer.hidden_states(p, tokens[..., :-1], rng, cfg=cfg, lay=lay,
                                          train=train)
    return loss, metrics, Head(cfg).apply({'params': p['head']}, hidden)
  loss, metrics, logits = plan.jit(fn)(staged, tokens, jax.random.key(1))
  return float(loss), jax.device_get(metrics), np.asarray(logits)
