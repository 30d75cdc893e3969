"""A run's plan: everything derived from a validated config, once.

The typed views of the config, the mesh and its logical-axis rules, the shardings (train state,
params, token batches, and the canonical layout checkpoints use), the abstract train state, the
optimizer; and the jitted train / eval steps built from them. The loop, the benchmark, the CLI
tools and the tests all start from a Plan; it is the only place that makes a mesh and its rules
current (`active`), and everything traced under it sees them.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import config as config_lib, validation
from moejax.model import params as params_lib
from moejax.parallel import mesh as mesh_lib
from moejax.train import optimizer, state as state_lib, step as step_lib


class Plan:
  """One config laid out on devices (default: all of jax.devices()).

  Typed views: model (ModelConfig), layout (Layout), data, optim, run; `config` is the
  ConfigDict as given (written into checkpoints, compared at resume).
  """

  def __init__(self, config: ml_collections.ConfigDict,
               devices: Sequence[jax.Device] | None = None, *, validated: bool = False):
    """validated: the caller has run validation.validate(config) (the loop does, before it
    takes the run directory), so it is not run twice."""
    devices = list(jax.devices() if devices is None else devices)
    if not validated:
      validation.validate(config, len(devices))
    self.config = config
    self.model = config_lib.model_config(config)
    self.layout = config_lib.layout(config)
    self.data = config_lib.data_config(config)
    self.optim = config_lib.optim_config(config)
    self.run = config_lib.run_config(config)
    lay = self.layout
    self.mesh = mesh_lib.make_mesh(lay.mesh, devices)
    self.rules = mesh_lib.rules_for(lay, self.model.kv_heads, self.model.shared_d_ff,
                                    self.model.dense_d_ff)
    self.tx, self.schedule = _optimizer(self.optim, self.model, lay)
    with self.active():
      self.state_sharding = state_lib.shardings(self.model, lay, self.tx, self.mesh)
      self.abstract_state = state_lib.abstract(self.model, lay, self.tx, self.state_sharding)
      self.canonical_sharding = state_lib.canonical_shardings(
          self.model, lay, self.tx, self.mesh, self.abstract_state)
      self.batch_sharding = step_lib.batch_sharding(self.mesh)
    self.canonical_abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(params_lib.tree_from_stages, self.abstract_state), self.canonical_sharding)

  @property
  def param_sharding(self) -> Any:
    return self.state_sharding.params

  @contextlib.contextmanager
  def active(self) -> Iterator[jax.sharding.Mesh]:
    """The mesh and logical rules current, for tracing and calling model code."""
    with mesh_lib.activate(self.mesh, self.rules):
      yield self.mesh

  # What the constructor derives: a plan made from parts (`_with`) names each of them, and
  # nothing else (the jitted steps and cached properties are rebuilt on first use).
  PARTS = ('config', 'model', 'layout', 'data', 'optim', 'run', 'mesh', 'rules', 'tx',
           'schedule', 'state_sharding', 'abstract_state', 'canonical_sharding',
           'batch_sharding', 'canonical_abstract')

  def _with(self, **parts) -> Plan:
    """This plan with some of its PARTS replaced (the others shared)."""
    unknown = set(parts) - set(Plan.PARTS)
    if unknown:
      raise TypeError(f'not parts of a Plan: {sorted(unknown)}')
    other = Plan.__new__(Plan)
    for name in Plan.PARTS:
      setattr(other, name, parts[name] if name in parts else getattr(self, name))
    return other

  def on(self, devices: Sequence[jax.Device]) -> Plan:
    """The same plan on other devices of the same count (e.g. abstract GPUs for ahead-of-time
    compilation): every sharding keeps its spec on the new mesh; nothing is re-derived."""
    lay = self.layout
    mesh = mesh_lib.make_mesh(lay.mesh, devices)
    move = lambda s: NamedSharding(mesh, s.spec)
    move_abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=move(a.sharding))
    return self._with(
        mesh=mesh, state_sharding=jax.tree.map(move, self.state_sharding),
        canonical_sharding=jax.tree.map(move, self.canonical_sharding),
        batch_sharding=move(self.batch_sharding),
        abstract_state=jax.tree.map(move_abstract, self.abstract_state),
        canonical_abstract=jax.tree.map(move_abstract, self.canonical_abstract))

  def buckets(self) -> list[Plan]:
    """One plan per sequence-length bucket (data.buckets; just this one without): the same
    mesh and shardings (parameters do not depend on the row length), each bucket's layout."""
    if not self.data.buckets:
      return [self]
    return [self._with(layout=lay) for lay in config_lib.bucket_layouts(self.config)]

  def jit(self, fn: Callable, **jit_kwargs) -> Active:
    """jax.jit(fn) that traces, lowers and runs with this plan active."""
    return Active(jax.jit(fn, **jit_kwargs), self)

  def batch_abstract(self) -> jax.ShapeDtypeStruct:
    """A token batch [M, B, T+1] (packed: [M, B, 3, T+1]) as an abstract, sharded array."""
    lay = self.layout
    rows = (3,) if self.data.pack else ()           # packed rows: tokens, segments, positions
    return jax.ShapeDtypeStruct((lay.num_micro_batches, lay.micro_batch_size) + rows +
                                (lay.seq_len + 1,), np.int32, sharding=self.batch_sharding)

  def train_step(self) -> Active:
    """jit(train_step)(state, tokens [M, B, T+1]) -> (state, metrics); state is donated."""
    fn = step_lib.train_step_fn(self.model, self.layout, self.tx, self.schedule, self.run.seed)
    return self.jit(fn, in_shardings=(self.state_sharding, self.batch_sharding),
                    out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

  def eval_step(self) -> Active:
    """jit(eval_step)(params, tokens) -> metrics, with the eval capacity factor and no dropout."""
    return self.jit(step_lib.eval_step_fn(self.model, self.layout),
                    in_shardings=(self.param_sharding, self.batch_sharding),
                    out_shardings=self.replicated)

  @functools.cached_property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def create_state(self, seed: int | None = None) -> state_lib.TrainState:
    """A fresh train state from `seed` (default: the config's), made shard by shard."""
    seed = self.run.seed if seed is None else seed
    init = state_lib.init_fn(self.model, self.layout, self.tx)
    return self.jit(init, out_shardings=self.state_sharding)(jax.random.key(seed))

  def init_params(self, seed: int | None = None) -> Any:
    """Fresh params (training layout) from `seed` (default: the config's)."""
    seed = self.run.seed if seed is None else seed
    init = lambda k: params_lib.init(self.model, self.layout, k)
    return self.jit(init, out_shardings=self.param_sharding)(jax.random.key(seed))

  @functools.cached_property
  def to_canonical(self) -> Active:
    """Train state (or any tree with stage-stacked 'blocks') -> the checkpoint layout."""
    return self.jit(params_lib.tree_from_stages, out_shardings=self.canonical_sharding)

  @functools.cached_property
  def params_to_training(self) -> Active:
    """Params in the checkpoint layout -> the training layout."""
    return self.jit(lambda p: params_lib.tree_to_stages(p, self.layout),
                    out_shardings=self.param_sharding)

  @functools.cached_property
  def to_training(self) -> Active:
    """A train state in the checkpoint layout -> the training layout."""
    return self.jit(lambda s: params_lib.tree_to_stages(s, self.layout),
                    out_shardings=self.state_sharding)

  @functools.cached_property
  def all_finite(self) -> Active:
    """Whether every element of a tree is finite (one scalar; run at save time only)."""
    return self.jit(_all_finite)


def _all_finite(tree: Any) -> jax.Array:
  """One boolean scalar: every element of every leaf finite (a module-level function, so equal
  plans share its trace and program)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


@functools.lru_cache(maxsize=16)
def _optimizer(optim: config_lib.OptimConfig, cfg: config_lib.ModelConfig,
               lay: config_lib.Layout) -> tuple[Any, Any]:
  """(optimizer, learning-rate schedule), one pair per distinct (optim, model, layout): equal
  plans share them, and through them their step functions (moejax.train.step caches those)."""
  return optimizer.make(optim, params_lib.decayed(cfg, lay)), optimizer.schedule(optim)


@contextlib.contextmanager
def bare(mesh: jax.sharding.Mesh) -> Iterator[jax.sharding.Mesh]:
  """A mesh with the default rules (experts over tp) current, for running one layer outside a
  run (tests, tools); a run uses its Plan."""
  with mesh_lib.activate(mesh, mesh_lib.RULES):
    yield mesh


class Active:
  """A jitted function that is traced, lowered and called with its plan active."""

  def __init__(self, jitted, plan: Plan):
    self.jitted, self.plan = jitted, plan

  def __call__(self, *args):
    with self.plan.active():
      return self.jitted(*args)

  def lower(self, *args):
    with self.plan.active():
      return self.jitted.lower(*args)
