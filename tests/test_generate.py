"""Generation: the KV-cache path computes what the windowed forward computes (logits at 1e-5,
greedy tokens identical) on 1x1 and a tp mesh, capacity drops included; token choice rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import generate as gen
from moejax.errors import ConfigError
from moejax.model import decode, params as params_lib
from moejax.train.plan import Plan
from tests.helpers import model_forward, perturbed_params, small_config

pytestmark = pytest.mark.mesh

PROMPT = [3, 17, 5, 9, 200, 11, 7, 3, 3, 17, 90]


def _setup(tp, **overrides):
  config = small_config(tp, 1, **{'data.num_micro_batches': 1, 'data.seq_len': 32, **overrides})
  plan = Plan(config)
  canonical = perturbed_params(config, scale=0.3)
  params = jax.device_put(params_lib.tree_to_stages(canonical, plan.layout), plan.param_sharding)
  return config, plan, canonical, params


@pytest.mark.parametrize('tp', [1, 4])
def test_cache_logits_equal_the_windowed_forward_with_drops(tp):
  """One pass of the cache over a whole window = the model's forward on it, position by
  position; eval capacity factor 0.5 (one slot per expert per group) makes it drop."""
  config, plan, canonical, _ = _setup(tp, **{'moe.eval_capacity_factor': 0.5})
  tokens = np.random.default_rng(1).integers(0, config.model.vocab_size, (1, 1, 33))
  _, metrics, expected = model_forward(config, canonical, tokens, train=False)
  assert metrics['dropped_frac'] > 0.1
  cfg = plan.model
  fn = plan.jit(lambda p, ids: decode.extend(p, decode.empty_cache(cfg, 1, 32), ids, 0,
                                             cfg=cfg)[0])
  got = np.asarray(fn(canonical, jnp.asarray(tokens[0, :, :32], jnp.int32)))   # [1, 32, V]
  v = config.model.vocab_size
  scale = np.abs(expected[0, 0, :, :v]).max()
  assert np.abs(got[0, :, :v] - expected[0, 0, :, :v]).max() <= 1e-5 * scale


@pytest.mark.parametrize('tp', [1, 4])
def test_greedy_generation_with_the_cache_equals_without(tp):
  _, plan, _, params = _setup(tp, **{'moe.eval_capacity_factor': 0.5})
  cached = gen.generate(plan, params, PROMPT, 20, gen.Sampling(), cache=True)
  windowed = gen.generate(plan, params, PROMPT, 20, gen.Sampling(), cache=False)
  np.testing.assert_array_equal(cached, windowed)
  assert len(set(cached[0, len(PROMPT):].tolist())) > 3      # not one token repeated


@pytest.mark.quick
def test_token_choice_rules():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)
  draw = lambda s: np.asarray(gen.choose(logits, keys, s))
  assert set(draw(gen.Sampling())) == {0}                                   # greedy
  assert set(draw(gen.Sampling(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draw(gen.Sampling(temperature=1.0, top_p=0.7))) == {0, 1}     # 0.5 + 0.3 >= 0.7
  assert set(draw(gen.Sampling(temperature=1.0, top_p=0.5))) == {0}
  assert set(draw(gen.Sampling(temperature=1.0))) == {0, 1, 2, 3}


@pytest.mark.quick
def test_cache_needs_a_mesh_without_stages():
  plan = Plan(small_config(1, 2, **{'data.num_micro_batches': 2, 'data.seq_len': 32}))
  with pytest.raises(ConfigError, match='pp=1'):
    gen.check_cached(plan, 4, 4)
  with pytest.raises(ConfigError, match='max_len'):
    gen.check_cached(Plan(small_config(1, 1)), 30, 10)


@pytest.mark.parametrize('arch,tp', [('deepseek_v3_mla', 4), ('deepseek_v3', 1), ('gpt_oss', 4),
                                     ('qwen2', 4), ('deepseek_v3_dense', 4)])
def test_cache_steps_equal_the_windowed_forward_for_new_blocks(arch, tp):
  """A prefill of 20 tokens, then 12 single-token steps, against the model's forward on the
  window: MLA (its cache holds latents and rotary keys; attention in latent space), DeepSeek's
  router and dense first blocks, GPT-OSS's sinks and windows, Qwen2-MoE's shared expert."""
  from tests.test_reference import ARCHES
  config, plan, canonical, _ = _setup(tp, **{'moe.top_k': 2, 'moe.eval_capacity_factor': 8.0,
                                             **ARCHES[arch]})
  tokens = np.random.default_rng(2).integers(0, config.model.vocab_size, (1, 1, 33))
  _, _, expected = model_forward(config, canonical, tokens, train=False)
  cfg = plan.model
  step = plan.jit(lambda p, c, ids, at: decode.extend(p, c, ids, at, cfg=cfg))
  cache = plan.jit(lambda: decode.empty_cache(cfg, 1, 32))()
  ids = jnp.asarray(tokens[0, :, :32], jnp.int32)
  logits, cache = step(canonical, cache, ids[:, :20], 0)
  outs = [np.asarray(logits)]
  for t in range(20, 32):
    logits, cache = step(canonical, cache, ids[:, t:t + 1], t)
    outs.append(np.asarray(logits))
  got, v = np.concatenate(outs, axis=1), config.model.vocab_size
  scale = np.abs(expected[0, 0, :, :v]).max()
  # MLA's cache attends in latent space: its products associate differently from the windowed
  # forward's expanded keys and values (1e-5 relative after 10 blocks in float32; a wrong mask,
  # rotation or routing is 1e-3 and up).
  assert np.abs(got[0, :, :v] - expected[0, 0, :, :v]).max() <= 3e-5 * scale
