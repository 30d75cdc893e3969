"""The weight-name table between moejax's canonical parameters (blocks stacked [NB, ...]) and a
Hugging Face checkpoint of the open families: data that both conversions walk, one Rule per
moejax parameter (or pair, for fused experts) with small named hooks for the transposes.

Names: '{b}' a block, '{e}' an expert. transformers' Linear weights are [out, in]; moejax's are
[in, out] with heads as their own axis ([D, N, H]), experts leading ([E, D, F]).
Legend: V vocabulary (Vp padded), D d_model, N heads, K key/value heads, H head_dim, E experts,
F expert hidden.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np

from moejax.config import ModelConfig
from moejax.convert import mxfp4
from moejax.convert.families import Family
from moejax.model import params as params_lib

Path = tuple[str, ...]
Arrays = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """moejax params `paths` <-> HF tensors `names`. scope: 'model' (whole arrays), 'block'
  (the [b] slice of each path), 'expert' (the [b, e] slice). rows: the HF tensors hold every
  expert of a block along their first axis (fused experts), applied one expert (row) at a
  time, so no application holds more than one expert's slice. Hooks left None are derived from
  the parameter's declaration (`derive`); a rule names its own only where the layouts differ
  by more than the declaration says (vocabulary rows, rotary order, fused or quantized tensors)."""
  paths: tuple[Path, ...]
  names: tuple[str, ...]
  scope: str
  to_moejax: Callable[[Arrays], Arrays] | None = None  # HF tensors -> moejax slices
  to_hf: Callable[[Arrays], Arrays] | None = None      # moejax slices -> HF tensors
  rows: bool = False
  vocab_axis: int | None = None             # the moejax axis the HF tensor's rows lie along


@dataclasses.dataclass(frozen=True)
class Use:
  """One application of a rule: concrete HF names and the index of each moejax slice."""
  rule: Rule
  names: tuple[str, ...]
  index: tuple[int, ...]     # () whole array, (b,) or (b, e)
  row: int | None = None     # rows rules: the HF tensors' row (expert) this application is
  span: tuple[int, int] | None = None   # (`pieces`) the HF rows (vocabulary entries) lo:hi

  def region(self, shape: tuple[int, ...]) -> tuple:
    """The part of the moejax slice that a value of `shape` (HF rows -> moejax) fills: from
    the span's first row on the vocabulary axis, from 0 on every other (a vocabulary's padded
    rows are never written)."""
    first = [0] * len(shape)
    if self.span is not None:
      first[self.rule.vocab_axis] = self.span[0]
    return self.index + tuple(slice(f, f + n) for f, n in zip(first, shape))

  def where(self) -> tuple:
    """The moejax slice this application reads: its index, on the vocabulary axis the span."""
    if self.span is None:
      return self.index
    return self.index + (slice(None),) * self.rule.vocab_axis + (slice(*self.span),)


# Hooks: HF Linear [out, in] -> moejax [in, ...out split...] and back.
def _t(a: np.ndarray) -> np.ndarray:
  return a.T   # a view: the import copies it into its parameter once


def _one(fn):
  return lambda arrays: (fn(arrays[0]),)


def rules(m: ModelConfig, family: Family, fused_experts: bool = False,
          quantized: bool = False) -> list[Rule]:
  """The table for model m; fused_experts: the checkpoint stores each block's experts as
  `experts.gate_up_proj` [E, 2F, D] and `experts.down_proj` [E, D, F] (import only);
  quantized: a GPT-OSS checkpoint's experts as MXFP4 `*_blocks` and `*_scales` (import: export
  writes them unquantized)."""
  # Vocabulary rows: the import writes the real ones (padded rows stay zero), export drops them.
  layer = 'model.layers.{b}.'
  attn = layer + 'self_attn.'
  out = [
      Rule((('embed', 'tok'),), ('model.embed_tokens.weight',), 'model',
           _one(lambda a: a), _one(lambda a: a[:m.vocab_size]), vocab_axis=0),
      Rule((('head', 'w'),), ('lm_head.weight',), 'model',
           _one(_t), _one(lambda a: _t(a[:, :m.vocab_size])), vocab_axis=1),
      Rule((('head', 'ln_f', 'scale'),), ('model.norm.weight',), 'model'),
      Rule((('blocks', 'ln1', 'scale'),), (layer + 'input_layernorm.weight',), 'block'),
      Rule((('blocks', 'ln2', 'scale'),), (layer + 'post_attention_layernorm.weight',), 'block'),
      Rule((('blocks', 'attn', 'wo'),), (attn + 'o_proj.weight',), 'block'),
  ]
  out = _attention_rules(m, out, attn)
  block_rules = [r for r in out if r.scope == 'block']
  # Dense layers (the first ones; each block's own before its MoE layer): the same attention
  # and norms, then a dense MLP.
  for prefix in ([('dense_blocks',)] if m.dense_blocks else []) + [
      ('blocks', f'dense_{i}') for i in range(m.dense_per_block)]:
    out += _dense_rules(m, block_rules, layer + 'mlp.', prefix)
  moe = _moe_rules(m, family, layer, fused_experts, quantized)
  out += moe
  if m.mtp_depth:      # the layers after the model's: a block each, and what joins it
    out += _mtp_rules(m, block_rules + moe, layer)
  return derive(out, m)


def _split_at(axes: tuple) -> int:
  """Where a projection's input axes end: a projection to the model width (its last axis
  'embed': o_proj, down_proj) reads every axis before it; any other reads its first axis."""
  return len(axes) - 1 if axes[-1] == 'embed' else 1


def _declared_hooks(axes: tuple, shape: tuple[int, ...]):
  """(to_moejax, to_hf) of one HF tensor <-> one slice, from the parameter's declaration: a
  matrix is an HF Linear weight [out, in] with its input and output axes flattened; anything
  else (norm scales, biases, sinks, selection biases) is the same values flattened."""
  if params_lib.role(axes) != 'matrix':
    return (lambda a: a.reshape(shape)), (lambda a: a.reshape(-1))
  inputs = math.prod(shape[:_split_at(axes)])
  return (lambda a: _t(a).reshape(shape)), (lambda a: _t(a.reshape(inputs, -1)))


_SCOPE_AXES = {'model': 0, 'block': 1, 'expert': 2}   # leading axes a rule's slice drops


def derive(table: list[Rule], m: ModelConfig) -> list[Rule]:
  """The table with each rule's missing hooks derived from its parameter's declared logical axes
  and shape; a rule naming several HF tensors for one parameter stacks them on its first axis
  (q, k, v projections into wqkv)."""
  declared = params_lib.declared(m)
  out = []
  for rule in table:
    if rule.to_moejax is not None:
      out.append(rule)
      continue
    (path,) = rule.paths
    axes, shape = declared[path]
    skip = _SCOPE_AXES[rule.scope] + (len(rule.names) > 1)
    to_moejax, to_hf = _declared_hooks(axes[skip:], shape[skip:])
    if len(rule.names) > 1:
      rule = dataclasses.replace(rule, to_moejax=lambda arrays, f=to_moejax: (
          np.stack([f(a) for a in arrays]),), to_hf=lambda arrays, f=to_hf: tuple(
              f(a) for a in arrays[0]))
    else:
      rule = dataclasses.replace(rule, to_moejax=_one(to_moejax), to_hf=_one(to_hf))
    out.append(rule)
  return out


def _attention_rules(m: ModelConfig, out: list[Rule], attn: str) -> list[Rule]:
  """`out` with the attention's projections, biases, sinks and QK-norm scales."""
  qkv = [attn + f'{p}_proj.weight' for p in 'qkv']
  if m.latent:
    out = [r for r in out if r.paths[0] != ('blocks', 'attn', 'wo')] + _latent_rules(m, attn)
  elif m.kv_heads == m.num_heads:
    out.append(Rule((('blocks', 'attn', 'wqkv'),), tuple(qkv), 'block'))
  else:
    out += [Rule((('blocks', 'attn', 'wq'),), (qkv[0],), 'block'),
            Rule((('blocks', 'attn', 'wkv'),), tuple(qkv[1:]), 'block')]
  if m.attn_bias:
    out += _bias_rules(m, attn)
  if m.attn_sinks:
    out.append(Rule((('blocks', 'attn', 'sinks'),), (attn + 'sinks',), 'block'))
  if m.qk_norm != 'none':
    out += [Rule((('blocks', 'attn', f'{p}_norm'),), (attn + f'{p}_norm.weight',), 'block')
            for p in 'qk']
  return out


