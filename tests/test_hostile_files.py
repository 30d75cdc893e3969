"""Hostile checkpoint files: each is one ConfigError naming the file, raised from the header
before any tensor is read; PyTorch pickles are never opened."""
import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from moejax.convert.safetensors_io import Reader
from moejax.errors import ConfigError


def _write(path, header: dict, data: bytes) -> None:
  text = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text + data)


def good(directory) -> str:
  path = os.path.join(directory, 'model.safetensors')
  save_file({'w': np.ones((4, 8), np.float32)}, path)
  return path


def test_a_good_file_reads(tmp_path):
  good(tmp_path)
  assert Reader(str(tmp_path)).get('w').shape == (4, 8)


@pytest.mark.parametrize('header,data,says', [
    ({'w': {'dtype': 'F32', 'shape': [4, 8], 'data_offsets': [0, 256]}}, b'\0' * 64, 'claims bytes'),
    ({'w': {'dtype': 'F32', 'shape': [4, 9], 'data_offsets': [0, 128]}}, b'\0' * 128, 'claims bytes'),
    ({'w': {'dtype': 'F32', 'shape': [4, 8], 'data_offsets': [-8, 120]}}, b'\0' * 128, 'claims bytes'),
    ({'w': {'dtype': 'Q4', 'shape': [4, 8], 'data_offsets': [0, 128]}}, b'\0' * 128, 'dtype'),
    ({'w': {'dtype': 'F32', 'shape': '4x8', 'data_offsets': [0, 128]}}, b'\0' * 128, 'shape'),
    ({'w': [1, 2]}, b'', 'dtype'),
])
def test_a_lying_header_is_one_error_naming_the_file(tmp_path, header, data, says):
  path = tmp_path / 'model.safetensors'
  _write(path, header, data)
  with pytest.raises(ConfigError, match=says) as e:
    Reader(str(tmp_path))
  assert str(path) in str(e.value)


@pytest.mark.parametrize('content,says', [
    (b'', 'shorter than'),
    (struct.pack('<Q', 10**12) + b'{}', 'claims'),
    (struct.pack('<Q', 4) + b'nope', 'not JSON'),
    (struct.pack('<Q', 2) + b'[]', 'not a JSON object'),
])
def test_a_truncated_or_garbage_file_is_one_error(tmp_path, content, says):
  path = tmp_path / 'model.safetensors'
  path.write_bytes(content)
  with pytest.raises(ConfigError, match=says):
    Reader(str(tmp_path))


def test_a_truncated_good_file_is_refused_before_reading(tmp_path):
  path = good(tmp_path)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 16)
  with pytest.raises(ConfigError, match='claims bytes'):
    Reader(str(tmp_path))


def test_pytorch_pickles_are_never_opened(tmp_path):
  (tmp_path / 'pytorch_model.bin').write_bytes(b'\x80\x04 not to be unpickled')
  with pytest.raises(ConfigError, match='never unpickles'):
    Reader(str(tmp_path))
