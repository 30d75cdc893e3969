"""Validation of a config before anything is compiled: one check per section, every
inconsistency named with its keys and a fix, all of them in one ConfigError."""
from __future__ import annotations

import ml_collections

from moejax.config import (ARCH_DEFAULTS, BIAS_RULES, DATA_SOURCES, DISPATCHES, DTYPES, FFNS,
                           GATE_NORMS_OVER, GELUS, NORMS, QK_NORMS, REMAT_POLICIES, Layout, ModelConfig, bucket_layouts, data_config, known_keys, layout,
                           model_config, profile_steps)
from moejax.errors import ConfigError


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Unknown or missing keys (a typo in a config file) are an error naming them."""
  have = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      have.update(f'{key}.{k}' for k in value.keys())
    else:
      have.add(key)
  known = set(known_keys())
  optional = {f'{s}.{k}' for s, k in ARCH_DEFAULTS} | {'hf_dir'}  # older configs: the seed's
  unknown, missing = sorted(have - known), sorted(known - have - optional)
  if unknown or missing:
    raise ConfigError(
        (f'Unknown config keys: {unknown}. ' if unknown else '') +
        (f'Missing config keys: {missing}. ' if missing else '') +
        f'Known keys: {", ".join(sorted(known))}.')


def _check(errors: list[str], ok: bool, message: str) -> None:
  if not ok:
    errors.append(message)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError listing every inconsistent setting (with the keys and a fix)."""
  check_keys(config)
  m, lay = model_config(config), layout(config)
  _check_positive(config, m, lay)
  errors: list[str] = []
  _check_layout(errors, m, lay)
  _check_buckets(errors, config, m, lay)
  _check_model_values(errors, m)
  _check_run_values(errors, config, lay)
  _check_imported(errors, config)
  if num_devices is not None:
    _check(errors, lay.devices <= num_devices,
           f'mesh.dp * mesh.tp * mesh.pp = {lay.dp}*{lay.tp}*{lay.pp} = {lay.devices} devices, '
           f'but only {num_devices} are available; shrink the mesh (--config.mesh.dp / .tp / '
           f'.pp) or run on more devices.')
  if errors:
    raise ConfigError('Invalid config:\n  - ' + '\n  - '.join(errors))
  if config.data.source == 'tokens':
    from moejax.data import tokens   # reads only the dataset's metadata and file sizes
    tokens.check(config.data.path, m.vocab_size, lay.seq_len)


def _check_positive(config: ml_collections.ConfigDict, m: ModelConfig, lay: Layout) -> None:
  positive = {'mesh.tp': lay.tp, 'mesh.pp': lay.pp, 'mesh.dp': lay.dp,
              'pipeline.repeats': lay.repeats, 'model.d_model': m.d_model,
              'model.num_heads': m.num_heads, 'model.head_dim': m.head_dim,
              'moe.d_ff': m.d_ff, 'model.num_blocks': m.num_blocks,
              'moe.num_experts': m.num_experts, 'moe.top_k': m.top_k,
              'moe.group_size': m.group_size, 'data.seq_len': lay.seq_len,
              'data.micro_batch_size': lay.micro_batch_size,
              'data.num_micro_batches': lay.num_micro_batches, 'num_steps': config.num_steps,
              'model.vocab_size': m.vocab_size, 'model.max_len': m.max_len}
  bad = [k for k, v in positive.items() if not (isinstance(v, int) and v >= 1)]
  if bad:
    raise ConfigError('These keys must be positive integers: ' + ', '.join(
        f'{k}={positive[k]!r}' for k in bad))


