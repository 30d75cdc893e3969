"""Token datasets: tokenizers, memory-mapped windows, exact resume, and clear errors."""
import json
import os

import numpy as np
import pytest

from configs import text as text_config
from moejax import validation
from moejax.cli.prepare import prepare
from moejax.errors import ConfigError
from moejax.data import tokenizer as tokenizer_lib
from moejax.data.tokens import TokenSource
from moejax.train import loop

pytestmark = pytest.mark.e2e

TEXT = ('It was the best of times, it was the worst of times, it was the age of wisdom, it was '
        'the age of foolishness. ') * 60


@pytest.fixture
def dataset(tmp_path):
  (tmp_path / 'a.txt').write_text(TEXT)
  prepare([str(tmp_path / 'a.txt')], str(tmp_path / 'data'), val_fraction=0.1)
  return str(tmp_path / 'data')


def small_text_config(path, **kw):
  c = text_config.get_config(path)
  c.data.update(seq_len=32, micro_batch_size=2, num_micro_batches=2)
  c.model.max_len = 32
  c.moe.group_size = 64               # a whole micro-batch, like text.py's groups
  c.update(kw)
  return c


def test_byte_dataset_round_trips(dataset):
  meta = json.load(open(os.path.join(dataset, 'meta.json')))
  assert meta['dtype'] == 'uint16' and meta['vocab_size'] == 257 and meta['max_id'] == 256
  ids = np.fromfile(os.path.join(dataset, 'train.bin'), np.uint16)
  assert tokenizer_lib.ByteTokenizer().decode(ids) == TEXT[:len(ids)]
  source = TokenSource(dataset, 2, 2, 32, seed=0, vocab_size=257)
  batch = source.batch(3)
  assert batch.shape == (2, 2, 33) and batch.dtype == np.int32
  split, w = source.window(3, 1, 0)
  np.testing.assert_array_equal(batch[1, 0], ids[w * 32:w * 32 + 33])
  # Evaluation batches come from the validation split, the same every time.
  assert source.window(-1, 0, 0)[0] == 'val'
  np.testing.assert_array_equal(source.batch(-1), source.batch(-1))


