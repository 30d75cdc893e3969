"""The op-by-op time model on small programs whose costs are known by hand."""
import jax
import jax.numpy as jnp
import pytest

from moejax import targets
from moejax.perf import opclass

RATES = targets.Rates(bf16_flops_per_s=1e12, nvlink_bytes_per_s=1e9, network_bytes_per_s=1e8,
                      f32_flops_per_s=1e11, hbm_bytes_per_s=1e10, memory_bytes=2**30)


def compiled(fn, *args, donate=()) -> str:
  return jax.jit(fn, donate_argnums=donate).lower(*args).compile().as_text()


def work(text: str) -> tuple[int, int]:
  """(matmul FLOPs, bytes) of one program run, over every kernel and its executions."""
  ks = opclass.kernels(text)
  return sum(k.flops * k.runs for k in ks), sum(k.bytes * k.runs for k in ks)


def test_a_matmul_costs_its_flops_at_the_matmul_rate():
  a = jnp.ones((256, 512), jnp.float32)
  b = jnp.ones((512, 128), jnp.float32)
  text = compiled(lambda a, b: a @ b, a, b)
  flops, _ = work(text)
  assert flops == 2 * 256 * 512 * 128
  p = opclass.predict(text, RATES)
  assert p['predicted_s_by_class']['dense_gemm'] == pytest.approx(
      flops / RATES.f32_flops_per_s + opclass.LAUNCH_S, rel=0.05)      # f32 operands: f32 rate


def test_an_elementwise_chain_is_one_read_and_one_write():
  x = jnp.ones((1024, 1024), jnp.float32)
  text = compiled(lambda x: jnp.exp(x) * 2.0 + 1.0, x)
  flops, size = work(text)
  assert flops == 0 and size == 2 * 4 * 1024 * 1024
  p = opclass.predict(text, RATES)
  assert p['predicted_s_by_class'] == {
      'elementwise': pytest.approx(size / RATES.hbm_bytes_per_s + opclass.LAUNCH_S)}


def test_a_scan_counts_its_trips():
  w = jnp.ones((64, 64), jnp.float32)
  x = jnp.ones((8, 64), jnp.float32)
  one = lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=1)[0]
  seven = lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=7)[0]
  assert work(compiled(seven, x, w))[0] == 7 * work(compiled(one, x, w))[0] == 7 * 2 * 8 * 64 * 64


def test_an_in_place_update_moves_the_update_not_the_buffer():
  buf = jnp.zeros((64, 1024, 1024), jnp.float32)
  row = jnp.ones((1, 1024, 1024), jnp.float32)
  text = compiled(lambda b, r, i: jax.lax.dynamic_update_slice(b, r, (i, 0, 0)),
                  buf, row, jnp.int32(3), donate=(0,))
  _, size = work(text)
  assert size <= 3 * row.nbytes     # read the row, write the row: not the 256 MiB buffer
  copied = compiled(lambda b, r, i: jax.lax.dynamic_update_slice(b, r, (i, 0, 0)),
                    buf, row, jnp.int32(3))
  assert work(copied)[1] >= 2 * buf.nbytes    # not donated: XLA copies the buffer first


def test_trace_events_are_matched_to_kernels_by_name():
  x = jnp.ones((1024, 1024), jnp.float32)
  text = compiled(lambda x: jnp.exp(x) * 2.0 + 1.0, x)
  kernel = next(k for k in opclass.kernels(text) if k.cls == 'elementwise')
  events = [{'ts': 0, 'dur': 30.0, 'name': kernel.name.replace('.', '_'), 'args': {}},
            {'ts': 40, 'dur': 5.0, 'name': 'memcpy128', 'args': {}}]
  assert opclass.measured_by_class(events, text) == {'elementwise': pytest.approx(30e-6),
                                                     'other': pytest.approx(5e-6)}


def _gpu_program(name: str) -> str:
  import os
  with open(os.path.join(os.path.dirname(__file__), 'data', name)) as f:
    return f.read()


def test_compiled_gpu_programs_get_their_classes_and_a_calibrated_step():
  from moejax.perf import calibration, estimate
  attention = estimate.time_model(_gpu_program('h100_cudnn_attention.hlo'), [0] * 4, 'h100',
                                  1e9)
  assert set(attention['predicted_s_by_class']) == {'attention', 'collectives_exposed'}
  assert 'H200' in attention['calibration'] and calibration.ratios('h100')['attention'] > 1
  moe = estimate.time_model(_gpu_program('h100_dropless_moe.hlo'), [0] * 4, 'h100', 1e9)
  by_class = moe['predicted_s_by_class']
  assert by_class['expert_gemm'] > 0 and by_class['routing'] > 0       # grouped matmuls, sort
  assert moe['predicted_step_s'] == pytest.approx(sum(by_class.values()))
  links = estimate.time_model(_gpu_program('h100_collectives.hlo'), [0] * 16, 'h100', 1e9)
  assert links['predicted_s_by_class']['collectives_exposed'] > 0


def test_a_program_is_parsed_once_per_analysis(monkeypatch):
  """The benchmark's analyses of one program (collectives, overlap, FLOPs, grouped matmuls, op
  classes, the time model) read one parse of its text."""
  from moejax.perf import estimate, hlo
  text = _gpu_program('h100_dropless_moe.hlo')
  built = []
  init = hlo.Module.__init__
  monkeypatch.setattr(hlo.Module, '__init__', lambda self, t: built.append(1) or init(self, t))
  hlo.parse.cache_clear()
  hlo.bytes_by_kind(text), hlo.overlap_fraction(text), hlo.flops(text), hlo.grouped_matmuls(text)
  opclass.predict(text, RATES)
  estimate.time_model(text, [0] * 4, 'h100', 1e9)
  assert len(built) == 1
