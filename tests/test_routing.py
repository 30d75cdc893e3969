"""The MoE layer against a naive per-token reference, on every tp of the expert all_to_all."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import MeshShape
from moejax.model import ffn as ffn_lib, moe as moe_lib, routing
from moejax.parallel import mesh as mesh_lib
from moejax.train.plan import bare
from tests import numpy_reference


_erf = np.vectorize(math.erf)


def _gelu(x):
  return 0.5 * x * (1 + _erf(x / math.sqrt(2)))   # exact GELU (torch nn.GELU())


def naive_moe(x, w, top_k, capacity, normalize_gates=False, select_bias=None, group=None,
              sinkhorn_iters=0):
  """Each group in token order; all first choices claim slots before any second choice.

  Returns (y, kept mask [B, T, K], kept count per expert [B, T/group, E])."""
  x = np.asarray(x, np.float64)
  w = moe_lib.ExpertWeights(*(None if a is None else np.asarray(a, np.float64) for a in w))
  b, t, d = x.shape
  group = group or GROUP
  out = np.zeros_like(x)
  kept_mask = np.zeros((b, t, top_k), bool)
  kept_count = np.zeros((b, t // group, w.router.shape[1]), int)
  for bi in range(b):
    for g0 in range(0, t, group):
      tokens = x[bi, g0:g0 + group]
      logits = tokens @ w.router
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      scores = logits if select_bias is None else logits + np.asarray(select_bias)
      if sinkhorn_iters:
        scores = scores + numpy_reference.sinkhorn_offsets(scores, sinkhorn_iters)
      choices = np.argsort(-scores, axis=-1)[:, :top_k]      # the gate stays probs[e]
      used = np.zeros(w.router.shape[1], int)
      for k in range(top_k):
        for s in range(group):
          e = choices[s, k]
          if used[e] < capacity:
            used[e] += 1
            kept_mask[bi, g0 + s, k] = True
      kept_count[bi, g0 // group] = used
      for s in range(group):
        chosen = [choices[s, k] for k in range(top_k) if kept_mask[bi, g0 + s, k]]
        total = sum(probs[s, e] for e in chosen)
        for e in chosen:
          gate = probs[s, e] / total if normalize_gates else probs[s, e]
          h = _gelu(tokens[s] @ w.w1[e] + w.b1[e])
          out[bi, g0 + s] += gate * (h @ w.w2[e] + w.b2[e])
  return out, kept_mask, kept_count


GROUP, D, E, F = 8, 16, 8, 24


def _inputs(seed=0, b=2, t=32):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (b, t, D))
  w = moe_lib.ExpertWeights(
      router=jax.random.normal(ks[1], (D, E)) * 0.5,
      w1=jax.random.normal(ks[2], (E, D, F)) * D ** -0.5,
      b1=jax.random.normal(ks[3], (E, F)) * 0.1,
      w2=jax.random.normal(ks[4], (E, F, D)) * F ** -0.5,
      b2=jax.random.normal(ks[5], (E, D)) * 0.1)
  return x, w


def run_moe(x, w, tp, top_k, capacity, **kwargs):
  mesh = mesh_lib.make_mesh(MeshShape.of(tp))
  with bare(mesh):
    settings = moe_lib.MoESettings(**{'group_size': GROUP, 'top_k': top_k,
                                      'capacity': capacity, **kwargs})
    fn = jax.jit(lambda w, x: moe_lib.moe(w, x, jax.random.key(0), settings))
    return jax.device_get(fn(w, x))


@pytest.mark.parametrize('tp', [1, 2, 4, 8])
@pytest.mark.parametrize('top_k,capacity', [(1, 1), (1, 2), (2, 2), (2, 3), (1, 8)])
def test_expert_parallel_moe_equals_naive_reference(tp, top_k, capacity):
  x, w = _inputs(t=64)
  y, stats = run_moe(x, w, tp, top_k, capacity)
  ref, kept, kept_count = naive_moe(x, w, top_k, capacity)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # Exactly the same assignments were kept: every group's per-expert count is the reference's.
  np.testing.assert_array_equal(stats.kept, kept_count)
  if capacity * E < GROUP * top_k:
    assert kept.sum() < kept.size   # this case really drops tokens


@pytest.mark.parametrize('tp', [1, 4])
@pytest.mark.parametrize('rows', [False, True])
def test_both_dispatchers_equal_naive_reference(tp, rows, monkeypatch):
  """Capacity dispatch through fixed buffers and through ragged rows (the dispatcher
  forced): the same tokens kept, the same outputs."""
  from moejax.model import dispatch as dispatch_lib
  used = []
  choose = dispatch_lib.dispatcher
  monkeypatch.setattr(dispatch_lib, 'sends_rows', lambda dispatch, parts: rows)
  monkeypatch.setattr(dispatch_lib, 'dispatcher',
                      lambda *a, **k: used.append(choose(*a, **k)) or used[-1])
  x, w = _inputs(t=64)
  y, stats = run_moe(x, w, tp, 2, 2)
  ref, kept, kept_count = naive_moe(x, w, 2, 2)
  assert {type(d).__name__ for d in used} == {'Rows' if rows else 'Buffers'}
  assert kept.sum() < kept.size
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(stats.kept, kept_count)


@pytest.mark.parametrize('tp', [1, 4])
def test_normalized_gates_equal_naive_reference(tp):
  x, w = _inputs(t=64)
  y, _ = run_moe(x, w, tp, 2, 2, normalize_gates=True)
  ref, kept, _ = naive_moe(x, w, 2, 2, normalize_gates=True)
  assert 0 < kept[..., 1].sum() and not kept.all()   # some tokens keep one choice, some two
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  raw, _, _ = naive_moe(x, w, 2, 2)
  assert np.abs(raw - ref).max() > 1e-2             # renormalising changes the output


def test_gelu_forms_differ_and_the_default_is_exact():
  x, w = _inputs(t=32)
  ref, _, _ = naive_moe(x, w, 1, 8)
  exact, _ = run_moe(x, w, 1, 1, 8)
  tanh, _ = run_moe(x, w, 1, 1, 8, act=ffn_lib.Activation('tanh'))
  np.testing.assert_allclose(exact, ref, rtol=1e-6, atol=1e-6)
  assert np.abs(tanh - ref).max() > 1e-5            # the tanh form is visible to the reference


def test_route_drops_by_priority_first_choices_before_second():
  # 4 tokens, all prefer expert 0 then expert 1; capacity 2.
  logits_bias = np.array([[3.0, 2.0, 0.0, 0.0]])
  x = jnp.ones((1, 4, 1))
  r, stats = routing.route(x, jnp.asarray(logits_bias), top_k=2, capacity=2)
  np.testing.assert_array_equal(r.expert[0], [[0, 0, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(r.keep[0], [[True, True, False, False],
                                            [True, True, False, False]])
  np.testing.assert_array_equal(stats.kept[0], [2, 2, 0, 0])
  np.testing.assert_array_equal(stats.assigned[0], [4, 4, 0, 0])


def test_aux_loss_is_one_when_uniform_and_grows_when_skewed():
  s, e = 16, 4
  # Uniform: zero router -> probs 1/E; top-1 ties broken to a balanced assignment is not
  # guaranteed, so build logits that send token i to expert i % E with tiny margins.
  x = jnp.eye(e)[jnp.arange(s) % e][None] * 1e-3                     # [1, S, E]
  _, uniform = routing.route(x, jnp.eye(e), top_k=1, capacity=s)
  np.testing.assert_allclose(uniform.aux, [1.0], rtol=1e-3)
  skewed_x = jnp.ones((1, s, e))
  _, skewed = routing.route(skewed_x, jnp.eye(e) * jnp.array([5.0, 0, 0, 0]), top_k=1, capacity=s)
  assert float(skewed.aux[0]) > 2.0


def test_router_gets_gradient_through_the_gate():
  x, w = _inputs()
  def loss(router):
    y, _ = moe_lib.moe(w._replace(router=router), x, jax.random.key(0),
                       moe_lib.MoESettings(group_size=GROUP, top_k=1, capacity=4))
    return jnp.sum(y ** 2)
  with bare(mesh_lib.make_mesh(MeshShape.of(1))):
    g = jax.jit(jax.grad(loss))(w.router)
  assert float(jnp.abs(g).max()) > 1e-4


@pytest.mark.parametrize('tp', [1, 4])
def test_selection_bias_chooses_but_does_not_weigh(tp):
  """Aux-loss-free balancing: the bias changes which experts are chosen, not the gates."""
  x, w = _inputs(t=64)
  bias = jnp.asarray(np.random.default_rng(0).normal(0, 0.3, E), jnp.float32)
  y, stats = run_moe(x, w._replace(select_bias=bias), tp, 2, 3)
  ref, _, kept_count = naive_moe(x, w, 2, 3, select_bias=bias)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(stats.kept, kept_count)
  unbiased, _, _ = naive_moe(x, w, 2, 3)
  assert np.abs(unbiased - ref).max() > 1e-2                 # the bias really re-routes


def test_selection_bias_step_moves_toward_underloaded_experts():
  assigned = jnp.array([[10.0, 2.0, 4.0, 4.0]])              # mean 5
  np.testing.assert_array_equal(moe_lib.select_bias_step(assigned, 0.5), [[-0.5, 0.5, 0.5, 0.5]])
  np.testing.assert_allclose(moe_lib.select_bias_step(assigned, 0.5, 'relative'),
                             [[-0.5, 0.3, 0.1, 0.1]], rtol=1e-6)   # (5 - load) / 5, clipped


@pytest.mark.parametrize('tp', [1, 4])
def test_sinkhorn_balances_choices_like_the_reference(tp):
  """In-group balancing: offsets from the reference's Sinkhorn choose the experts, the gates
  stay the unbiased probabilities, and a router that sends most tokens to two experts ends up
  balanced."""
  x, w = _inputs(t=64)
  bias = jnp.zeros(E).at[:2].set(2.0)                       # experts 0 and 1 are preferred
  ref, _, ref_count = naive_moe(x, w, 1, 64, select_bias=bias, group=64, sinkhorn_iters=20)
  y, stats = run_moe(x, w._replace(select_bias=bias), tp, 1, 64, group_size=64,
                     sinkhorn_iters=20)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  per_group = lambda a: a.sum(1, keepdims=True)              # tp > 1: the group's parts
  np.testing.assert_array_equal(per_group(stats.assigned), ref_count)
  _, _, plain = naive_moe(x, w, 1, 64, select_bias=bias, group=64)
  np.testing.assert_array_equal(per_group(stats.preferred), plain)      # what the scores alone choose
  assert plain.max() > 2.5 * plain.mean()                    # without it: far from balanced
  assert ref_count.max() <= 1.5 * ref_count.mean()           # with it: near 8 per expert


def test_sinkhorn_offset_is_scale_free():
  """The annealed temperature follows the scores' spread: scaled logits, the same choices."""
  scores = jax.random.normal(jax.random.key(3), (2, 256, 8)) + jnp.linspace(0, 2, 8)
  choose = lambda a: jnp.argmax(a + routing.balancing_offset(a, None, 20)[:, None], -1)
  np.testing.assert_array_equal(choose(scores), choose(scores * 10.0))
  counts = np.stack([np.bincount(np.asarray(c), minlength=8) for c in choose(scores)])
  assert counts.max() <= 1.2 * counts.mean()