def _moe_rules(m: ModelConfig, family: Family, layer: str, fused_experts: bool,
               quantized: bool) -> list[Rule]:
  """The MoE layer's: shared expert, router (bias, selection bias) and experts."""
  f, out = m.d_ff, []
  moe = layer + family.experts_prefix + '.'
  if m.shared_d_ff:
    out += _shared_rules(m, moe + family.shared_expert)
  router = moe + family.router
  out.append(Rule((('blocks', 'moe', 'router'),), (router + '.weight',), 'block'))
  if m.selection_bias:                       # DeepSeek-V3's e_score_correction_bias
    out.append(Rule((('blocks', 'moe', 'select_bias'),), (router + '.e_score_correction_bias',),
                    'block'))
  if m.router_bias:
    out.append(Rule((('blocks', 'moe', 'router_bias'),), (router + '.bias',), 'block'))
  ffn = [('blocks', 'moe', w) for w in ('w1', 'w3', 'w2')]
  if family.interleaved:
    out += _interleaved_rules(moe + 'experts.', quantized)
  elif fused_experts:   # one expert's row: gate_up [2F, D], down [D, F]
    out += [Rule((ffn[0], ffn[1]), (moe + 'experts.gate_up_proj',), 'expert',
                 lambda arrays: tuple(_t(p) for p in np.split(arrays[0], [f], axis=0)),
                 lambda arrays: (np.concatenate([_t(a) for a in arrays], 0),), rows=True),
            Rule((ffn[2],), (moe + 'experts.down_proj',), 'expert', rows=True)]
  else:
    out += [Rule((path,), (moe + 'experts.{e}.' + name + '.weight',), 'expert')
            for path, name in zip(ffn, family.expert_names)]
  return out


