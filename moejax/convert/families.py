"""The open MoE families moejax imports and exports: how a transformers `config.json` maps onto
moejax's config keys, and back.

A family is configuration of the one model (RMSNorm, SwiGLU experts without biases, rotary
positions, optional grouped-query heads, QK-norm, attention biases and a gated shared expert),
not a copy of it. transformers'
`router_aux_loss_coef` weighs one loss over every layer's tokens pooled (transformers'
load_balancing_loss_func), whose expert fractions count tokens (K times moejax's per-assignment
fractions), where moejax sums a loss per block: it maps to moe.aux_loss_weight =
coef x top_k / layers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from moejax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
  name: str                 # transformers' model_type
  architecture: str         # transformers' class, written into an exported config.json
  experts_prefix: str       # 'mlp' or 'block_sparse_moe' in the per-expert tensor names
  expert_names: tuple[str, str, str]   # per-expert (gate, up, down) tensor names
  qk_norm: str              # 'none', 'full' or 'head'
  gates_renormalised: bool | None      # fixed by the family (None: config's norm_topk_prob)
  attn_bias_key: str = 'attention_bias'  # config.json's switch of the q/k/v biases
  attn_out_bias: bool = True           # o_proj has a bias where q/k/v have theirs
  shared_expert: str = ''              # the shared expert's module name ('': none)
  router: str = 'gate'                 # the router's module name
  ffn: str = 'swiglu'                  # moe.ffn of the experts
  biases: bool = False                 # experts and router carry biases (GPT-OSS)
  sinks: bool = False                  # attention sinks (GPT-OSS)
  windows: bool = False                # sliding-window blocks from config.json's layer_types
  interleaved: bool = False            # experts fused [E, D, 2F] (gate even, up odd columns)
  published_format: str = ''           # how the published checkpoints store the experts
  latent: bool = False                 # multi-head latent attention, sigmoid group routing
  dense_layers: str = ''               # config.json's key placing dense (non-MoE) layers


FAMILIES = {f.name: f for f in (
    Family('olmoe', 'OlmoeForCausalLM', 'mlp', ('gate_proj', 'up_proj', 'down_proj'), 'full',
           None),
    Family('qwen3_moe', 'Qwen3MoeForCausalLM', 'mlp', ('gate_proj', 'up_proj', 'down_proj'),
           'head', None, dense_layers='mlp_only_layers'),
    Family('mixtral', 'MixtralForCausalLM', 'block_sparse_moe', ('w1', 'w3', 'w2'), 'none', True),
    # Qwen1.5-MoE / Qwen2-57B-A14B: a gated shared expert beside the routed ones.
    Family('qwen2_moe', 'Qwen2MoeForCausalLM', 'mlp', ('gate_proj', 'up_proj', 'down_proj'),
           'none', None, attn_bias_key='qkv_bias', attn_out_bias=False,
           shared_expert='shared_expert', dense_layers='mlp_only_layers'),
    # gpt-oss-20b / 120b: attention sinks, alternating windowed and full attention, YaRN,
    # biases everywhere, the clamped SwiGLU; experts stored fused (gate and up interleaved), in
    # the published checkpoints as MXFP4.
    Family('gpt_oss', 'GptOssForCausalLM', 'mlp', ('gate_up_proj', '', 'down_proj'), 'none',
           True, router='router', ffn='clamped_swiglu', biases=True, sinks=True, windows=True,
           interleaved=True, published_format='MXFP4'),
    # DeepSeek-V3 / Kimi-K2 blocks: MLA, sigmoid group-limited routing with a selection bias,
    # an ungated shared expert, dense first layers, multi-token prediction modules.
    Family('deepseek_v3', 'DeepseekV3ForCausalLM', 'mlp', ('gate_proj', 'up_proj', 'down_proj'),
           'none', None, shared_expert='shared_experts', latent=True,
           dense_layers='first_k_dense_replace'),
)}

# moejax keys an imported config takes from config.json (a user override of one of them is an
# error naming both values: the weights have that shape).
SHAPE_KEYS = ('model.vocab_size', 'model.d_model', 'model.num_heads', 'model.head_dim',
              'model.num_kv_heads', 'model.num_blocks', 'model.rope_base', 'model.norm',
              'model.norm_eps', 'model.qk_norm', 'model.attn_bias', 'model.positions',
              'moe.num_experts', 'moe.top_k', 'moe.d_ff', 'moe.ffn', 'moe.expert_bias',
              'moe.normalize_gates', 'moe.normalize_gates_over', 'model.attn_out_bias',
              'moe.shared_d_ff', 'moe.shared_gate', 'model.dense_blocks', 'model.dense_per_block',
              'model.dense_d_ff')


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, 'config.json')
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise ConfigError(f'{path}: cannot read ({e.strerror}); pass the directory of a Hugging '
                      f'Face checkpoint (config.json and *.safetensors).') from e
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path} is not valid JSON ({e}).') from e


def family_of(hf: dict[str, Any]) -> Family:
  name = hf.get('model_type')
  if name not in FAMILIES:
    raise ConfigError(f'config.json model_type={name!r}: moejax converts {sorted(FAMILIES)}.')
  return FAMILIES[name]


def _rope_keys(hf: dict[str, Any]) -> dict[str, Any]:
  """The rotary keys of config.json's rope_parameters (transformers 5) or rope_scaling."""
  params = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  kind = params.get('rope_type', params.get('type', 'default')) or 'default'
  if kind not in ('default', 'yarn'):
    raise ConfigError(f'config.json rope type {kind!r}: moejax has plain rotary positions and '
                      f'YaRN (rope_type "default" or "yarn").')
  keys = {'model.rope_base': float(params.get('rope_theta', hf.get('rope_theta', 10_000.0))),
          'model.rope_scaling': 'none', 'model.rope_factor': 1.0, 'model.rope_original_len': 0,
          'model.rope_beta_fast': 32.0, 'model.rope_beta_slow': 1.0, 'model.rope_truncate': True,
          'model.rope_attention_factor': 0.0, 'model.softmax_mscale': 0.0}
  if kind == 'yarn':
    factor = float(params['factor'])
    mscale = lambda m: 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
    attention_factor = params.get('attention_factor')
    if attention_factor is None and params.get('mscale') and params.get('mscale_all_dim'):
      attention_factor = mscale(params['mscale']) / mscale(params['mscale_all_dim'])
    keys.update({
        'model.rope_scaling': 'yarn', 'model.rope_factor': float(params['factor']),
        'model.rope_original_len': int(params['original_max_position_embeddings']),
        'model.rope_beta_fast': float(params.get('beta_fast') or 32.0),
        'model.rope_beta_slow': float(params.get('beta_slow') or 1.0),
        'model.rope_truncate': bool(params.get('truncate', True)),
        'model.rope_attention_factor': float(attention_factor or 0.0),
        'model.softmax_mscale': float(params.get('mscale_all_dim') or 0.0)})
  return keys


