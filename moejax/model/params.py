"""The parameter layout: the tree, its logical axes, its initialisation, and the two block
layouts every part of moejax converts between: canonical [NB, ...] (block order: checkpoints,
gradient comparisons, the NumPy reference) and stage-stacked [S, R, L, ...] (training), with
block b = r*S*L + s*L + l. Params, gradients, optimizer moments and per-layer stats all convert
here.

Legend: NB blocks, S pipeline stages, R circular repeats, L layers per stage.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import rng as rng_lib
from moejax.config import Layout, ModelConfig
from moejax.model.layers import Block, Embedder, Head, MtpDepth

_BLOCKS = jax.tree_util.DictKey('blocks')


def to_stages(blocks: Any, stages: int, repeats: int) -> Any:
  """Canonical [NB, ...] block params -> stage-stacked [S, R, L, ...]."""
  def one(a):
    a = a.reshape((repeats, stages, -1) + a.shape[1:])                  # [NB] -> [R, S, L]
    return a.swapaxes(0, 1)                      # [S, R, L, ...] (numpy or jax arrays alike)
  return jax.tree.map(one, blocks)


def from_stages(blocks: Any) -> Any:
  """Stage-stacked [S, R, L, ...] block params -> canonical [NB, ...] (block order)."""
  def one(a):
    a = jnp.swapaxes(a, 0, 1)                                           # [R, S, L, ...]
    return a.reshape((-1,) + a.shape[3:])                               # [NB, ...]
  return jax.tree.map(one, blocks)


STAGE_AXES = ('stage', 'repeat', 'layers')


def role(axes: tuple) -> str:
  """What a parameter is, from its declared logical axes (the one rule weight decay and the
  FLOP count read): 'positions' (the learned position table), 'matrix' (an 'embed' or 'latent'
  axis and another that is not the experts': projections, MLA's latent projections, router,
  experts, token table, LM head), else 'vector' (norm scales, QK-norm and latent norm scales,
  biases, sinks, the selection bias)."""
  axes = tuple(a for a in axes if a not in STAGE_AXES)
  if 'pos' in axes:
    return 'positions'
  if ('embed' in axes or 'latent' in axes) and len(axes) - axes.count('experts') >= 2:
    return 'matrix'
  return 'vector'


def decayed(cfg: ModelConfig, lay: Layout | None = None) -> dict[str, Any]:
  """Tree of bools like the params: weight decay applies to matrices only."""
  return jax.tree.map(lambda s: role(tuple(s)) == 'matrix', param_axes(cfg, lay),
                      is_leaf=lambda s: isinstance(s, P))


def _examples(cfg: ModelConfig):
  ids = jnp.zeros((1, 1, 1), jnp.int32)
  x = jnp.zeros((1, cfg.group_size, cfg.d_model), jnp.float32)
  return ids, x


# Each part of the model, initialised by one module (the embedder, one block, the head, one dense
# block, one multi-token-prediction depth): where it sits in the params tree, and for a stacked
# part the config count it is stacked by and its per-copy init keys [count].
_PLACES = {'embed': ('embed', None, None),
           'block': ('blocks', 'num_blocks', rng_lib.block_inits),
           'head': ('head', None, None),
           'dense_block': ('dense_blocks', 'dense_blocks', rng_lib.dense_block_inits),
           'mtp': ('mtp', 'mtp_depth', rng_lib.mtp_inits)}


def parts(cfg: ModelConfig) -> tuple[str, ...]:
  """The model's parts (_PLACES): every unstacked one, and each stacked one cfg has copies of."""
  return tuple(p for p, (_, count, _) in _PLACES.items() if count is None or getattr(cfg, count))


def _boxed(cfg: ModelConfig, key: jax.Array, part: str) -> dict[str, Any]:
  """One part's params (see `parts`), boxed with logical axes; each part's values depend on
  `key` and cfg only, not on which other parts are initialised."""
  ids, x = _examples(cfg)
  if part == 'embed':
    return Embedder(cfg).init(rng_lib.embed_init(key), ids)['params']
  if part == 'head':
    return Head(cfg).init(rng_lib.head_init(key), x)['params']
  if part == 'mtp':
    return MtpDepth(cfg, train=False).init(rng_lib.block_template_init(key), x, x)['params']
  return Block(cfg, train=False, dense=part == 'dense_block').init(
      rng_lib.block_template_init(key), x)['params']


