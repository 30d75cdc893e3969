"""Validation of a config before anything is compiled: every key against its rule (declared
with its field in moejax.config), then the checks that relate several keys; every inconsistency
named with its keys and a fix, all of them in one ConfigError."""
from __future__ import annotations

import ml_collections

from moejax.config import (Layout, ModelConfig, bucket_layouts, data_config, field_errors,
                           known_keys, layout, model_config, optional_keys, run_config)
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
  unknown, missing = sorted(have - known), sorted(known - have - optional_keys())
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
  errors = field_errors(config)
  if errors:   # the checks below divide by these values
    raise ConfigError('Invalid config:\n  - ' + '\n  - '.join(errors))
  m, lay = model_config(config), layout(config)
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
  lengths = data_config(config).buckets
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
  """The model and moe keys that depend on each other."""
  _check(errors, m.top_k <= m.num_experts,
         f'moe.top_k={m.top_k} > moe.num_experts={m.num_experts}; top_k must not exceed the '
         f'number of experts.')
  _check(errors, not m.mtp_depth or m.positions == 'rope',
         f'model.mtp_depth={m.mtp_depth} needs rotary positions: set model.positions=rope '
         '(a depth embeds token t+d at position t, which a learned table would misplace).')
  _check(errors, not (m.dense_blocks or m.dense_per_block) or m.dense_d_ff > 0,
         f'model.dense_blocks={m.dense_blocks} / model.dense_per_block={m.dense_per_block} '
         'need the dense MLP\'s width: set model.dense_d_ff.')
  _check(errors, m.positions != 'rope' or m.head_dim % 2 == 0,
         f'model.head_dim={m.head_dim} must be even for rotary positions (model.positions=rope).')
  from moejax.convert.families import FAMILIES
  _check(errors, m.family in ('',) + tuple(FAMILIES),
         f'model.family={m.family!r} not one of {("",) + tuple(FAMILIES)} ("": moejax\'s own).')
  _check(errors, m.num_experts % m.expert_groups == 0
         and m.num_experts // m.expert_groups >= (2 if m.expert_groups > 1 else 1),
         f'moe.expert_groups={m.expert_groups} must divide moe.num_experts={m.num_experts} into '
         f'groups of at least 2 experts (a group ranks by its two best scores).')
  _check(errors, m.top_groups <= m.expert_groups
         and (m.expert_groups == 1 or m.top_k <= m.top_groups * m.num_experts // m.expert_groups),
         f'moe.top_groups={m.top_groups} must be at most moe.expert_groups={m.expert_groups}, and '
         f'its groups must hold moe.top_k={m.top_k} experts.')
  _check(errors, m.num_heads % m.kv_heads == 0,
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
  """The pipeline, data and run-control keys that depend on each other or on the disk."""
  import os
  run = run_config(config)
  _check(errors, not run.init_from or os.path.isdir(run.init_from),
         f'init_from={run.init_from!r}: no such directory (a run directory, its '
         f'checkpoints/, or a `moejax.cli.convert import` --workdir).')
  _check(errors, not config.data.pack or config.data.source == 'tokens',
         f'data.pack packs the documents of a token dataset; set data.source=tokens (and '
         f'data.path), or data.pack=False for data.source={config.data.source!r}.')
  _check(errors, run.eval_every == 0 or run.eval_batches >= 1,
         f'eval_batches={run.eval_batches} with eval_every={run.eval_every}: evaluation needs at '
         f'least one batch; set eval_batches >= 1, or eval_every=0 to turn evaluation off.')
