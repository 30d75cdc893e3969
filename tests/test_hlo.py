"""The compiled train step holds the collectives we meant, and no all-gather of weights."""
import os
import re

import jax
import numpy as np
import pytest

from configs import tp4pp4
from moejax import config as config_lib
from moejax.perf import hlo, opclass
from moejax.train.plan import Plan


def compiled_text(tp, pp, dp=1, experts_over_dp=False):
  c = tp4pp4.get_config('tiny')
  c.mesh.tp, c.mesh.pp, c.mesh.dp, c.mesh.experts_over_dp = tp, pp, dp, experts_over_dp
  plan = Plan(c)
  abstract = plan.abstract_state
  return plan.train_step().lower(abstract, plan.batch_abstract()).compile().as_text(), abstract.params


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


GPU_HLO = os.path.join(os.path.dirname(__file__), 'data', 'h100_collectives.hlo')


def test_async_gpu_collectives_counted_once_at_their_result():
  """H100 program (tests/data/make_gpu_hlo.py): every collective is a -start/-done pair."""
  text = open(GPU_HLO).read()
  f32 = 4
  by_kind = hlo.bytes_by_kind(text)
  assert by_kind == {
      'all-reduce': 5 * 64 * 128 * f32,        # psum inside the 5-step scan
      'all-to-all': 64 * 128 * f32,
      'all-gather': 256 * 128 * f32,          # the gathered result, not operand + result
      'reduce-scatter': 64 * 128 * f32,
      'collective-permute': 64 * 128 * f32,
      'ragged-all-to-all': 64 * 128 * f32,    # the rows sent, not the [256, 128] buffer
  }
  assert all('-start' in line or '-done' in line for line in text.splitlines()
             if any(f" {k}(" in line for k in hlo.KINDS))


def test_dropless_moe_on_h100_exchanges_ragged_rows_and_gathers_no_weights():
  """The gradient of one dropless MoE layer compiled for 4 H100s (tests/data/make_gpu_hlo.py):
  rows move by ragged all-to-alls (dispatch and return, forward and backward), and nothing is
  all-gathered (each shard keeps its own experts' weights)."""
  text = open(os.path.join(os.path.dirname(__file__), 'data', 'h100_dropless_moe.hlo')).read()
  ops = hlo.collectives(text)
  ragged = [c for c in ops if c.kind == 'ragged-all-to-all']
  assert len(ragged) >= 4
  assert not [c for c in ops if c.kind == 'all-gather']
  # A shard's 2 x 16 tokens x 2 choices = 64 rows of [32] f32 travel (not its [4*64, 32]
  # buffer), and their int32 expert ids once, on the way out.
  assert {c.bytes for c in ragged} == {64 * 32 * 4, 64 * 4}


def test_pipeline_ticks_on_h100_copy_no_whole_buffer_and_make_f32_weight_gradients():
  """The gradient of the pipeline (2 stages, 2 repeats, 4 micro-batches, weights cast once per
  step as precision.Cast) compiled for 2 H100s: every tick writes its slot of the
  [M (+1 scratch), B, T, D] output and ring buffers (and of their cotangents) in place; no tick
  copies a whole buffer (it did: 4 per tick, while a slot was rewritten with "y or its old
  value"); and no tick rounds a weight gradient to bf16 on its way into the f32 accumulator
  (casting the copy at the matmul did: a convert to bf16 inside each accumulating kernel)."""
  module = hlo.parse(open(os.path.join(os.path.dirname(__file__), 'data',
                                       'h100_pipeline.hlo')).read())
  per_tick = [i for i in module.instrs if module.count(i) == 9]    # 2 x 4 + 2 - 1 ticks
  assert len([i for i in per_tick if i.op == 'fusion']) > 20        # the ticks' work is here
  buffers = {(4, 2, 128, 384), (5, 2, 128, 384)}                     # [M (+1), B, T, D]
  whole = [i.result for i in per_tick if i.op == 'copy'
           for _, shape in hlo.arrays(i.result) if shape in buffers]
  assert not whole, whole
  weight = lambda i, dtype: any(d == dtype and s[-2:] == (384, 384)          # [.., D, D]
                                for d, s in hlo.arrays(i.result))
  accumulating = [i for i in per_tick if i.op == 'fusion' and weight(i, 'f32')]
  assert len(accumulating) >= 4                      # 2 GEMMs and 2 accumulations per tick
  rounded = [i.name for i in accumulating
             if any(j.op == 'convert' and weight(j, 'bf16') for j in opclass._inner(module, i))]
  assert not rounded, rounded