@functools.lru_cache(maxsize=32)
def template(cfg: ModelConfig) -> dict[str, Any]:
  """Every part's params as boxed ShapeDtypeStructs (logical axes and shapes; nothing
  computed), traced once per model."""
  return {part: jax.eval_shape(lambda k, part=part: _boxed(cfg, k, part), jax.random.key(0))
          for part in parts(cfg)}


def param_axes(cfg: ModelConfig, lay: Layout | None = None) -> dict[str, Any]:
  """Tree of logical PartitionSpecs; blocks lead with ('stage','repeat','layers') when `lay`
  is given (the training layout), else with ('stage',): the canonical [NB, ...] layout, its block
  axis split over pp in contiguous chunks (the training layout's placement when repeats=1).
  Dense blocks [dense_blocks, ...] and MTP depths [mtp_depth, ...] lead with ('layers',) in both
  (replicated over pp)."""
  lead = {'blocks': STAGE_AXES if lay is not None else ('stage',),
          'dense_blocks': ('layers',), 'mtp': ('layers',)}
  out = {}
  for part, boxed in template(cfg).items():
    name = _PLACES[part][0]
    out[name] = jax.tree.map(lambda s, axes=lead.get(name, ()): P(*axes, *s),
                             nn.get_partition_spec(boxed), is_leaf=lambda s: isinstance(s, P))
  return out


def unboxed(tree: Any) -> Any:
  """The values of a boxed tree, with no sharding constraint (whatever mesh is current)."""
  plain = lambda b: b.unbox(apply_constraint=False) if isinstance(b, nn.Partitioned) else b
  return jax.tree.map(plain, tree, is_leaf=lambda b: isinstance(b, nn.Partitioned))


def abstract_canonical(cfg: ModelConfig) -> dict[str, Any]:
  """The canonical params as ShapeDtypeStructs (what init_canonical returns; nothing computed)."""
  out = {}
  for part, boxed in template(cfg).items():
    name, count, _ = _PLACES[part]
    lead = (getattr(cfg, count),) if count else ()
    out[name] = jax.tree.map(lambda a, lead=lead: jax.ShapeDtypeStruct(lead + a.shape, a.dtype),
                             unboxed(boxed))
  return out


def abstract(cfg: ModelConfig, lay: Layout) -> dict[str, Any]:
  """The params in the training layout as ShapeDtypeStructs (what init returns)."""
  return jax.eval_shape(lambda p: tree_to_stages(p, lay), abstract_canonical(cfg))


def canonical_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Each parameter's canonical shape (blocks [NB, ...]), by its path of names."""
  return {tuple(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_canonical(cfg))}


def declared(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[tuple, tuple[int, ...]]]:
  """Each parameter's canonical (logical axes, shape), by its path of names."""
  shapes = canonical_shapes(cfg)
  axes = jax.tree_util.tree_leaves_with_path(param_axes(cfg), is_leaf=lambda s: isinstance(s, P))
  return {(path := tuple(k.key for k in p)): (tuple(s), shapes[path]) for p, s in axes}


def init_canonical(cfg: ModelConfig, key: jax.Array) -> dict[str, Any]:
  """Params with blocks stacked [NB, ...] in block order; a function of `key` and cfg only."""
  one = lambda part: lambda k: nn.unbox(_boxed(cfg, k, part))
  out = {}
  for part in parts(cfg):
    name, count, keys = _PLACES[part]
    out[name] = jax.vmap(one(part))(keys(key, getattr(cfg, count))) if count else one(part)(key)
  return out


def init(cfg: ModelConfig, lay: Layout, key: jax.Array) -> dict[str, Any]:
  """Params in the training layout (blocks [S, R, L, ...]); identical on every mesh."""
  params = init_canonical(cfg, key)
  params['blocks'] = to_stages(params['blocks'], lay.pp, lay.repeats)
  return params


def map_blocks(fn, tree: Any) -> Any:
  """Applies fn to every leaf under a 'blocks' key (params, gradients, optimizer moments)."""
  return jax.tree_util.tree_map_with_path(lambda path, a: fn(a) if _BLOCKS in path else a, tree)


def tree_to_stages(tree: Any, lay: Layout) -> Any:
  """Any tree holding canonical 'blocks' -> the same tree in the training layout."""
  return map_blocks(lambda a: to_stages(a, lay.pp, lay.repeats), tree)


def tree_from_stages(tree: Any) -> Any:
  """Any tree holding stage-stacked 'blocks' -> the same tree in the canonical layout."""
  return map_blocks(from_stages, tree)
