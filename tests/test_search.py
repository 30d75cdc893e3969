"""The layout search's parts: collective groups read from HLO, the step-time estimate (hand
computed), the candidate layouts, and its errors. The search itself compiles for GPUs
(requirements-cuda12.txt); BENCHMARKS.md has its ranking of the full config."""
import pytest

from configs import tp4pp4
from moejax import targets
from moejax.errors import ConfigError
from moejax.perf import estimate, hlo, search


def test_collective_groups_in_every_form():
  assert hlo.groups('replica_groups={{0,2,4,6},{1,3,5,7}}, to_apply=%add') == (
      (0, 2, 4, 6), (1, 3, 5, 7))
  # XLA's iota form: iota(16) as [4, 4], transposed, as 2 groups of 8
  assert hlo.groups('replica_groups=[2,8]<=[4,4]T(1,0), dimensions={0}') == (
      (0, 4, 8, 12, 1, 5, 9, 13), (2, 6, 10, 14, 3, 7, 11, 15))
  assert hlo.groups('replica_groups=[4,2]<=[8], to_apply=%add') == (
      (0, 1), (2, 3), (4, 5), (6, 7))
  assert hlo.groups('source_target_pairs={{0,1},{1,0}}') == ((0, 1), (1, 0))
  assert hlo.groups('replica_groups={}, to_apply=%add') == ()
  # Over named mesh axes (jax 0.12's shard_map collectives): a group per value of the others.
  mesh = "replica_groups=mesh['dp'=1,'pp'=2,'tp'=4] {%s}, dimensions={1}"
  assert hlo.groups(mesh % "'tp'") == ((0, 1, 2, 3), (4, 5, 6, 7))
  assert hlo.groups(mesh % "'dp','pp'") == ((0, 4), (1, 5), (2, 6), (3, 7))


RATES = targets.Rates(bf16_flops_per_s=1e12, nvlink_bytes_per_s=1e9, network_bytes_per_s=1e8,
                      f32_flops_per_s=1e11, hbm_bytes_per_s=1e10, memory_bytes=2**30)
HOSTS = (0, 0, 1, 1)      # partitions 0, 1 on one host, 2, 3 on the other


def test_step_time_estimate_by_hand():
  """A [64, 128] x [128, 256] dot (2*64*128*256 FLOPs); an all-reduce of 4 KiB over all four
  partitions, not overlapped (crosses hosts: 2*(3/4)*4096 bytes at the network's rate); an
  async all-gather of 8 KiB inside each host with a fusion between start and done (overlapped:
  (1/2)*8192 bytes at NVLink's rate); a permute between hosts, 2 loop iterations of 1 KiB."""
  text = '''
%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %cp = f32[256]{0} collective-permute(f32[256]{0} %x), source_target_pairs={{0,2},{2,0},{1,3},{3,1}}
}

ENTRY %main (a: f32[64,128], b: f32[128,256]) -> f32[64,256] {
  %a = f32[64,128]{1,0} parameter(0)
  %b = f32[128,256]{1,0} parameter(1)
  %d = f32[64,256]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = f32[1024]{0} all-reduce(f32[1024]{0} %x), replica_groups={{0,1,2,3}}, to_apply=%add
  %s1 = ((f32[1024]{0}), f32[2048]{0}) all-gather-start(%x), replica_groups={{0,1},{2,3}}, dimensions={0}
  %f = f32[1024]{0} fusion(%x), kind=kLoop, calls=%fused
  %g1 = f32[2048]{0} all-gather-done(%s1)
  %w = (s32[], f32[256]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"2"}}
}
'''
  flops = hlo.flops(text)['total']
  assert flops == 2 * 64 * 128 * 256
  t = estimate.step_time(text, flops, HOSTS, RATES)
  matmul = flops / 1e12
  all_reduce = 2 * 3 / 4 * 4096 / 1e8
  all_gather = 1 / 2 * 8192 / 1e9
  permute = 2 * 1024 / 1e8
  assert t['matmul_s'] == pytest.approx(matmul)
  assert t['collective_overlapped_s'] == pytest.approx(all_gather)
  assert t['collective_exposed_s'] == pytest.approx(all_reduce + permute)
  assert t['collective_between_hosts_s'] == pytest.approx(all_reduce + permute)
  assert t['step_s'] == pytest.approx(max(matmul, all_gather) + all_reduce + permute)
  # The same permute inside each host runs at NVLink's rate.
  inside = text.replace('{{0,2},{2,0},{1,3},{3,1}}', '{{0,1},{1,0},{2,3},{3,2}}')
  assert estimate.step_time(inside, flops, HOSTS, RATES)['collective_between_hosts_s'] == (
      pytest.approx(all_reduce))


def test_every_card_has_its_rates_with_sources():
  for name in targets.GPUS:
    rates = targets.rates(name)
    assert rates.bf16_flops_per_s > 1e14 and rates.nvlink_bytes_per_s > rates.network_bytes_per_s
    assert rates.bf16_flops_per_s > rates.f32_flops_per_s and rates.hbm_bytes_per_s > 1e12
    assert targets.config_text(name).count('#   source:') == len(targets.Rates._fields) - 1


def test_candidates_of_the_full_config():
  """16 devices, 8 blocks: tp inside a host (at most 8), pp dividing the blocks, repeats 2 where
  a stage holds 2 or more blocks, experts and Adam moments split over dp whenever dp > 1, the
  step's 128 sequences in 16 micro-batches or in pp or 2 x pp (fewer, larger) ones."""
  config = tp4pp4.get_config()
  found = [search.name(o) for o in search.candidates(config)]
  layouts = {n.rsplit(' ', 1)[0] for n in found}
  assert '1x1x16 r1' not in layouts and '1x4x4 r1' in layouts and '1x4x4 r2' in layouts
  assert '16x1x1 r1' in layouts and '1x8x2 r2' in layouts and '1x2x8 r2' not in layouts
  assert not [n for n in found if n.split('x')[1] == '16']
  assert len(layouts) == 20 and len(found) == len(set(found))
  assert {n for n in found if n.startswith('1x4x4 r1')} == {'1x4x4 r1 M16', '1x4x4 r1 M8',
                                                           '1x4x4 r1 M4'}
  assert {n for n in found if n.startswith('16x1x1 r1')} == {'16x1x1 r1 M16',
                                                            '16x1x1 r1 M2', '16x1x1 r1 M1'}
  for o in search.candidates(config):
    assert o['mesh.experts_over_dp'] == o['mesh.shard_optimizer'] == (o['mesh.dp'] > 1)
    assert o['mesh.dp'] * o['mesh.tp'] * o['mesh.pp'] == 16
    assert o['data.num_micro_batches'] * o['data.micro_batch_size'] == 128


def test_search_needs_a_gpu_card():
  with pytest.raises(ConfigError, match='--target=one of h100'):
    search.search(tp4pp4.get_config('tiny'), 'cpu')