def test_buffer_dispatch_gradients_equal_autodiff_of_the_scatter_formulation():
  """Fixed buffers are filled and read by gathers whose gradients are gathers too
  (moejax.model.gather.take); value and gradients equal autodiff of the plain formulation: a
  scatter-add of the tokens into zeroed [E, G, C, D] buffers, and a gather from them weighted
  by the gates."""
  from moejax.model import dispatch as dispatch_lib
  x, w = _inputs(t=64)
  xg = x.reshape(-1, GROUP, D)                                          # [G, Q, D]
  r, _ = routing.route(xg, w.router, top_k=2, capacity=2)
  assert 0 < int(jnp.sum(r.keep)) < r.keep.size                         # some dropped
  g = xg.shape[0]

  def plain_pack(x):
    slot = jnp.where(r.keep, r.slot, 2)
    tokens = jnp.broadcast_to(x[:, None], r.expert.shape + (D,))       # [G, P, Q, D]
    return jnp.zeros((E, g, 2, D)).at[r.expert, jnp.arange(g)[:, None, None], slot].add(
        tokens, mode='drop')

  def plain_unpack(y):
    out = y[r.expert, jnp.arange(g)[:, None, None], jnp.where(r.keep, r.slot, 0)]
    return jnp.einsum('GPQD,GPQ->GQD', out, jnp.where(r.keep, r.gate, 0.0))

  pack = lambda x: dispatch_lib._pack(x, r, E, 2)
  unpack = lambda y: dispatch_lib._unpack(y, r)
  y = jax.random.normal(jax.random.key(7), (E, g, 2, D))
  for mine, plain, arg, out_shape in ((pack, plain_pack, xg, y.shape),
                                      (unpack, plain_unpack, y, xg.shape)):
    cot = jax.random.normal(jax.random.key(8), out_shape)
    value, vjp = jax.vjp(mine, arg)
    value_ref, vjp_ref = jax.vjp(plain, arg)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vjp(cot)[0], vjp_ref(cot)[0], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(vjp(cot)[0]).max()) > 0


