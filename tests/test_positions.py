"""Rotary positions: scores depend on relative positions only; every mesh equals 1x1; the
cache generates what the windowed forward does."""
import jax
import jax.numpy as jnp
import numpy as np

from moejax import config as config_lib, generate as gen
from moejax.model.layers import Attention
from moejax.model.positions import rope
from moejax.model import params as params_lib
from moejax.train.plan import Plan
from tests.helpers import assert_trees_close, loss_and_grads, perturbed_params, small_config

ROPE = {'model.positions': 'rope'}


def test_rope_attention_is_invariant_to_a_shift_of_all_positions():
  cfg = config_lib.model_config(small_config(**ROPE))
  x = jax.random.normal(jax.random.key(0), (2, 16, cfg.d_model))
  attn = Attention(cfg)
  params = attn.init(jax.random.key(1), x)
  params = jax.tree.map(lambda a: a * 30, params)          # scores far from uniform
  base = jnp.broadcast_to(jnp.arange(16), (2, 16))
  at = lambda offset: attn.apply(params, x, base + offset)
  np.testing.assert_allclose(at(37), at(0), atol=3e-5)          # outputs up to ~8, float32
  np.testing.assert_allclose(at(1000), at(0), atol=1e-4)
  # ... and not to the order of the tokens: positions matter.
  assert np.abs(attn.apply(params, x, base[:, ::-1]) - at(0)).max() > 1e-3


def test_rope_rotation_preserves_norms_and_rotates_pairs():
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
  y = rope(x, jnp.asarray([[0, 1, 5]]))
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-6)
  np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)          # position 0: no rotation
  assert np.abs(y[:, 1] - x[:, 1]).max() > 1e-2


def test_rope_4x4_mesh_matches_1x1():
  loss, metrics, grads = loss_and_grads(small_config(4, 4, **ROPE))
  ref_loss, ref_metrics, ref_grads = loss_and_grads(small_config(1, 1, **ROPE))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert 'pos' not in grads['embed']
  assert_trees_close(grads, ref_grads, rtol=1e-5)


def test_rope_generation_with_the_cache_equals_without():
  config = small_config(4, 1, **ROPE, **{'data.num_micro_batches': 1, 'data.seq_len': 32})
  plan = Plan(config)
  params = jax.device_put(params_lib.tree_to_stages(perturbed_params(config, scale=0.3),
                                                    plan.layout), plan.param_sharding)
  prompt = [3, 17, 5, 9, 200, 11]
  cached = gen.generate(plan, params, prompt, 20, gen.Sampling(), cache=True)
  windowed = gen.generate(plan, params, prompt, 20, gen.Sampling(), cache=False)
  np.testing.assert_array_equal(cached, windowed)