WINDOW_LETTERS = {'sliding_attention': 'S', 'full_attention': 'F'}


def _window_keys(hf: dict[str, Any], family: Family) -> dict[str, Any]:
  """model.sliding_window and model.window_pattern (the shortest period of layer_types)."""
  types = hf.get('layer_types') or ['full_attention']
  unknown = sorted(set(types) - set(WINDOW_LETTERS))
  if unknown:
    raise ConfigError(f'config.json layer_types has {unknown}: moejax has '
                      f'{sorted(WINDOW_LETTERS)}.')
  letters = ''.join(WINDOW_LETTERS[t] for t in types)
  if 'S' not in letters or not family.windows:
    return {'model.sliding_window': 0, 'model.window_pattern': ''}
  period = next(p for p in range(1, len(letters) + 1)
                if all(letters[i] == letters[i % p] for i in range(len(letters))))
  return {'model.sliding_window': int(hf['sliding_window']),
          'model.window_pattern': letters[:period]}


def _refuse_unsupported(hf: dict[str, Any], family: Family) -> None:
  """Architecture options of the families that moejax's model does not have."""
  checks = {
      'tie_word_embeddings': (hf.get('tie_word_embeddings', False), False),
      'hidden_act': (hf.get('hidden_act', 'silu'), 'silu'),
      'clip_qkv': (hf.get('clip_qkv'), None),
      'use_sliding_window': (bool(hf.get('use_sliding_window', False)), False),
      'layer_types': (sorted(set(hf.get('layer_types') or ['full_attention']))
                      if not family.windows else ['full_attention'], ['full_attention']),
      'sliding_window (Mixtral)': (hf.get('sliding_window') if family.name == 'mixtral'
                                   else None, None),
      'scoring_func': (hf.get('scoring_func', 'sigmoid' if family.latent else 'softmax'),
                       'sigmoid' if family.latent else 'softmax'),
      'attention_bias (MLA)': (bool(hf.get('attention_bias')) and family.latent, False),
      'rope_interleave': (hf.get('rope_interleave', True) if family.latent else True, True),
  }
  bad = [f'{k}={have!r} (moejax needs {want!r})' for k, (have, want) in checks.items()
         if have != want]
  if bad:
    raise ConfigError(f'config.json of a {family.name} model uses options moejax\'s model does '
                      f'not have: {"; ".join(bad)}.')


