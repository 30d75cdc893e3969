"""Tokenizers: a built-in byte-level one, and BPE (e.g. GPT-2's) from a local tokenizer.json.

Nothing is downloaded: a BPE tokenizer is read from a file the user supplies (the HuggingFace
`tokenizers` format; GPT-2's is `tokenizer.json` of the `gpt2` model repository).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from moejax.errors import ConfigError


class ByteTokenizer:
  """UTF-8 bytes 0..255, plus <eos> = 256 between documents: vocab 257."""
  name = 'byte'
  eos_id = 256
  vocab_size = 257

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode('utf-8', errors='replace')


class FileTokenizer:
  """A `tokenizers` tokenizer.json (byte-level BPE such as GPT-2's); <eos> is its end token."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise ConfigError(f'Tokenizer file {path!r} does not exist; pass a tokenizer.json (for '
                        f'GPT-2: the file of that name from the gpt2 model repository) or "byte".')
    from tokenizers import Tokenizer
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception for malformed files
      raise ConfigError(f'Cannot read tokenizer file {path!r}: {e}') from e
    self.name = os.path.abspath(path)
    with open(path, 'rb') as f:
      self.sha256 = hashlib.sha256(f.read()).hexdigest()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    eos = next((t for t in ('<|endoftext|>', '</s>', '<eos>', '[SEP]') if t in vocab), None)
    self.eos_id = vocab[eos] if eos is not None else None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def load(spec: str):
  """'byte' or a path to a tokenizer.json."""
  return ByteTokenizer() if spec in ('', 'byte') else FileTokenizer(spec)


def dtype_for(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def for_model(config, spec: str = ''):
  """The tokenizer to talk to a model: `spec`, else its dataset's, else byte-level."""
  from moejax.data import tokens
  if not spec:
    spec = 'byte'
    if config.data.source == 'tokens' and os.path.isdir(config.data.path):
      spec = tokens.read_meta(config.data.path)['tokenizer']
  tok = load(spec)
  if tok.vocab_size > config.model.vocab_size:
    raise ConfigError(f'The tokenizer {tok.name!r} has {tok.vocab_size} ids but the model only '
                      f'{config.model.vocab_size}: use the tokenizer the model was trained with.')
  return tok