def test_dp_pipeline_on_h100_reduces_replicated_weight_gradients_once_after_the_ticks():
  """The gradient of the pipeline with the batch split over dp (dp=2 x pp=2, 2 repeats, 9 ticks,
  2 unrolled layers per stage, weights replicated over dp) compiled for 4 H100s: each weight's
  gradient is all-reduced over dp once, after the ticks, all its repeats and layers together:
  w's [2, 2, 384, 384] (cast once, f32 gradients) and g's [2, 2, 384] (cast at every tick).
  Each was reduced at every tick while a layer's gradient was padded into its [L, ...] stack,
  or while the stage's index (which picks the tick's repeat) came from jax.lax.axis_index: XLA
  moves an all-reduce out of a loop only into a plain accumulator, at an index it can prove
  equal on every device that takes part."""
  module = hlo.parse(open(os.path.join(os.path.dirname(__file__), 'data',
                                       'h100_dp_pipeline.hlo')).read())
  reduces = [i for i in module.instrs if i.op in ('all-reduce', 'all-reduce-start')]
  assert sorted((hlo.arrays(i.result)[-1][1], module.count(i)) for i in reduces) == [
      ((2 * 2 * 384,), 1), ((2 * 2 * 384 * 384,), 1)]
  assert 9 in {module.count(i) for i in module.instrs}              # the ticks are in this program


def test_dropless_experts_on_h100_are_triton_grouped_matmuls_counted_by_rows_routed():
  """The same program: the 2 local experts' matmuls are tokamax's Pallas-Triton grouped matmuls
  (w1 and w2 forward, their input and weight gradients: 6) over the [4*64]-row receive buffer,
  in 64-row tiles (the kernel's block_m in the program), and no dense dot touches the buffer.
  FLOPs: 2*K*N per row computed: the rows routed (a quarter of the buffer when balanced, 64)
  plus 2 groups x 63 rows of tile padding, 190 of the buffer's 256."""
  text = open(os.path.join(os.path.dirname(__file__), 'data', 'h100_dropless_moe.hlo')).read()
  module = hlo.Module(text)
  grouped = [g for g in (hlo.grouped_matmul(module, i) for i in module.instrs) if g]
  assert sorted(grouped) == sorted([hlo.GroupedMatmul(256, 32, 64, 2, 64)] * 3 +
                                   [hlo.GroupedMatmul(256, 64, 32, 2, 64)] * 3)
  assert not [i.name for i in module.instrs if i.op == 'dot' and any(
      256 in dims for _, dims in hlo.arrays(i.result))]
  assert hlo.flops(text, row_share=0.25)['total'] - hlo.flops(text.replace(
      'RaggedDot', 'Other'))['total'] == 6 * 2 * 32 * 64 * (64 + 2 * 63)
  # The tile rule where the buffer is larger: 4096 rows of which a quarter routed, 8 groups.
  line = next(l for l in text.splitlines() if 'RaggedDot' in l and 'custom-call(' in l)
  big = line.replace('f32[256,', 'f32[4096,').replace('num_groups\\":2', 'num_groups\\":8')
  bigger = text.replace(line, big)
  for name in re.findall(r'custom-call\(%([\w.\-]+)', big)[:1]:
    bigger = re.sub(r'(%' + re.escape(name) + r' = \w+)\[256,', r'\1[4096,', bigger)
  module = hlo.Module(bigger)
  call = next(i for i in module.instrs if i.name == _name(big))
  g = hlo.grouped_matmul(module, call)
  assert g.rows == 4096 and g.groups == 8
  assert hlo.instr_flops(module, call, row_share=0.25) == 2 * g.k * g.n * (1024 + 8 * 63)
  assert hlo.instr_flops(module, call) == 2 * g.k * g.n * 4096           # the upper bound


