"""Draws a run's curves from <workdir>/metrics.jsonl to PNG files.

  python -m moejax.cli.plot --workdir=/tmp/run [--out=/tmp/run/plots]
  python -m moejax.cli.plot --compare=/tmp/a,/tmp/b --labels=moe,dense --out=/tmp/plots

loss.png: training loss (and validation loss when evaluated) against step.
expert_load.png: share of routed tokens per layer x expert at the last logged step (a perfectly
balanced layer is one colour at 1/E).
dropped.png: share of token assignments dropped at capacity, per MoE layer, against step.
compare.png (--compare): several runs side by side: validation loss, dropped share and balance
of the training steps, against step.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

flags.DEFINE_string('workdir', None, 'Run directory (holds metrics.jsonl).')
flags.DEFINE_list('compare', [], 'Run directories to draw side by side in compare.png.')
flags.DEFINE_list('labels', [], 'With --compare: a label per run (default: the directory names).')
flags.DEFINE_string('out', None, 'Output directory (default: WORKDIR/plots, or the first '
                    'compared run\'s).')


def read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: is {workdir!r} a moejax run directory?')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot(workdir: str, out: str | None = None) -> list[str]:
  """Writes loss.png, expert_load.png and (when logged) dropped.png; returns their paths."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  records = read_records(workdir)
  train = [r for r in records if 'loss' in r]
  evals = [r for r in records if 'eval_loss' in r]
  if not train:
    raise ValueError(f'{workdir}/metrics.jsonl has no training records yet.')
  out = out or os.path.join(workdir, 'plots')
  os.makedirs(out, exist_ok=True)

  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r['step'] for r in train], [r['loss'] for r in train], label='train loss')
  if evals:
    ax.plot([r['step'] for r in evals], [r['eval_loss'] for r in evals], 'o-',
            label='validation loss')
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.grid(alpha=0.3)
  ax.legend()
  loss_png = os.path.join(out, 'loss.png')
  fig.tight_layout()
  fig.savefig(loss_png, dpi=120)
  plt.close(fig)

  last = train[-1]
  share = np.asarray(last['expert_share'])                 # [layers, experts]
  fig, ax = plt.subplots(figsize=(max(5, share.shape[1] * 0.25 + 2), share.shape[0] * 0.4 + 1.5))
  im = ax.imshow(share, aspect='auto', cmap='viridis')
  ax.set_xlabel('expert')
  ax.set_ylabel('layer')
  ax.set_title(f"share of each layer's kept tokens per expert, step {last['step']} "
               f'(balanced = {1 / share.shape[1]:.3f})')
  fig.colorbar(im, ax=ax, label='share of the layer\'s kept tokens')
  load_png = os.path.join(out, 'expert_load.png')
  fig.tight_layout()
  fig.savefig(load_png, dpi=120)
  plt.close(fig)
  paths = [loss_png, load_png]
  per_layer = [r for r in train if 'dropped_frac_per_layer' in r]
  if per_layer:
    dropped = np.asarray([r['dropped_frac_per_layer'] for r in per_layer]) * 100   # [N, NB]
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in range(dropped.shape[1]):
      ax.plot([r['step'] for r in per_layer], dropped[:, layer], label=f'layer {layer}')
    ax.set_xlabel('step')
    ax.set_ylabel('dropped assignments (%)')
    ax.set_title('token assignments over capacity, per MoE layer')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small', ncol=2)
    paths.append(os.path.join(out, 'dropped.png'))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths


def compare(workdirs: list[str], labels: list[str] | None = None,
            out: str | None = None) -> str:
  """Writes compare.png: validation loss, dropped share and balance of several runs against
  step; returns its path."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  labels = labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(f'--labels has {len(labels)} names for {len(workdirs)} runs.')
  runs = [read_records(w) for w in workdirs]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  panels = [('eval_loss', 'validation loss (nats/token)', 1.0),
            ('dropped_frac', 'dropped assignments, training steps (%)', 100.0),
            ('balance', 'balance (mean/max tokens per expert)', 1.0)]
  for ax, (key, title, scale) in zip(axes, panels):
    for label, records in zip(labels, runs):
      rows = [r for r in records if key in r]
      ax.plot([r['step'] for r in rows], [r[key] * scale for r in rows],
              'o-' if key.startswith('eval') else '-', markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0].legend()
  out = out or os.path.join(workdirs[0], 'plots')
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, 'compare.png')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv):
  del argv
  from moejax.cli import console
  console.quiet_logs()
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.compare):
    sys.exit('error: give --workdir=DIR (one run) or --compare=DIR,DIR,... (runs side by side).')
  try:
    paths = ([compare(f.compare, f.labels, f.out)] if f.compare
             else plot(f.workdir, f.out))
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print('wrote ' + ', '.join(paths), flush=True)


def run() -> None:
  """Console-script entry point."""
  from moejax.cli import console
  console.run(main, __name__)


if __name__ == '__main__':
  run()
