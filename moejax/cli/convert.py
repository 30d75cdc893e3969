"""Hugging Face checkpoints of the open MoE families (OLMoE, Qwen3-MoE, Mixtral) in and out.

  python -m moejax.cli.convert import --hf_dir=HF_DIR --workdir=RUN
  python main.py --config=configs/olmoe.py:HF_DIR --config.init_from=RUN --workdir=FT ...
  python -m moejax.cli.convert export --workdir=FT [--step=N] --hf_dir=OUT [--dtype=bfloat16]
      [--max_shard_size=5GB] [--tokenizer=DIR]

import: a params-only checkpoint (RUN/checkpoints/0) that a run trains from with a fresh
optimizer; the family is read from HF_DIR/config.json. export: safetensors shards, their index
and config.json that transformers.AutoModelForCausalLM.from_pretrained(OUT) loads, from a
checkpoint of any mesh.
"""
from __future__ import annotations

import os
import resource
import sys
import time

from absl import flags

flags.DEFINE_string('hf_dir', None, 'import: the Hugging Face checkpoint directory (config.json, '
                    '*.safetensors); export: the directory to write.')
flags.DEFINE_string('workdir', None, 'import: the new run directory to write; export: the run '
                    'directory to read (with checkpoints/).')
flags.DEFINE_integer('step', -1, 'export: checkpoint step (-1: newest).')
flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32', 'float16'],
                  'export: dtype of the written tensors.')
flags.DEFINE_string('max_shard_size', '5GB', 'export: largest safetensors shard (e.g. 5GB, 500MB).')
flags.DEFINE_string('tokenizer', '', 'export: a directory whose tokenizer.json (and '
                    'tokenizer_config.json, special_tokens_map.json) to copy beside the weights.')
flags.mark_flags_as_required(['hf_dir', 'workdir'])

USAGE = 'usage: python -m moejax.cli.convert {import|export} --hf_dir=DIR --workdir=RUN [flags]'


def _peak_gib() -> float:
  """This process's peak resident memory: the kernel's high-water mark of its own address space
  (VmHWM; getrusage's ru_maxrss also counts the parent's before exec), else ru_maxrss."""
  try:
    with open('/proc/self/status') as f:
      return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 2**20
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv):
  if len(argv) != 2 or argv[1] not in ('import', 'export'):
    sys.exit(f'error: say what to do. {USAGE}')
  from moejax.cli import console
  console.quiet_logs()
  from moejax.convert import hf
  from moejax.convert.safetensors_io import parse_size
  from moejax.errors import MoejaxError
  f = flags.FLAGS
  start = time.time()
  try:
    if argv[1] == 'import':
      path = hf.import_checkpoint(f.hf_dir, f.workdir)
      family = hf.families.family_of(hf.families.read_hf_config(f.hf_dir)).name
      for note in hf.import_notes(f.hf_dir):
        print(note, flush=True)
      print(f'Imported {f.hf_dir} into {path} in {time.time() - start:.1f} s (peak '
            f'host memory {_peak_gib():.2f} GiB). Train from it with '
            f'--config=configs/{family}.py:{f.hf_dir} '
            f'--config.init_from={os.path.abspath(f.workdir)}.', flush=True)
    else:
      files = hf.export_checkpoint(f.workdir, f.hf_dir, f.step, f.dtype,
                                   parse_size(f.max_shard_size), f.tokenizer)
      print(f'Exported {f.workdir} to {f.hf_dir} ({len(files)} files: {", ".join(files[:4])}'
            f'{" ..." if len(files) > 4 else ""}) in {time.time() - start:.1f} s (peak host '
            f'memory {_peak_gib():.2f} GiB).', flush=True)
      fmt = hf.exported_family(f.workdir, f.step).published_format
      if fmt:
        print(f'The experts are written unquantized ({f.dtype}), not in the {fmt} of the '
              f'published checkpoints; transformers and vLLM load either.', flush=True)
  except MoejaxError as e:
    sys.exit(f'error: {e}')


def run() -> None:
  """Console-script entry point."""
  from moejax.cli import console
  console.run(main, __name__)


if __name__ == '__main__':
  run()