def test_windows_cover_an_epoch_then_reshuffle(dataset):
  source = TokenSource(dataset, 2, 2, 32, seed=0, vocab_size=257)
  n = source.windows['train']
  seen = [source.window(s, m, r)[1] for s in range(-(-n // 4)) for m in range(2) for r in range(2)]
  assert sorted(seen[:n]) == list(range(n))                   # each window once per epoch


def test_resume_continues_at_the_same_window(dataset, tmp_path):
  c = small_text_config(dataset, num_steps=6, log_every=1, checkpoint_every=0, eval_every=0)
  straight = str(tmp_path / 'straight')
  loop.train(c, straight)
  stopped = str(tmp_path / 'stopped')
  loop.train(small_text_config(dataset, num_steps=3, log_every=1, checkpoint_every=0,
                               eval_every=0, profile_steps='2-3'), stopped)
  loop.train(c, stopped)
  read = lambda d: [json.loads(l)['loss'] for l in open(os.path.join(d, 'metrics.jsonl'))]
  assert read(stopped) == read(straight)
  assert os.listdir(os.path.join(stopped, 'profile'))         # the trace of steps 2-3


def test_bpe_tokenizer_from_a_local_file(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([TEXT], trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'a.txt').write_text(TEXT)
  meta = prepare([str(tmp_path / 'a.txt')], str(tmp_path / 'bpe'),
                 str(tmp_path / 'tokenizer.json'), val_fraction=0.2)
  loaded = tokenizer_lib.load(str(tmp_path / 'tokenizer.json'))
  vocab = loaded.vocab_size                                   # 257 bytes/special + merges
  assert vocab > 257 and meta['vocab_size'] == vocab and meta['eos_id'] == 0
  assert meta['tokenizer_sha256'] and meta['max_id'] >= 257
  assert loaded.decode(loaded.encode(TEXT[:200])) == TEXT[:200]
  # A model with the byte vocabulary cannot take this tokenizer's ids.
  with pytest.raises(ConfigError, match='model.vocab_size=257'):
    validation.validate(small_text_config(str(tmp_path / 'bpe')))
  validation.validate(_with_vocab(small_text_config(str(tmp_path / 'bpe')), vocab))
  with pytest.raises(ConfigError, match=f'has {vocab} ids but the model only 257'):
    tokenizer_lib.for_model(small_text_config(str(tmp_path / 'bpe')), str(tmp_path / 'tokenizer.json'))


def _with_vocab(c, vocab):
  c.model.vocab_size = vocab
  return c


def test_bad_inputs_are_clear_errors(dataset, tmp_path):
  with pytest.raises(ConfigError, match='not a token dataset'):
    validation.validate(small_text_config(str(tmp_path / 'nowhere')))
  with pytest.raises(ConfigError, match='does not exist'):
    prepare([str(tmp_path / 'missing.txt')], str(tmp_path / 'x'))
  (tmp_path / 'empty.txt').write_text('   \n')
  with pytest.raises(ConfigError, match='is empty'):
    prepare([str(tmp_path / 'empty.txt')], str(tmp_path / 'x'))
  # A binary emptied or truncated after preparing.
  open(os.path.join(dataset, 'val.bin'), 'wb').close()
  with pytest.raises(ConfigError, match='val.bin is empty'):
    validation.validate(small_text_config(dataset))
  (tmp_path / 'short.txt').write_text('a text shorter than one window')
  prepare([str(tmp_path / 'short.txt')], str(tmp_path / 'short'), val_fraction=0.5)
  with pytest.raises(ConfigError, match='fewer than one window'):
    validation.validate(small_text_config(str(tmp_path / 'short')))
  c = small_text_config(str(tmp_path / 'short'))
  c.model.vocab_size = 200
  (tmp_path / 'b.txt').write_text(TEXT)
  prepare([str(tmp_path / 'b.txt')], str(tmp_path / 'ok'))
  c.data.path = str(tmp_path / 'ok')
  with pytest.raises(ConfigError, match='of 257 ids but model.vocab_size=200'):
    validation.validate(c)
  # Ids beyond the vocabulary even where the recorded tokenizer would fit (a hand-made dataset).
  meta_file = tmp_path / 'ok' / 'meta.json'
  meta = json.loads(meta_file.read_text())
  meta_file.write_text(json.dumps(dict(meta, vocab_size=150)))
  with pytest.raises(ConfigError, match='holds token id 256 but model.vocab_size=200'):
    validation.validate(c)
  with pytest.raises(ConfigError, match='does not exist'):
    tokenizer_lib.load(str(tmp_path / 'no_tokenizer.json'))


def test_resume_on_other_token_files_is_refused_and_a_dead_runs_leftovers_are_cleaned(
    dataset, tmp_path, capsys):
  """Other content under data.path is refused (both identities named) unless allowed; the same
  content under another path resumes; a half-written metrics line and an unfinished checkpoint
  directory of the stopped run are removed with a notice."""
  import shutil
  from moejax.data import tokens
  run = str(tmp_path / 'run')
  loop.train(small_text_config(dataset, num_steps=1, log_every=1, eval_every=0), run)
  with open(os.path.join(run, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 2, "lo')                                   # a crash mid-write
  os.makedirs(os.path.join(run, 'checkpoints', '2.orbax-checkpoint-tmp-99'))
  moved = str(tmp_path / 'moved')
  shutil.copytree(dataset, moved)                                # same content, other path
  loop.train(small_text_config(moved, num_steps=2, log_every=1, eval_every=0), run)
  out = capsys.readouterr().out
  assert 'Dropped 1 incomplete line(s)' in out and '2.orbax-checkpoint-tmp-99' in out
  assert [json.loads(l)['step'] for l in open(os.path.join(run, 'metrics.jsonl'))] == [1, 2]
  before = tokens.identity(moved)['train.bin']
  train_bin = os.path.join(moved, 'train.bin')
  ids = np.fromfile(train_bin, np.uint16)
  ids[::7] = ids[::7][::-1]                                      # same size, other content
  ids.tofile(train_bin)
  other = small_text_config(moved, num_steps=3, log_every=1, eval_every=0)
  with pytest.raises(ConfigError, match=f'checkpoint {before}, now .*--allow_other_data'):
    loop.train(other, run)
  loop.train(other, run, allow_other_data=True)
  assert 'continuing on them (--allow_other_data)' in capsys.readouterr().out
