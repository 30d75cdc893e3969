"""The save guard: only sound steps are saved, and each save is confirmed by the next step.

A step is sound when its loss and gradient norm are finite, its loss is below LOSS_BOUND x
ln(vocab) and its updated params are finite (checked at save time only, never in the step).
"""
from __future__ import annotations

import math

import jax

from moejax.errors import CheckpointError, DivergedError
from moejax.train.checkpoint import Checkpointer

LOSS_BOUND = 10.0   # x ln(vocab): a loss above it is garbage data or a diverged run


class Guard:
  """Saves only sound steps and confirms each save with the next step's loss.

  A step is sound when its loss and gradient norm are finite, its loss is below `bound` and the
  updated params are finite. The saved params are confirmed by the loss the next step computes
  from them; if that is unsound, the save is renamed aside (`<step>.diverged-<time>`), so the
  newest complete checkpoint is always one whose params gave a sound loss.
  """

  def __init__(self, ckpt: Checkpointer, all_finite, bound: float):
    self.ckpt, self.bound = ckpt, bound
    self.unconfirmed: int | None = None
    self._finite = all_finite   # run at save time only, never in the step

  def _sound(self, loss: float, grad_norm: float, params_finite: bool = True) -> bool:
    return (math.isfinite(loss) and math.isfinite(grad_norm) and loss < self.bound and
            params_finite)

  def check(self, metrics, step: int, params_finite: bool = True) -> None:
    """Raises DivergedError for an unsound step (after setting aside an unconfirmed save)."""
    loss, grad_norm = float(metrics['loss']), float(metrics['grad_norm'])
    if self._sound(loss, grad_norm, params_finite):
      if self.unconfirmed is not None and step > self.unconfirmed:
        self.unconfirmed = None
      return
    aside = ''
    try:
      self.ckpt.wait()
      if self.unconfirmed is not None and self.unconfirmed in self.ckpt.all_steps():
        aside = (f' Its input, checkpoint {self.unconfirmed}, was renamed to '
                 f'{self.ckpt.set_aside(self.unconfirmed, "diverged")}.')
      good = self.ckpt.latest_step()
    except CheckpointError:
      good = None
    where = (f'the newest checkpoint, {self.ckpt.directory}/{good}, gave sound losses; the run '
             f'resumes from it' if good is not None else 'no sound checkpoint is left')
    raise DivergedError(
        f'Step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}'
        f'{"" if params_finite else ", non-finite parameters"} (a sound step has a finite loss '
        f'below {self.bound:.1f} = {LOSS_BOUND:g} x ln(vocab)). Stopped without saving it.'
        f'{aside} {where[0].upper() + where[1:]}. Try a lower optim.lr, a longer '
        f'optim.warmup_steps or optim.grad_clip, or check the data.')

  def confirm(self, metrics, step: int) -> None:
    """After the step that follows a save: its loss vouches for the saved params."""
    if self.unconfirmed is not None and step == self.unconfirmed + 1:
      self.check(jax.device_get({'loss': metrics['loss'], 'grad_norm': metrics['grad_norm']}),
                 step)

  def save(self, state, metrics, step: int, force: bool = False) -> None:
    finite = self._finite(state.params)
    host = jax.device_get({'loss': metrics['loss'], 'grad_norm': metrics['grad_norm'],
                           'finite': finite})
    self.check(host, step, bool(host['finite']))
    self.ckpt.save(state, force=force)
    self.unconfirmed = step