def _rope_order(width: int, rope: int) -> np.ndarray:
  """Feature order moejax's rotary layout takes from DeepSeek's: of the last `rope` of `width`
  features (pairs interleaved, (x0, x1), (x2, x3), ...), the even ones, then the odd ones (a
  half split); the others in place."""
  tail = np.arange(width - rope, width)
  return np.concatenate([np.arange(width - rope), tail[0::2], tail[1::2]])


def _latent_rules(m: ModelConfig, attn: str) -> list[Rule]:
  """MLA's projections: q_a_proj [Rq, D], q_a_layernorm, q_b_proj [N*(H+Hr), Rq] (or q_proj
  [N*(H+Hr), D]), kv_a_proj_with_mqa [R+Hr, D], kv_a_layernorm, kv_b_proj [N*(H+Hv), R],
  o_proj [D, N*Hv]; the rotary features of queries and of the shared key reordered from
  DeepSeek's interleaved pairs to moejax's half split (and back)."""
  n, h, hr, r = m.num_heads, m.head_dim, m.rope_head_dim, m.kv_lora_rank
  blocks = lambda name: ('blocks', 'attn', name)
  order = _rope_order(h + hr, hr)                      # per head, within H + Hr
  back = np.argsort(order)
  heads_in = lambda a: _t(a).reshape(a.shape[1], n, h + hr)[..., order]   # [in, N, H + Hr]
  heads_out = lambda a: _t(a[..., back].reshape(a.shape[0], -1))
  kv_order = _rope_order(r + hr, hr)
  out = [Rule((blocks('wkv_a'),), (attn + 'kv_a_proj_with_mqa.weight',), 'block',
              _one(lambda a: _t(a)[:, kv_order]), _one(lambda a: _t(a[:, np.argsort(kv_order)]))),
         Rule((blocks('kv_a_norm'),), (attn + 'kv_a_layernorm.weight',), 'block'),
         Rule((blocks('wkv_b'),), (attn + 'kv_b_proj.weight',), 'block'),
         Rule((blocks('wo'),), (attn + 'o_proj.weight',), 'block')]
  if m.q_lora_rank:
    return out + [
        Rule((blocks('wq_a'),), (attn + 'q_a_proj.weight',), 'block'),
        Rule((blocks('q_a_norm'),), (attn + 'q_a_layernorm.weight',), 'block'),
        Rule((blocks('wq_b'),), (attn + 'q_b_proj.weight',), 'block', _one(heads_in),
             _one(heads_out))]
  return out + [Rule((blocks('wq'),), (attn + 'q_proj.weight',), 'block', _one(heads_in),
                     _one(heads_out))]