def _dense_layers(hf: dict[str, Any], family: Family) -> tuple[int, int]:
  """(dense first layers, dense layers before each MoE layer): DeepSeek-V3's
  first_k_dense_replace, or the layers Qwen's mlp_only_layers and decoder_sparse_step (layer i
  is MoE when (i + 1) % step is 0) leave dense, which must be a leading run and then a repeating
  run before each MoE layer (moejax's model.dense_blocks and model.dense_per_block)."""
  if family.dense_layers == 'first_k_dense_replace':
    return hf.get('first_k_dense_replace') or 0, 0
  if family.dense_layers != 'mlp_only_layers':
    return 0, 0
  n, step = hf['num_hidden_layers'], hf.get('decoder_sparse_step') or 1
  only = set(hf.get('mlp_only_layers') or [])
  moe = [i for i in range(n) if i not in only and (i + 1) % step == 0]
  between = moe[1] - moe[0] - 1 if len(moe) > 1 else 0
  first = moe[0] - between if moe else -1
  if first < 0 or moe != [first + b * (between + 1) + between for b in range(len(moe))] or (
      moe[-1] != n - 1):
    dense = sorted(set(range(n)) - set(moe))
    raise ConfigError(
        f'config.json makes layers {dense} of 0..{n - 1} dense (mlp_only_layers='
        f'{sorted(only)}, decoder_sparse_step={step}): moejax\'s model has dense layers first '
        f'and the same number before each MoE layer, the last layer MoE.')
  return first, between


def _qwen_dense_keys(m) -> dict[str, Any]:
  """Qwen's decoder_sparse_step and mlp_only_layers for moejax's dense layers (the step the
  repeating run gives where the first run is a whole number of its periods, else 1)."""
  step = m.dense_per_block + 1
  step = 1 if m.dense_blocks % step else step
  moe = {m.block_layer(b) + m.dense_per_block for b in range(m.num_blocks)}
  return {'decoder_sparse_step': step,
          'mlp_only_layers': [i for i in range(m.num_layers)
                              if i not in moe and (i + 1) % step == 0]}


def _layer_keys(hf: dict[str, Any], family: Family) -> dict[str, Any]:
  """model.num_blocks (the MoE layers), dense_blocks, dense_per_block and dense_d_ff."""
  dense, between = _dense_layers(hf, family)
  if (dense or between) and not hf.get('intermediate_size'):
    raise ConfigError('config.json has dense layers but no intermediate_size (their MLP\'s '
                      'width); add it.')
  return {'model.num_blocks': (hf['num_hidden_layers'] - dense) // (between + 1),
          'model.dense_blocks': dense, 'model.dense_per_block': between,
          'model.dense_d_ff': hf['intermediate_size'] if dense or between else 0}