def _name(line: str) -> str:
  return re.match(r'\s*(?:ROOT\s+)?%([\w.\-]+)', line).group(1)


def test_matmul_flops_of_a_scanned_matmul():
  """5 steps of [64, 128] @ [128, 128] per device (XLA splits it into a batched GEMM fusion)."""
  parts = hlo.flops(open(GPU_HLO).read())
  assert parts['total'] == 5 * 2 * 64 * 128 * 128
  cpu = '''
%body (p: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
  %x = f32[64,128]{1,0} parameter(0)
  %w = f32[128,32]{1,0} parameter(1)
  %d = f32[64,32]{1,0} dot(f32[64,128]{1,0} %x, f32[128,32]{1,0} %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/rematted_computation/dot_general"}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  %g = (f32[8,4]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %h = f32[8,4]{1,0} dot(f32[8,16]{1,0} %a, f32[16,4]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/transpose(jvp(head_loss))/rematted_computation/Head/dot_general"}
  %w = (s32[], f32[64,128]) while((s32[], f32[64,128]) %t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %q = bf16[2,128,4,64]{3,2,1,0} parameter(2)
  %k = bf16[2,256,4,64]{3,2,1,0} parameter(3)
  %o = (bf16[2,128,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %k), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(f)/head_loss/attn"}
}
'''
  parts = hlo.flops(cpu)
  assert parts['remat'] == 3 * 2 * 64 * 32 * 128
  assert parts['blocks'] == 2 * 8 * 4 * 16
  assert parts['head'] == 2 * 2 * (2 * 4 * 128 * 256 * 64)     # q k^T and p v
  assert parts['head_remat'] == 2 * 8 * 4 * 16                   # the logits recomputed
  assert parts['total'] == parts['remat'] + parts['blocks'] + parts['head'] + parts['head_remat']


def test_cudnn_causal_attention_on_h100_is_fused_and_counted_at_half_the_square():
  """The gradient of causal attention of q, k, v [2, 512, 8, 64] bf16 with heads split over 4
  H100s (tests/data/make_gpu_hlo.py): cuDNN's flash attention forward and backward, no [T, T]
  score matrix anywhere, and FLOPs of the causal half: per device 2 heads, forward
  2 * (2 * B * N * T * T * H) / 2, backward twice that."""
  text = open(os.path.join(os.path.dirname(__file__), 'data', 'h100_cudnn_attention.hlo')).read()
  module = hlo.Module(text)
  targets = [re.search(r'custom_call_target="([^"]*)"', i.attrs).group(1)
             for i in module.instrs if i.op == 'custom-call']
  assert sorted(targets) == ['__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward'], targets
  assert not [i.name for i in module.instrs
              if any(dims[-2:] == (512, 512) for _, dims in hlo.arrays(i.result))]
  forward = 2 * (2 * 2 * 2 * 512 * 512 * 64) // 2              # B = 2, N = 2 heads here
  assert hlo.flops(text)['total'] == forward + 2 * forward


def test_overlap_needs_work_between_start_and_done():
  text = '''
ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[1024]{0} parameter(0)
  %s1 = ((f32[1024]{0}), f32[4096]{0}) all-gather-start(%a), dimensions={0}
  %f = f32[1024]{0} fusion(%a), kind=kLoop, calls=%fused
  %d1 = f32[4096]{0} all-gather-done(%s1)
  %s2 = f32[1024]{0} all-reduce-start(%f), to_apply=%add
  %g = f32[1024]{0} get-tuple-element(%x), index=0
  %d2 = f32[1024]{0} all-reduce-done(%s2)
}
'''
  ops = hlo.collectives(text)
  assert [(c.kind, c.bytes, c.overlapped) for c in ops] == [
      ('all-gather', 4096 * 4, True), ('all-reduce', 1024 * 4, False)]
  assert hlo.overlap_fraction(text) == 4096 / (4096 + 1024)
