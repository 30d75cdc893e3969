"""README's open-model walkthrough, command by command: import -> prepare with the model's
tokenizer -> fine-tune -> evaluate -> sample -> export, then the export re-imports to the
fine-tuned parameters (float32 export) and, where torch is installed, transformers loads it.
The commands are read from README.md; /tmp paths move into the test's directory."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import readme_commands, subprocess_env

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_finetune_export(tmp_path):
  env = subprocess_env(
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  outputs = []
  for command in readme_commands('## Open models in and out'):
    command = command.replace('/tmp/moejax', f'{tmp_path}/moejax')
    if 'convert export' in command:
      command += ' --dtype=float32'
    out = subprocess.run(['bash', '-c', command], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f'{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}'
    outputs.append(out.stdout)
  text = '\n'.join(outputs)
  assert 'Initialised params from' in text and 'Finished at step 20' in text
  assert 'validation loss' in text
  exported = tmp_path / 'moejax_gpt_oss_hf'
  assert {'config.json', 'tokenizer.json'} <= set(os.listdir(exported))

  from moejax import config as config_lib
  from moejax.convert import families, hf as hf_lib
  from moejax.checkpoint_dir import saved_config
  _, saved = saved_config(str(tmp_path / 'moejax_gpt_oss_ft'))
  m = config_lib.model_config(saved)
  again = hf_lib.load_params(str(exported), m, families.FAMILIES['gpt_oss'])
  item = os.path.join(tmp_path, 'moejax_gpt_oss_ft', 'checkpoints', '20', 'state')
  for path, leaf in jax.tree_util.tree_leaves_with_path(again):
    keys = ('params',) + tuple(k.key for k in path)
    np.testing.assert_array_equal(leaf, hf_lib.restore_array(item, keys), err_msg=str(keys))
  original = hf_lib.load_params(os.path.join(ROOT, 'tests/data/hf/gpt_oss'), m,
                                families.FAMILIES['gpt_oss'])
  assert not np.array_equal(again['head']['w'], original['head']['w'])   # it was fine-tuned

  torch = pytest.importorskip('torch', reason='torch is not in CI; run by hand (README)')
  transformers = pytest.importorskip('transformers')
  model = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
  assert model(torch.zeros((1, 4), dtype=torch.long)).logits.shape == (1, 4, m.vocab_size)