def model_keys(hf: dict[str, Any]) -> dict[str, Any]:
  """moejax config keys ('section.key': value) of a transformers config.json's model."""
  family = family_of(hf)
  _refuse_unsupported(hf, family)
  heads = hf['num_attention_heads']
  top_k = hf['num_experts_per_tok']
  renorm = family.gates_renormalised
  if renorm is None:
    renorm = bool(hf.get('norm_topk_prob', False))
  latent = family.latent
  layers = _layer_keys(hf, family)
  shared = (hf.get('n_shared_experts', 0) * hf['moe_intermediate_size'] if latent
            else hf.get('shared_expert_intermediate_size', 0) if family.shared_expert else 0)
  return {
      **layers,
      'model.vocab_size': hf['vocab_size'],
      'model.d_model': hf['hidden_size'],
      'model.num_heads': heads,
      'model.head_dim': (hf['qk_nope_head_dim'] if latent
                         else hf.get('head_dim') or hf['hidden_size'] // heads),
      'model.kv_lora_rank': hf['kv_lora_rank'] if latent else 0,
      'model.q_lora_rank': (hf.get('q_lora_rank') or 0) if latent else 0,
      'model.rope_head_dim': hf['qk_rope_head_dim'] if latent else 0,
      'model.v_head_dim': hf['v_head_dim'] if latent else 0,
      'model.num_kv_heads': hf.get('num_key_value_heads') or heads,
      'model.mtp_depth': (hf.get('num_nextn_predict_layers') or 0) if latent else 0,
      'model.max_len': hf.get('max_position_embeddings', 4096),
      'model.positions': 'rope',
      **_rope_keys(hf),
      **_window_keys(hf, family),
      'model.attn_sinks': family.sinks,
      'model.norm': 'rmsnorm',
      'model.norm_eps': float(hf.get('rms_norm_eps', 1e-5)),
      'model.qk_norm': family.qk_norm,
      'model.attn_bias': bool(hf.get(family.attn_bias_key, family.attn_bias_key == 'qkv_bias')),
      'model.attn_out_bias': family.attn_out_bias,
      'model.init_std': float(hf.get('initializer_range', 0.02)),
      'moe.num_experts': (hf.get('n_routed_experts') or hf.get('num_experts')
                          or hf['num_local_experts']),
      'moe.router_score': 'sigmoid' if latent else 'softmax',
      'moe.selection_bias': latent,
      'moe.expert_groups': (hf.get('n_group') or 1) if latent else 1,
      'moe.top_groups': (hf.get('topk_group') or 1) if latent else 1,
      'moe.routed_scale': float(hf.get('routed_scaling_factor', 1.0)) if latent else 1.0,
      'moe.top_k': top_k,
      'moe.d_ff': hf.get('moe_intermediate_size') or hf['intermediate_size'],
      'moe.ffn': family.ffn,
      'moe.swiglu_limit': float(hf.get('swiglu_limit', 7.0)),
      'moe.swiglu_alpha': float(hf.get('swiglu_alpha', 1.702)),
      'moe.expert_bias': family.biases,
      'moe.router_bias': family.biases,
      'moe.normalize_gates': renorm,
      'moe.normalize_gates_over': 'top_k',
      'moe.aux_loss_weight': (float(hf.get('router_aux_loss_coef', 0.0)) * top_k
                              / layers['model.num_blocks']),
      'moe.shared_d_ff': int(shared),
      'moe.shared_gate': bool(family.shared_expert) and not latent,
  }


# The model and moe keys config.json does not decide: what an imported model trains with unless
# a config says otherwise (dropless like transformers; nothing dropped at evaluation either).
TRAINING_KEYS = {
    'model.dtype': 'float32', 'moe.capacity_factor': 1.25, 'moe.group_size': 256,
    'moe.dropout': 0.0, 'moe.z_loss_weight': 0.0, 'moe.gelu': 'exact',
    'moe.bias_update_rate': 0.0, 'moe.bias_update_rule': 'sign', 'moe.sinkhorn_iters': 0,
    'moe.dispatch': 'dropless'}


def sections(hf: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Complete model and moe config sections of a config.json's model."""
  keys = {**TRAINING_KEYS, **model_keys(hf), 'model.family': family_of(hf).name}
  # Evaluation keeps every assignment: one expert can take every choice of a group.
  keys['moe.eval_capacity_factor'] = float(keys['moe.num_experts']) / keys['moe.top_k']
  out: dict[str, dict[str, Any]] = {'model': {}, 'moe': {}}
  for key, value in keys.items():
    section, name = key.split('.')
    out[section][name] = value
  return out


def hf_config(family: Family, m) -> dict[str, Any]:
  """A transformers config.json for moejax's ModelConfig `m` of `family` (export)."""
  out = {
      'architectures': [family.architecture], 'model_type': family.name,
      'vocab_size': m.vocab_size, 'hidden_size': m.d_model, 'num_attention_heads': m.num_heads,
      'num_key_value_heads': m.kv_heads, 'head_dim': m.head_dim,
      'num_hidden_layers': m.num_layers, 'max_position_embeddings': m.max_len,
      'rms_norm_eps': m.norm_eps, 'rope_theta': m.rope_base,
      'rope_parameters': {'rope_theta': m.rope_base, 'rope_type': 'default'},
      'attention_bias': m.attn_bias, 'hidden_act': 'silu', 'tie_word_embeddings': False,
      'num_experts_per_tok': m.top_k, 'initializer_range': m.init_std,
      'router_aux_loss_coef': m.aux_loss_weight * m.num_blocks / m.top_k,
      'torch_dtype': 'float32',
      'use_cache': True,
  }
  if m.rope_scaling == 'yarn':
    out['rope_parameters'] = {
        'rope_theta': m.rope_base, 'rope_type': 'yarn', 'factor': m.rope_factor,
        'original_max_position_embeddings': m.rope_original_len, 'beta_fast': m.rope_beta_fast,
        'beta_slow': m.rope_beta_slow, 'truncate': m.rope_truncate,
        **({'attention_factor': m.rope_attention_factor} if m.rope_attention_factor else {})}
  if family.name == 'mixtral':
    out.update(num_local_experts=m.num_experts, intermediate_size=m.d_ff, sliding_window=None)
  elif family.latent:
    out.update(n_routed_experts=m.num_experts, moe_intermediate_size=m.d_ff,
               n_shared_experts=m.shared_d_ff // m.d_ff,
               intermediate_size=m.dense_d_ff or m.shared_d_ff,
               kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank or None,
               qk_rope_head_dim=m.rope_head_dim, qk_nope_head_dim=m.head_dim,
               v_head_dim=m.value_head_dim, head_dim=m.rope_head_dim, n_group=m.expert_groups,
               topk_group=m.top_groups, routed_scaling_factor=m.routed_scale,
               norm_topk_prob=m.normalize_gates, first_k_dense_replace=m.dense_blocks,
               rope_interleave=True,
               num_nextn_predict_layers=m.mtp_depth, scoring_func='sigmoid',
               topk_method='noaux_tc')
    if m.softmax_mscale:
      out['rope_parameters']['mscale_all_dim'] = m.softmax_mscale
  elif family.name == 'gpt_oss':
    letters = {v: k for k, v in WINDOW_LETTERS.items()}
    out.update(num_local_experts=m.num_experts, intermediate_size=m.d_ff,
               sliding_window=m.sliding_window, swiglu_limit=m.swiglu_limit,
               swiglu_alpha=m.swiglu_alpha,
               layer_types=[letters['S' if m.windowed(i) else 'F'] for i in range(m.num_layers)])
  elif family.name == 'qwen3_moe':
    out.update(num_experts=m.num_experts, moe_intermediate_size=m.d_ff,
               intermediate_size=m.dense_d_ff or m.d_ff, norm_topk_prob=m.normalize_gates,
               use_sliding_window=False, **_qwen_dense_keys(m))
  elif family.name == 'qwen2_moe':
    out.update(num_experts=m.num_experts, moe_intermediate_size=m.d_ff,
               shared_expert_intermediate_size=m.shared_d_ff,
               intermediate_size=m.dense_d_ff or m.shared_d_ff, norm_topk_prob=m.normalize_gates,
               use_sliding_window=False, qkv_bias=m.attn_bias, **_qwen_dense_keys(m))
    del out['attention_bias']
  else:
    out.update(num_experts=m.num_experts, intermediate_size=m.d_ff,
               norm_topk_prob=m.normalize_gates, clip_qkv=None)
  return out


def check_exportable(family: Family | None, m) -> None:
  """The model of a moejax run must be one the family's transformers class computes."""
  if family is None:
    raise ConfigError('This run is moejax\'s own GPT-2-style family (LayerNorm, GELU experts, '
                      'learned positions), which has no Hugging Face architecture to export to; '
                      'export runs of configs/olmoe.py, qwen3_moe.py, mixtral.py, qwen2_moe.py '
                      'or gpt_oss.py.')
  want = {'positions': 'rope', 'norm': 'rmsnorm', 'ffn': family.ffn,
          'expert_bias': family.biases, 'router_bias': family.biases, 'attn_sinks': family.sinks,
          'qk_norm': family.qk_norm}
  if not family.windows:
    want['sliding_window'] = 0
  bad = [f'{k}={getattr(m, k)!r} (needs {v!r})' for k, v in want.items() if getattr(m, k) != v]
  if m.normalize_gates and m.normalize_gates_over != 'top_k':
    bad.append('normalize_gates_over=kept (transformers renormalises over the top-k choices)')
  if family.gates_renormalised is not None and m.normalize_gates != family.gates_renormalised:
    bad.append(f'normalize_gates={m.normalize_gates} (needs {family.gates_renormalised})')
  if m.attn_bias and family.name == 'mixtral':
    bad.append('attn_bias=True (Mixtral has no attention biases)')
  if m.attn_bias and m.attn_out_bias != family.attn_out_bias:
    bad.append(f'attn_out_bias={m.attn_out_bias} (needs {family.attn_out_bias})')
  if m.dense_blocks and not family.dense_layers:
    bad.append(f'dense_blocks={m.dense_blocks} ({family.name} has no dense layers)')
  if m.dense_per_block and family.dense_layers != 'mlp_only_layers':
    bad.append(f'dense_per_block={m.dense_per_block} ({family.name} has dense layers only '
               'first)')
  if family.latent and not m.latent:
    bad.append('kv_lora_rank=0 (DeepSeek-V3 attention is MLA)')
  if bool(m.shared_d_ff) != bool(family.shared_expert) or m.shared_gate != (
      bool(family.shared_expert) and not family.latent):
    bad.append(f'shared_d_ff={m.shared_d_ff}, shared_gate={m.shared_gate} (needs '
               + ('a gated shared expert)' if family.shared_expert else 'none)'))
  if bad:
    raise ConfigError(f'This run\'s model is not a {family.name} model: {"; ".join(bad)}.')