def _check_layout(errors: list[str], m: ModelConfig, lay: Layout) -> None:
  """How the model and batch divide over the mesh and the pipeline."""
  tp, pp, dp, r = lay.tp, lay.pp, lay.dp, lay.repeats
  _check(errors, m.num_heads % tp == 0,
         f'model.num_heads={m.num_heads} is not divisible by mesh.tp={tp}: attention heads are '
         f'split over tp; choose num_heads as a multiple of tp or a tp dividing it.')
  if lay.experts_over_dp:
    _check(errors, m.num_experts % (dp * tp) == 0,
           f'moe.num_experts={m.num_experts} is not divisible by mesh.dp * mesh.tp = {dp}*{tp}: '
           f'with mesh.experts_over_dp experts are split over dp x tp; choose num_experts as a '
           f'multiple of {dp * tp} or set mesh.experts_over_dp=False.')
  else:
    _check(errors, m.num_experts % tp == 0,
           f'moe.num_experts={m.num_experts} is not divisible by mesh.tp={tp}: experts are '
           f'split over tp; choose num_experts as a multiple of tp.')
  _check(errors, lay.micro_batch_size % dp == 0,
         f'data.micro_batch_size={lay.micro_batch_size} is not divisible by mesh.dp={dp}: each '
         f'micro-batch\'s sequences are split over dp; use a multiple of dp.')
  _check(errors, m.num_blocks % (pp * r) == 0,
         f'model.num_blocks={m.num_blocks} is not divisible by mesh.pp * pipeline.repeats = '
         f'{pp}*{r}: every stage needs the same number of blocks per repeat.')
  _check(errors, lay.num_micro_batches % pp == 0,
         f'data.num_micro_batches={lay.num_micro_batches} is not divisible by mesh.pp={pp}: '
         f'embedding, head and loss split the micro-batches over pp.')
  _check(errors, lay.num_micro_batches >= pp,
         f'data.num_micro_batches={lay.num_micro_batches} < mesh.pp={pp}: with fewer micro-batches '
         f'than stages some stages never work (bubble (pp-1)/(M+pp-1) above 50%); use at least '
         f'pp micro-batches.')
  _check(errors, lay.seq_len <= m.max_len or m.positions == 'rope',
         f'data.seq_len={lay.seq_len} is longer than the position table model.max_len='
         f'{m.max_len}; raise model.max_len or shorten data.seq_len.')
  t, g = lay.seq_len, m.group_size
  if g > t:
    _check(errors, g % t == 0 and lay.micro_batch_size % (g // t) == 0,
           f'moe.group_size={g} is longer than data.seq_len={t} but is not a whole number of '
           f'the micro-batch\'s sequences (data.micro_batch_size={lay.micro_batch_size}): a '
           f'routing group is a chunk of one sequence or whole sequences; use a divisor of {t} '
           f'or {t} x a divisor of {lay.micro_batch_size}.')
    _check(errors, t % tp == 0,
           f'data.seq_len={t} is not divisible by mesh.tp={tp}: a group of whole sequences is '
           f'routed in the sequence\'s tp shards; use a seq_len that is a multiple of {tp}.')
    return
  _check(errors, t % g == 0,
         f'data.seq_len={t} is not divisible by moe.group_size={g}: routing groups are '
         f'contiguous chunks of one sequence (or whole sequences); use a divisor of {t} or a '
         f'multiple of it.')
  if t % g == 0:
    groups, share = t // g, t // tp
    spans = t % tp == 0 and g % max(share, 1) == 0
    _check(errors, groups % tp == 0 or spans,
           f'data.seq_len / moe.group_size = {groups} routing groups per sequence do not divide '
           f'over mesh.tp={tp}: each tp shard of the sequence ({share} tokens) must hold whole '
           f'groups, or each group whole shards; use a moe.group_size that divides or is a '
           f'multiple of {share}.')


def _check_buckets(errors: list[str], config: ml_collections.ConfigDict, m: ModelConfig,
                   lay: Layout) -> None:
  """Every bucket keeps the tokens per step and fits the mesh like data.seq_len must."""
  try:
    lengths = data_config(config).buckets
  except ValueError:
    errors.append(f'data.buckets={config.data.buckets!r}: expected comma-separated sequence '
                  f'lengths, e.g. "128,256,512".')
    return
  budget = lay.micro_batch_size * lay.seq_len
  for t in lengths:
    if t <= 0 or budget % t:
      errors.append(f'data.buckets: {t} does not divide the tokens per micro-batch '
                    f'data.micro_batch_size * data.seq_len = {budget}; use divisors of it.')
  if errors:
    return
  for bucket in bucket_layouts(config)[1 if not lengths else 0:]:
    before = len(errors)
    _check_layout(errors, m, bucket)
    errors[before:] = [f'bucket {bucket.seq_len} (data.micro_batch_size becomes '
                       f'{bucket.micro_batch_size}): {e}' for e in errors[before:]]


def _check_model_values(errors: list[str], m: ModelConfig) -> None:
  """Choices and ranges of the model and moe keys."""
  _check(errors, m.top_k <= m.num_experts,
         f'moe.top_k={m.top_k} > moe.num_experts={m.num_experts}; top_k must not exceed the '
         f'number of experts.')
  _check(errors, m.capacity_factor > 0 and m.eval_capacity_factor > 0,
         'moe.capacity_factor and moe.eval_capacity_factor must be > 0.')
  _check(errors, 0.0 <= m.expert_dropout < 1.0, f'moe.dropout={m.expert_dropout} not in [0, 1).')
  _check(errors, m.dtype in DTYPES, f'model.dtype={m.dtype!r} not one of {DTYPES}.')
  _check(errors, m.positions in ('learned', 'rope'),
         f"model.positions={m.positions!r} not one of ('learned', 'rope').")
  _check(errors, m.positions != 'rope' or m.head_dim % 2 == 0,
         f'model.head_dim={m.head_dim} must be even for rotary positions (model.positions=rope).')
  _check(errors, m.gelu in GELUS, f'moe.gelu={m.gelu!r} not one of {GELUS}.')
  _check_architecture(errors, m)
  _check(errors, m.dispatch in DISPATCHES,
         f'moe.dispatch={m.dispatch!r} not one of {DISPATCHES}.')
  _check(errors, m.bias_update_rule in BIAS_RULES,
         f'moe.bias_update_rule={m.bias_update_rule!r} not one of {BIAS_RULES}.')
  _check(errors, m.bias_update_rate >= 0,
         f'moe.bias_update_rate={m.bias_update_rate} must be >= 0 (0 turns bias balancing off).')
  _check(errors, isinstance(m.sinkhorn_iters, int) and m.sinkhorn_iters >= 0,
         f'moe.sinkhorn_iters={m.sinkhorn_iters!r} must be an integer >= 0 (0 turns in-group '
         'balancing off; 10-20 is typical).')


def _check_architecture(errors: list[str], m: ModelConfig) -> None:
  """The open families' architecture keys (norms, grouped-query heads, SwiGLU, gates)."""
  _check(errors, m.norm in NORMS, f'model.norm={m.norm!r} not one of {NORMS}.')
  from moejax.convert.families import FAMILIES
  _check(errors, m.family in ('',) + tuple(FAMILIES),
         f'model.family={m.family!r} not one of {("",) + tuple(FAMILIES)} ("": moejax\'s own).')
  _check(errors, m.norm_eps > 0, f'model.norm_eps={m.norm_eps} must be > 0 (1e-5 or 1e-6).')
  _check(errors, m.qk_norm in QK_NORMS, f'model.qk_norm={m.qk_norm!r} not one of {QK_NORMS}.')
  _check(errors, m.ffn in FFNS, f'moe.ffn={m.ffn!r} not one of {FFNS}.')
  _check(errors, m.normalize_gates_over in GATE_NORMS_OVER,
         f'moe.normalize_gates_over={m.normalize_gates_over!r} not one of {GATE_NORMS_OVER}.')
  _check(errors, m.rope_base > 1, f'model.rope_base={m.rope_base} must be > 1 (1e4 or 1e6).')
  _check(errors, m.num_kv_heads >= 0 and m.num_heads % m.kv_heads == 0,
         f'model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads} '
         f'(grouped-query attention; 0 means num_heads).')


def _check_imported(errors: list[str], config: ml_collections.ConfigDict) -> None:
  """A config made from a Hugging Face directory keeps that checkpoint's shape keys."""
  hf_dir = config.get('hf_dir', '')
  if not hf_dir:
    return
  from moejax.convert import families
  want = families.sections(families.read_hf_config(hf_dir))
  for key in families.SHAPE_KEYS + ('model.family',):
    section, name = key.split('.')
    have, given = config[section][name], want[section][name]
    _check(errors, have == given,
           f'{key}={have!r} conflicts with {hf_dir}/config.json, which gives {given!r} (the '
           f'checkpoint\'s weights have that shape); drop the override or use another checkpoint.')


def _check_run_values(errors: list[str], config: ml_collections.ConfigDict, lay: Layout) -> None:
  """Choices and ranges of the pipeline, data and run-control keys."""
  import os
  _check(errors, not config.init_from or os.path.isdir(config.init_from),
         f'init_from={config.init_from!r}: no such directory (a run directory, its '
         f'checkpoints/, or a `moejax.cli.convert import` --workdir).')
  _check(errors, lay.remat_policy in REMAT_POLICIES,
         f'pipeline.remat_policy={lay.remat_policy!r} not one of {REMAT_POLICIES}.')
  _check(errors, config.data.source in DATA_SOURCES,
         f'data.source={config.data.source!r} not one of {DATA_SOURCES}.')
  _check(errors, not config.data.pack or config.data.source == 'tokens',
         f'data.pack packs the documents of a token dataset; set data.source=tokens (and '
         f'data.path), or data.pack=False for data.source={config.data.source!r}.')
  _check(errors, config.log_every >= 1, f'log_every={config.log_every} must be >= 1.')
  try:
    profile_steps(config)
  except ConfigError as e:
    errors.append(str(e))
  _check(errors, config.checkpoint_every >= 0,
         f'checkpoint_every={config.checkpoint_every} must be >= 0 (0 saves only at the end).')
