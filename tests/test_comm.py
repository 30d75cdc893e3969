"""The analytic minimum of collective bytes (perf/comm.py) against figures computed by hand for
the tiny config (d_model 64, 16 experts, top-1, capacity factor 1.1, 8 blocks, 16 micro-batches
of 64 tokens, float32)."""
from configs import tp4pp4
from moejax import config as config_lib
from moejax.perf import comm
from moejax.train.plan import Plan

F32 = 4


def tiny(**keys):
  c = tp4pp4.get_config('tiny')
  for path, value in keys.items():
    section, name = path.split('__')
    c[section][name] = value
  return c


def minimum(c, gradient_bytes=0):
  return comm.minimum_bytes(config_lib.model_config(c), config_lib.layout(c), gradient_bytes)


def test_groups_inside_one_shard_carry_their_capacity_buffers():
  # The tiny config's 16-token groups, 16 tokens of each sequence on each of tp=4: 2 sequences
  # -> 2 parts per device, each with E * C = 16 * ceil(1.1 * 16 / 16) = 16 * 2 rows of 64
  # floats; 2 blocks per stage, 16 micro-batches, dispatch + return forward and backward.
  terms = minimum(tiny())
  assert terms['experts (tp all-to-all)'] == {'all-to-all': 2 * 16 * 4 * (2 * 16 * 2) * 64 * F32}


def test_a_group_spread_over_the_tp_shards_sends_its_kept_rows():
  # One 64-token group per sequence, 16 tokens on each of tp=4: each part would carry the whole
  # group's capacity (E * C = 16 * 5 rows); the kept rows travel instead, at most the device's
  # 2 x 16 tokens x top-1.
  terms = minimum(tiny(moe__group_size=64))
  assert terms['experts (tp all-to-all)'] == {'ragged-all-to-all': 2 * 16 * 4 * 32 * 64 * F32}


def test_groups_of_whole_sequences_over_dp_with_experts_folded():
  # dp=4 x pp=4, experts over dp: each device holds 1 of a micro-batch's 4 sequences; a group is
  # 2 sequences (128 tokens) split over 2 dp shards, so the device's 64 kept rows (at most)
  # travel.
  c = tiny(mesh__dp=4, mesh__tp=1, mesh__experts_over_dp=True, data__micro_batch_size=4,
           moe__group_size=128)
  terms = minimum(c)
  assert terms['experts (dp x tp all-to-all)'] == {'ragged-all-to-all': 2 * 16 * 4 * 64 * 64 * F32}
  btd = 1 * 64 * 64                                     # one device's sequence of a micro-batch
  assert terms['pipeline shift (pp)'] == {'collective-permute': 2 * (16 + 3) * btd * F32}
  assert terms['pipeline in/out (pp)'] == {'collective-permute': 4 * 3 * (16 // 4) * btd * F32}
  assert 'attention (tp)' not in terms


def test_dropless_rows_are_the_devices_tokens_times_k():
  # dp=2 x tp=2: a device holds 1 sequence's 32-token half; top-1 -> 32 rows.
  c = tiny(mesh__dp=2, mesh__tp=2, moe__dispatch='dropless')
  terms = minimum(c)
  assert terms['experts (tp all-to-all)'] == {'ragged-all-to-all': 2 * 16 * 4 * 32 * 64 * F32}
  btd = 1 * 64 * 64
  assert terms['attention (tp)'] == {'all-gather': 2 * 16 * 2 * btd * F32,
                                     'reduce-scatter': 2 * 16 * 2 * btd // 2 * F32}


def test_replicated_gradients_are_read_from_the_weights_shardings():
  plan = Plan(tiny())
  # tp4pp4: per stage 2 blocks; replicated over tp: output bias 64, two layer norms 2 * 128,
  # router 64 * 16; replicated over pp: position table 64 * 64, the token table's and the head's
  # vocab shard 64 * 64 each, the final norm 128.
  assert comm.replicated_gradient_bytes(plan.abstract_state.params, dict(plan.mesh.shape)) == (
      2 * (64 + 2 * 128 + 64 * 16) + 3 * 64 * 64 + 128) * F32
  folded = Plan(tiny(mesh__dp=2, mesh__tp=2, mesh__experts_over_dp=True))
  # dp=2 x tp=2, experts over both: every weight but the experts' is replicated over dp; per
  # stage 2 blocks of q/k/v (3 * 64 * 2 heads * 16), their biases, the output projection
  # (2 * 16 * 64) and bias, two layer norms, the router; tables and head with 128 vocab rows.
  per_block = 3 * 64 * 2 * 16 + 3 * 2 * 16 + 2 * 16 * 64 + 64 + 2 * 128 + 64 * 16
  assert comm.replicated_gradient_bytes(folded.abstract_state.params,
                                        dict(folded.mesh.shape)) == (
      2 * per_block + 64 * 64 + 2 * 128 * 64 + 128) * F32