def _split_columns(a: np.ndarray) -> Arrays:
  """[..., 2F] with gate and up interleaved (gate at even columns) -> (gate, up) [..., F]."""
  return a[..., 0::2], a[..., 1::2]


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
  return np.stack([gate, up], axis=-1).reshape(gate.shape[:-1] + (-1,))


def _interleaved_rules(experts: str, quantized: bool) -> list[Rule]:
  """GPT-OSS's fused experts, one expert (row) at a time: gate_up_proj [E, D, 2F] and its bias
  [E, 2F] (gate even, up odd columns), down_proj [E, F, D] and its bias [E, D]; `quantized`: the
  two matrices as MXFP4 (`*_blocks` [E, out, in/32, 16], `*_scales` [E, out, in/32] of the
  [E, out, in] transpose)."""
  w = lambda name: ('blocks', 'moe', name)
  same = _one(lambda a: a)
  row = lambda paths, names, to_moejax=None, to_hf=None: Rule(paths, names, 'expert', to_moejax,
                                                               to_hf, rows=True)
  if quantized:
    dequantized = lambda arrays: _t(mxfp4.dequantize(*arrays))                # [in, out]
    requantized = lambda a: mxfp4.quantize(_t(a))
    matrices = [row((w('w1'), w('w3')), (experts + 'gate_up_proj_blocks',
                                         experts + 'gate_up_proj_scales'),
                    lambda arrays: _split_columns(dequantized(arrays)),
                    lambda arrays: requantized(_interleave(*arrays))),
                row((w('w2'),), (experts + 'down_proj_blocks', experts + 'down_proj_scales'),
                    lambda arrays: (dequantized(arrays),), lambda arrays: requantized(arrays[0]))]
  else:
    matrices = [row((w('w1'), w('w3')), (experts + 'gate_up_proj',),
                    lambda arrays: _split_columns(arrays[0]),
                    lambda arrays: (_interleave(*arrays),)),
                row((w('w2'),), (experts + 'down_proj',), same, same)]   # [in, out] as ours
  return matrices + [
      row((w('b1'), w('b3')), (experts + 'gate_up_proj_bias',),
          lambda arrays: _split_columns(arrays[0]), lambda arrays: (_interleave(*arrays),)),
      row((w('b2'),), (experts + 'down_proj_bias',))]


def _dense_rules(m: ModelConfig, block_rules: list[Rule], mlp: str, prefix: Path
                 ) -> list[Rule]:
  """Dense blocks' rules: each block rule's copy for the params under `prefix`
  (('dense_blocks',), or a block's own ('blocks', 'dense_I')), and the MLP's Linear weights
  (gate_proj, up_proj, down_proj)."""
  dense = lambda path: prefix + path[1:]
  out = [dataclasses.replace(r, paths=tuple(dense(p) for p in r.paths)) for r in block_rules]
  names = {'w1': 'gate_proj', 'w3': 'up_proj', 'w2': 'down_proj'}
  if m.ffn == 'gelu':
    del names['w3']
  return out + [Rule((prefix + ('mlp', path),), (f'{mlp}{name}.weight',), 'block')
                for path, name in names.items()]


