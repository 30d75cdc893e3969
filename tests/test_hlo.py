"""The compiled train step holds the collectives we meant, and no all-gather of weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tp4pp4
from moejax import config as config_lib
from moejax.parallel import hlo, mesh as mesh_lib
from moejax.train import optimizer, state as state_lib, step as step_lib


def compiled_text(tp, pp, dp=1, experts_over_dp=False):
  c = tp4pp4.get_config('tiny')
  c.mesh.tp, c.mesh.pp, c.mesh.dp, c.mesh.experts_over_dp = tp, pp, dp, experts_over_dp
  cfg, lay = config_lib.model_config(c), config_lib.layout(c)
  mesh = mesh_lib.mesh_for(lay)
  tx = optimizer.make(c.optim)
  sh = state_lib.shardings(cfg, lay, tx, mesh)
  abstract = state_lib.abstract(cfg, lay, tx, mesh)
  step = step_lib.make_train_step(cfg, lay, tx, optimizer.schedule(c.optim), mesh, sh, 0)
  tokens = jax.ShapeDtypeStruct((lay.num_micro_batches, lay.micro_batch_size, lay.seq_len + 1),
                                jnp.int32, sharding=step_lib.batch_sharding(mesh))
  return step.lower(abstract, tokens).compile().as_text(), abstract.params


def weight_shapes(params):
  """Whole-weight shapes of sharded weights, which must never be all-gathered: global, per
  stage, per block. (Replicated weights such as the position table may be updated in shards
  and re-gathered by XLA: that is the second half of an all-reduce, not a weight gather.)"""
  shapes = set()
  for leaf in jax.tree.leaves(params):
    s = tuple(leaf.shape)
    if np.prod(s) < 1024 or leaf.sharding.is_fully_replicated:
      continue
    shapes.add(s)
    for k in range(1, 4):
      shapes.add(s[k:])
  return shapes


@pytest.mark.parametrize('tp,pp,dp,folded', [(4, 1, 1, False), (4, 4, 1, False),
                                             (2, 4, 2, True)])
def test_compiled_step_collectives(tp, pp, dp, folded):
  text, params = compiled_text(tp, pp, dp, folded)
  ops = hlo.collectives(text)
  kinds = {op.kind for op in ops}
  assert 'all-to-all' in kinds                      # expert dispatch and combine
  assert kinds & {'all-reduce', 'reduce-scatter'}   # TP reductions
  if pp > 1:
    assert 'collective-permute' in kinds            # pipeline shifts
  forbidden = weight_shapes(params)
  gathered = [op for op in ops if op.kind == 'all-gather' and set(op.shapes) & forbidden]
  assert not gathered, f'all-gather of whole weights: {gathered}'


def test_logits_never_whole_on_one_device():
  text, _ = compiled_text(4, 4)
  c = tp4pp4.get_config('tiny')
  vocab = config_lib.model_config(c).padded_vocab
  # No collective produces an array whose last axis is the whole vocabulary.
  for op in hlo.collectives(text):
    for shape in op.shapes:
      assert not (len(shape) >= 2 and shape[-1] == vocab and np.prod(shape) > vocab * 64), op


def test_collectives_in_loops_are_counted_per_iteration():
  text = '''
%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %x), replica_groups={}, to_apply=%add
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"19"}}
  %ag = f32[8]{0} all-gather(f32[4]{0} %a), dimensions={0}
}
'''
  by_kind = hlo.bytes_by_kind(text)
  assert by_kind['all-reduce'] == 19 * 16
  assert by_kind['all-gather'] == 32
