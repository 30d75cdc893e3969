"""One plan per run: shardings derived once, the mesh and rules made current only by the plan,
and logical axes never placed by default rules behind a caller's back."""
import os
import re

import jax
import pytest

from moejax.errors import MoejaxError
from moejax.parallel import mesh as mesh_lib
from moejax.train import loop, state as state_lib
from moejax.train.plan import Plan
from tests.helpers import small_config

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'moejax')


def test_a_run_derives_its_shardings_once(tmp_path, monkeypatch):
  """Train, evaluate, save and resume: the state shardings are computed by the plan alone."""
  calls = []
  original = state_lib.shardings
  monkeypatch.setattr(state_lib, 'shardings', lambda *a: calls.append(1) or original(*a))
  config = small_config(2, 2, **{'data.num_micro_batches': 2})
  config.update(dict(num_steps=2, checkpoint_every=1, eval_every=1, eval_batches=1))
  loop.train(config, str(tmp_path))
  assert len(calls) == 1
  config.num_steps = 3
  loop.train(config, str(tmp_path))          # resumes from step 2
  assert len(calls) == 2


def test_placing_logical_axes_without_a_plan_is_an_error():
  with pytest.raises(MoejaxError, match='no plan active'):
    mesh_lib.spec(('experts', 'embed', 'mlp'))
  plan = Plan(small_config(2, 1, dp=2, **{'mesh.experts_over_dp': True,
                                          'data.micro_batch_size': 2}))
  with plan.active():                        # the run's rules: experts folded over dp x tp
    assert mesh_lib.spec(('experts',)) == jax.sharding.PartitionSpec(('dp', 'tp'))


def test_only_the_plan_makes_a_mesh_current():
  for directory, _, files in os.walk(ROOT):
    for name in files:
      path = os.path.join(directory, name)
      if not name.endswith('.py') or path.endswith(os.path.join('train', 'plan.py')):
        continue
      text = open(path).read()
      calls = [m for m in re.finditer(r'\b(activate|set_mesh)\(', text)
               if not text[max(0, m.start() - 4):m.start()].endswith('def ')
               and not (m.group(1) == 'set_mesh' and path.endswith('mesh.py'))]   # activate's body
      assert not calls, f'{path} makes a mesh current: use moejax.train.plan.Plan'


def test_plans_made_from_parts_name_every_part():
  """Plan.on / Plan.buckets build plans from Plan.PARTS: the constructor derives exactly those,
  so a new derived part cannot be left behind (or carried over stale) by them."""
  from moejax.train.plan import Plan
  from tests.helpers import small_config
  plan = Plan(small_config(1, 1, **{'data.buckets': '16,32'}))
  assert set(vars(plan)) == set(Plan.PARTS)
  short, full = plan.buckets()
  assert (short.layout.seq_len, full.layout.seq_len) == (16, 32)
  assert short.mesh is plan.mesh and short.state_sharding is plan.state_sharding
  assert set(vars(short)) == set(Plan.PARTS)


def test_plans_of_equal_configs_compile_their_train_step_once():
  """A second plan of an equal config (a resume in the same process) shares the first one's
  optimizer and step function, so JAX reuses the step's traced program and its executable (no
  second XLA compile, not even a persistent-cache read); another config compiles its own."""
  compiled = []                      # XLA compiles (or persistent-cache reads) of the train step
  def listen(event, duration, **kwargs):
    if (event == '/jax/core/compile/backend_compile_duration'
        and kwargs.get('fun_name') == 'jit(train_step)'):
      compiled.append(1)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    def compile_step(**overrides):   # an optimizer setting no other test uses: a fresh program
      plan = Plan(small_config(2, 2, **{'data.num_micro_batches': 2, 'optim.b2': 0.987},
                               **overrides))
      plan.train_step().lower(plan.abstract_state, plan.batch_abstract()).compile()
      return plan
    first, again = compile_step(), compile_step()
    assert first.tx is again.tx and len(compiled) == 1
    compile_step(**{'optim.lr': 1e-4})
    assert len(compiled) == 2
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