def _mtp_rules(m: ModelConfig, block_rules: list[Rule], layer: str) -> list[Rule]:
  """The multi-token-prediction depths' rules (DeepSeek-V3's layers past the model's): each
  block rule's copy for ('mtp', 'block', ...), the two norms, eh_proj [D, 2D] (the embedding's
  half first) and shared_head.norm. Each layer's copies of the token table and the LM head
  (embed_tokens, shared_head.head) are the model's: import checks and skips them, export leaves
  them out."""
  d = m.d_model
  mtp = lambda path: ('mtp', 'block') + path[1:]
  out = [dataclasses.replace(r, paths=tuple(mtp(p) for p in r.paths)) for r in block_rules]
  norms = {'enorm': 'enorm', 'hnorm': 'hnorm', 'ln_f': 'shared_head.norm'}
  out += [Rule((('mtp', name, 'scale'),), (f'{layer}{hf}.weight',), 'block')
          for name, hf in norms.items()]
  return out + [Rule((('mtp', 'proj'),), (f'{layer}eh_proj.weight',), 'block',
                     _one(lambda a: np.stack([a[:, :d].T, a[:, d:].T])),
                     _one(lambda a: np.concatenate([a[0].T, a[1].T], axis=1)))]


def _shared_rules(m: ModelConfig, shared: str) -> list[Rule]:
  """The shared expert's Linear weights [out, in] and its gate [1, D] (Qwen2-MoE)."""
  names = {'shared_w1': 'gate_proj', 'shared_w3': 'up_proj', 'shared_w2': 'down_proj'}
  if m.ffn == 'gelu':
    del names['shared_w3']
  out = [Rule((('blocks', 'moe', path),), (f'{shared}.{name}.weight',), 'block')
         for path, name in names.items()]
  if m.shared_gate:
    out.append(Rule((('blocks', 'moe', 'shared_gate'),), (f'{shared}_gate.weight',), 'block'))
  return out


def _bias_rules(m: ModelConfig, attn: str) -> list[Rule]:
  names = tuple(attn + f'{p}_proj.bias' for p in 'qkv')
  out = [Rule((('blocks', 'attn', 'bo'),), (attn + 'o_proj.bias',), 'block')
         ] if m.attn_out_bias else []
  if m.kv_heads == m.num_heads:
    return out + [Rule((('blocks', 'attn', 'bqkv'),), names, 'block')]
  return out + [Rule((('blocks', 'attn', 'bq'),), names[:1], 'block'),
                Rule((('blocks', 'attn', 'bkv'),), names[1:], 'block')]


def _layers(path: Path, m: ModelConfig) -> tuple[int, int, int]:
  """(first, step, count): the Hugging Face layers of a block parameter's applications, as
  ModelConfig.block_layer numbers them (the dense blocks first, then each block's own dense
  blocks and its MoE layer, then the multi-token-prediction depths)."""
  if path[0] == 'dense_blocks':
    return 0, 1, m.dense_blocks
  if path[0] == 'mtp':
    return m.num_layers, 1, m.mtp_depth
  own = int(path[1][len('dense_'):]) if path[1].startswith('dense_') else m.dense_per_block
  return m.block_layer(0) + own, m.dense_per_block + 1, m.num_blocks


def uses(table: list[Rule], m: ModelConfig) -> Iterator[Use]:
  """Every application of every rule, blocks in order (_layers gives their layers)."""
  for rule in table:
    if rule.scope == 'model':
      yield Use(rule, rule.names, ())
      continue
    first, step, count = _layers(rule.paths[0], m)
    for b in range(count):
      experts = range(m.num_experts) if rule.scope == 'expert' else [None]
      for e in experts:
        names = tuple(name.format(b=first + b * step, e=e) for name in rule.names)
        yield Use(rule, names, (b,) if e is None else (b, e), e if rule.rows else None)


def pieces(table: list[Rule], m: ModelConfig, rows: int) -> Iterator[Use]:
  """uses(table, m) with each vocabulary table's application cut into spans of `rows`
  vocabulary entries, so no conversion holds a whole table."""
  for use in uses(table, m):
    if use.rule.vocab_axis is None:
      yield use
      continue
    for lo in range(0, m.vocab_size, rows):
      yield dataclasses.replace(use, span=(lo, min(lo + rows, m.vocab_size)))