def test_grouped_expert_ffn_gradients_equal_autodiff_of_sorting_by_index():
  """Rows sorted by expert and back by gathers (moejax.model.gather) give the value and
  gradients (rows, weights, biases) of plain indexing (x[order], then a scatter back), padding
  rows (keys >= E) zero and without gradient."""
  x, w = _inputs()
  rows = x.reshape(-1, D)[:40]                                          # [Y, D]
  key = jax.random.randint(jax.random.key(3), (40,), 0, E + 2)          # E, E+1: padding
  weights = ffn_lib.FFNWeights(w.w1, w.b1, w.w2, w.b2)
  assert 0 < int(jnp.sum(key >= E)) < 40

  def plain(x, w):
    order = jnp.argsort(key, stable=True)
    e = jnp.minimum(key[order], E - 1)
    h = _gelu_jax(jnp.einsum('YD,YDF->YF', x[order], w.w1[e]) + w.b1[e])
    y = jnp.einsum('YF,YFD->YD', h, w.w2[e]) + w.b2[e]
    y = jnp.where((key[order] < E)[:, None], y, 0)
    return jnp.zeros_like(y).at[order].set(y)

  mine = lambda x, w: ffn_lib.grouped_expert_ffn(x, key, w)
  cot = jax.random.normal(jax.random.key(4), rows.shape)
  value, vjp = jax.vjp(mine, rows, weights)
  value_ref, vjp_ref = jax.vjp(plain, rows, weights)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(vjp(cot)), jax.tree.leaves(vjp_ref(cot))):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(value[key >= E]).max()) == 0.0


def _gelu_jax(x):
  return jax.nn.gelu(x, approximate=False)
