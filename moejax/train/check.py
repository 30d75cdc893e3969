"""Loss, metrics and gradients of one training batch on any mesh, for comparing meshes.

The same params (from the seed) and batch (step 0 of the random source) on every mesh: the
1x1 mesh is the reference every other mesh must equal.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from moejax.data.synthetic import SyntheticSource
from moejax.model import params as params_lib, transformer
from moejax.train.plan import Plan


@functools.lru_cache(maxsize=4)
def _canonical_params(cfg, seed: int) -> Any:
  """The model's params from `seed` (canonical layout, numpy): computed once per model and seed,
  then placed on each mesh compared (the values are those of Plan.init_params on any mesh)."""
  return jax.device_get(jax.jit(params_lib.init_canonical, static_argnums=0)(
      cfg, jax.random.key(seed)))


def loss_and_grads(config, seed: int = 0, devices: Sequence[jax.Device] | None = None
                   ) -> tuple[float, dict[str, Any], Any]:
  """(loss, metrics, canonical grads [NB, ...]) as numpy, on the config's mesh over `devices`
  (default: jax.devices())."""
  plan = Plan(config, devices)
  cfg, lay = plan.model, plan.layout
  params = jax.device_put(params_lib.tree_to_stages(_canonical_params(cfg, seed), lay),
                          plan.param_sharding)
  tokens = SyntheticSource('random', cfg.vocab_size, lay.num_micro_batches,
                           lay.micro_batch_size, lay.seq_len, seed).batch(0)
  tokens = jax.device_put(tokens, plan.batch_sharding)
  fn = plan.jit(jax.value_and_grad(functools.partial(
      transformer.loss_fn, cfg=cfg, lay=lay, train=True), has_aux=True))
  (loss, metrics), grads = fn(params, tokens, jax.random.key(1))
  grads = params_lib.tree_from_stages(jax.device_get(grads))
  return float(loss), jax.device_get(metrics), jax.tree.map(np.asarray, grads)


def max_relative_error(actual, expected) -> tuple[float, str]:
  """Largest per-leaf max |a - e| / max |e| over two trees, and the leaf it occurs in."""
  worst, where = 0.0, ''
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    err = float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))
    if err > worst:
      worst, where = err, jax.tree_util.keystr(path)
  return worst, where


def equivalence(accelerators: list, tiny) -> dict:
  """A small config (`tiny`): 4x4 against 1x1, float32 with full-precision matmuls."""
  import jax
  four = accelerators if len(accelerators) >= 16 else jax.devices('cpu')
  with jax.default_matmul_precision('highest'):
    results = {}
    for name, (tp, pp, devices) in {'1x1': (1, 1, accelerators[:1]),
                                    '4x4': (4, 4, four[:16])}.items():
      c = tiny.copy_and_resolve_references()
      c.mesh.tp, c.mesh.pp = tp, pp
      c.data.source = 'random'
      results[name] = loss_and_grads(c, devices=devices)
  (loss, _, grads), (ref_loss, _, ref_grads) = results['4x4'], results['1x1']
  err, leaf = max_relative_error(grads, ref_grads)
  return {'equivalence_4x4_devices': f'{four[0].platform} x16',
          'equivalence_1x1_device': accelerators[0].device_kind,
          'equivalence_loss_rel_error': abs(loss - ref_loss) / abs(ref_loss),
          'equivalence_grad_max_rel_error': err, 'equivalence_grad_worst_leaf': leaf}
