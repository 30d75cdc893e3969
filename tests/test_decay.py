"""Weight decay follows each parameter's declaration: matrices decay; norm scales (QK-norm too),
biases, the selection bias and the position table never do."""
import jax
import jax.numpy as jnp
import optax
import pytest

from moejax import config as config_lib
from moejax.model import params as params_lib
from moejax.perf import shapes
from moejax.train import optimizer

MATRICES = {'tok', 'w', 'wqkv', 'wq', 'wkv', 'wo', 'router', 'w1', 'w2', 'w3', 'shared_w1',
            'shared_w2', 'shared_w3', 'shared_gate', 'wq_a', 'wq_b', 'wkv_a', 'wkv_b', 'proj'}
NEVER = {'scale', 'bias', 'q_norm', 'k_norm', 'bqkv', 'bq', 'bkv', 'bo', 'b1', 'b2', 'b3',
         'select_bias', 'pos', 'sinks', 'router_bias', 'q_a_norm', 'kv_a_norm'}


def listing(path: str, variant: str, **keys) -> dict[str, bool]:
  c = shapes.load(path, variant)
  for key, value in keys.items():
    section, name = key.split('.')
    c[section][name] = value
  flat = jax.tree_util.tree_leaves_with_path(params_lib.decayed(config_lib.model_config(c)))
  return {jax.tree_util.keystr(p): v for p, v in flat}


@pytest.mark.parametrize('path,variant,keys', [
    ('configs/tp4pp4.py', 'tiny', {'moe.bias_update_rate': 0.01}),   # biases, learned positions
    ('configs/olmoe.py', 'tiny', {}),                             # QK-norm over the width
    ('configs/qwen3_moe.py', 'tiny', {}),                         # QK-norm per head, GQA
    ('configs/mixtral.py', 'tiny', {}),
    ('configs/qwen2_moe.py', 'tiny', {}),                          # shared expert, q/k/v biases
    ('configs/gpt_oss.py', 'tiny', {}),                            # sinks, router and expert biases
    ('configs/deepseek_v3.py', 'tiny', {}),                        # MLA latents and their norms
    ('configs/deepseek_v3.py', 'tiny', {'model.mtp_depth': 2})])   # MTP's norms, projection
def test_only_matrices_decay(path, variant, keys):
  table = listing(path, variant, **keys)
  assert any('mtp' in name for name in table) == ('model.mtp_depth' in keys)
  print('\n'.join(f'{k:40s} {"decay" if v else "-"}' for k, v in table.items()))
  for name, decays in table.items():
    leaf = name.rsplit("['", 1)[-1].rstrip("']")
    assert leaf in MATRICES | NEVER, name
    assert decays == (leaf in MATRICES), name


def test_qk_norm_scales_keep_their_values_under_decay():
  c = shapes.load('configs/olmoe.py', 'tiny')
  cfg = config_lib.model_config(c)
  optim = config_lib.optim_config(c)
  params = params_lib.init_canonical(cfg, jax.random.key(0))
  tx = optimizer.make(optim, params_lib.decayed(cfg))
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for _ in range(optim.warmup_steps + 1):     # past warmup: the learning rate is not zero
    updates, state = tx.update(zeros, state, params)
  new = optax.apply_updates(params, updates)
  attn = lambda p: p['blocks']['attn']
  assert jnp.array_equal(attn(new)['q_norm'], attn(params)['q_norm'])
  assert jnp.array_equal(attn(new)['k_norm'], attn(params)['k_norm'])
  assert not jnp.allclose(attn(new)['wo'], attn(params)['wo'])      # a matrix decays
