"""Dropless dispatch: every mesh equals the capacity path given room for every assignment; the
expert-dropout masks do not depend on the mesh; the padded exchange CPUs run has
jax.lax.ragged_all_to_all's documented result; checkpoints move between the two dispatches."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from moejax import kernels
from moejax.parallel import experts as ep_lib, mesh as mesh_lib
from moejax.train import loop
from tests.helpers import assert_trees_close, loss_and_grads, small_config

pytestmark = pytest.mark.mesh

DROPLESS = {'moe.dispatch': 'dropless'}
ROOMY = 8.0   # capacity factor E: C = K*S slots, nothing can drop


@functools.lru_cache(maxsize=None)
def capacity_reference(top_k: int):
  return loss_and_grads(small_config(1, 1, **{'moe.top_k': top_k, 'moe.capacity_factor': ROOMY}))


def assert_same_run(actual, expected):
  (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = actual, expected
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for key in ('ce', 'aux_loss', 'z_loss', 'dropped_frac'):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-8, err_msg=key)
  np.testing.assert_array_equal(metrics['expert_load'], ref_metrics['expert_load'])
  assert_trees_close(grads, ref_grads, rtol=1e-5)


@pytest.mark.parametrize('top_k', [1, 2])
@pytest.mark.parametrize('tp,pp,repeats', [(1, 1, 1), (4, 4, 1), (4, 4, 2)])
def test_dropless_equals_capacity_with_room_for_every_assignment(tp, pp, repeats, top_k):
  run = loss_and_grads(small_config(tp, pp, repeats, **DROPLESS, **{'moe.top_k': top_k}))
  assert run[1]['dropped_frac'] == 0.0
  assert_same_run(run, capacity_reference(top_k))


def test_dropless_keeps_what_capacity_drops():
  """The comparison above can fail: at capacity factor 1.1 the capacity path drops and differs."""
  tight = loss_and_grads(small_config(1, 1, **{'moe.capacity_factor': 1.1}))
  assert tight[1]['dropped_frac'] > 0.02
  with pytest.raises(AssertionError):
    assert_same_run(tight, capacity_reference(1))


DROPOUT = {**DROPLESS, 'moe.dropout': 0.1, 'moe.top_k': 2, 'data.micro_batch_size': 4,
           'data.num_micro_batches': 8}


@functools.lru_cache(maxsize=None)
def dropout_reference():
  return loss_and_grads(small_config(1, 1, **DROPOUT))


@pytest.mark.parametrize('tp,pp,dp,folded', [(4, 4, 1, False), (4, 2, 2, True)])
def test_dropless_expert_dropout_is_mesh_independent(tp, pp, dp, folded):
  """dp=2 with experts folded over dp x tp: 8 expert shards exchange ragged rows."""
  run = loss_and_grads(small_config(tp, pp, dp=dp, **DROPOUT, **{'mesh.experts_over_dp': folded}))
  assert_same_run(run, dropout_reference())


def test_dropless_expert_dropout_changes_the_gradients():
  _, _, grads = loss_and_grads(small_config(1, 1, **{**DROPOUT, 'moe.dropout': 0.0}))
  with pytest.raises(AssertionError):
    assert_trees_close(grads['blocks']['moe'], dropout_reference()[2]['blocks']['moe'], rtol=1e-2)


def _documented_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                  recv_sizes):
  """jax.lax.ragged_all_to_all's docstring, in NumPy over all devices at once ([dev, ...])."""
  n = operand.shape[0]
  result = output.copy()
  for dst in range(n):
    for src in range(n):
      size = send_sizes[src, dst]
      assert recv_sizes[dst, src] == size
      start = input_offsets[src, dst]
      at = output_offsets[src, dst]
      result[dst, at:at + size] = operand[src, start:start + size]
  return result


@pytest.mark.quick
def test_padded_exchange_has_ragged_all_to_all_semantics():
  """Random slices with gaps and any order of offsets, over 4 devices, as the docstring says."""
  devices, rows, out_rows = 4, 6, 16
  rng = np.random.default_rng(0)
  in_off = np.tile(np.array([0, 2, 3, 5]), (devices, 1))               # [src, dst] slices of
  send = np.minimum(rng.integers(0, 3, (devices, devices)), [2, 1, 2, 1])  # at most 2, 1, 2, 1
  out_off = np.zeros_like(send)                                          # [src, dst] on dst
  for dst in range(devices):                                             # receivers leave gaps
    out_off[:, dst] = np.cumsum(send[:, dst] + 1) - send[:, dst] - 1 + dst % 2
  operand = rng.normal(size=(devices, rows, 3)).astype(np.float32)
  output = np.full((devices, out_rows, 3), -1.0, np.float32)
  expected = _documented_ragged_all_to_all(operand, output, in_off, send, out_off, send.T)
  mesh = Mesh(np.array(jax.devices()[:devices]), ('x',))
  fn = jax.shard_map(
      lambda *a: ep_lib.padded_ragged_all_to_all(*(x[0] for x in a), axis_name='x')[None],
      mesh=mesh, in_specs=(P('x'),) * 6, out_specs=P('x'))
  got = fn(operand, output, *(jnp.asarray(a, jnp.int32) for a in (in_off, send, out_off, send.T)))
  np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.quick
def test_the_exchange_is_chosen_by_the_meshs_backend():
  mesh = Mesh(np.array(jax.devices()[:1]), ('x',))
  with jax.set_mesh(mesh):
    assert kernels.exchange(mesh_lib.platform()) == 'padded'   # XLA:CPU: no ragged-all-to-all
  assert kernels.exchange('cuda') == 'ragged'


def test_checkpoints_move_between_capacity_and_dropless(tmp_path):
  """The parameters are the same: a capacity run resumes dropless and back."""
  def config(steps, dispatch):
    c = small_config(1, 1, **{'data.num_micro_batches': 2, 'moe.dispatch': dispatch})
    c.update(dict(num_steps=steps, checkpoint_every=0))
    return c
  workdir = str(tmp_path)
  loop.train(config(1, 'capacity'), workdir)
  loop.train(config(2, 'dropless'), workdir)
  loop.train(config(3, 'capacity'), workdir)
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [1, 2, 3]
  assert records[1]['dropped_frac'] == 0.0 and records[2]['dropped_frac'] > 0.0
