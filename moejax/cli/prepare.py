"""Text files -> a token dataset (train.bin, val.bin, meta.json) for data.source='tokens'.

  python -m moejax.cli.prepare --input=book.txt --out=/tmp/data                   # byte-level
  python -m moejax.cli.prepare --input=a.txt,b.txt --tokenizer=gpt2/tokenizer.json --out=DIR

Each input file is one document, or several with --doc_separator (e.g. a blank line: '\n\n');
every document is followed by <eos>, and `<split>_docs.npy` records where each starts (for
data.pack). A file of one document gives the last `val_fraction` of its tokens to validation;
a file of several gives every k-th whole document (k = 1 / val_fraction).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import flags

flags.DEFINE_list('input', None, 'Text files (UTF-8), comma-separated.')
flags.DEFINE_string('out', None, 'Output directory.')
flags.DEFINE_string('tokenizer', 'byte', '"byte" or a tokenizer.json file (e.g. GPT-2 BPE).')
flags.DEFINE_float('val_fraction', 0.05, 'Share of each file held out for validation.')
flags.DEFINE_string('doc_separator', '', 'Split each file into documents at this string '
                    '(escapes such as \\n are read); default: one document per file.')
flags.mark_flags_as_required(['input', 'out'])


def _documents(text: str, separator: str) -> list[str]:
  docs = text.split(separator) if separator else [text]
  return [d for d in docs if d.strip()]


def _split(docs: list[list[int]], val_fraction: float) -> dict[str, list[list[int]]]:
  """Train and validation documents of one file."""
  if len(docs) == 1:
    ids = docs[0]
    cut = len(ids) - max(1, int(len(ids) * val_fraction))
    return {'train': [ids[:cut]], 'val': [ids[cut:]]}
  every = max(2, round(1 / val_fraction))
  return {'train': [d for i, d in enumerate(docs) if i % every != every - 1],
          'val': [d for i, d in enumerate(docs) if i % every == every - 1]}


def prepare(inputs: list[str], out: str, tokenizer_spec: str = 'byte',
            val_fraction: float = 0.05, doc_separator: str = '') -> dict:
  """Tokenizes `inputs` into `out`; returns the metadata written."""
  from moejax.errors import ConfigError
  from moejax.data import tokenizer as tokenizer_lib
  if not 0.0 < val_fraction < 1.0:
    raise ConfigError(f'--val_fraction={val_fraction} must be between 0 and 1.')
  tok = tokenizer_lib.load(tokenizer_spec)
  dtype = tokenizer_lib.dtype_for(tok.vocab_size)
  eos = [tok.eos_id] if tok.eos_id is not None else []
  splits: dict[str, list[list[int]]] = {'train': [], 'val': []}
  for path in inputs:
    if not os.path.isfile(path):
      raise ConfigError(f'Input file {path!r} does not exist.')
    with open(path, encoding='utf-8', errors='replace') as f:
      text = f.read()
    if not text.strip():
      raise ConfigError(f'Input file {path!r} is empty.')
    docs = [tok.encode(d) + eos for d in _documents(text, doc_separator)]
    for split, parts in _split(docs, val_fraction).items():
      splits[split].extend(parts)
  os.makedirs(out, exist_ok=True)
  meta = {'tokenizer': tok.name, 'tokenizer_sha256': getattr(tok, 'sha256', ''),
          'vocab_size': tok.vocab_size, 'eos_id': tok.eos_id, 'dtype': dtype.name,
          'inputs': [os.path.abspath(p) for p in inputs]}
  max_id = 0
  for split, docs in splits.items():
    data = np.concatenate([np.asarray(d, dtype=dtype) for d in docs])
    data.tofile(os.path.join(out, f'{split}.bin'))
    np.save(os.path.join(out, f'{split}_docs.npy'),
            np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))
    meta[f'{split}_tokens'] = int(len(data))
    meta[f'{split}_documents'] = len(docs)
    max_id = max(max_id, int(data.max()))
  meta['max_id'] = max_id
  with open(os.path.join(out, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=1)
  return meta


def main(argv):
  del argv
  from moejax.cli import console
  console.quiet_logs()
  from moejax.errors import MoejaxError
  f = flags.FLAGS
  try:
    separator = f.doc_separator.encode().decode('unicode_escape')
    meta = prepare(f.input, f.out, f.tokenizer, f.val_fraction, separator)
  except MoejaxError as e:
    sys.exit(f'error: {e}')
  print(f"wrote {f.out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} validation "
        f"tokens in {meta['train_documents']:,} / {meta['val_documents']:,} documents "
        f"({meta['dtype']}), tokenizer {meta['tokenizer']} with vocab {meta['vocab_size']}"
        f"; train with --config.data.source=tokens --config.data.path={f.out} "
        f"--config.model.vocab_size={meta['vocab_size']}", flush=True)


def run() -> None:
  """Console-script entry point."""
  from moejax.cli import console
  console.run(main, __name__)


if __name__ == '__main__':
  run()
