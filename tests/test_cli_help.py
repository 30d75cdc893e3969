"""Every command's --help shows what it does and its own flags (not just "Try --helpfull"), and
the training commands say where the config keys are documented."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {
    'main.py': ['--config', '--workdir', '--coordinator_address', '--num_processes'],
    'moejax.cli.convert': ['--hf_dir', '--workdir', '--dtype', '--max_shard_size'],
    'moejax.cli.evaluate': ['--workdir', '--eval_batches', '--step'],
    'moejax.cli.sample': ['--workdir', '--prompt', '--temperature', '--tokenizer'],
    'moejax.cli.prepare': ['--input', '--out', '--tokenizer'],
    'moejax.cli.plot': ['--workdir'],
    'moejax.cli.gpu_check': ['--config', '--out'],
    'moejax.cli.gpu_bench': ['--[no]tiny', '--out', '--files', '--budget_s'],
    'moejax.bench': ['--config', '--[no]aot', '--target'],
}


@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_help_lists_the_commands_own_flags(command):
  args = [command] if command.endswith('.py') else ['-m', command]
  out = subprocess.run([sys.executable, *args, '--help'], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode in (0, 1), out.stderr[-2000:]   # absl's --help exits 1
  for flag in COMMANDS[command]:
    assert f'  {flag}' in out.stdout, (flag, out.stdout[-3000:])
  if '--config' in COMMANDS[command]:
    assert 'configs/tp4pp4.py' in out.stdout and 'docs/config_keys.md' in out.stdout
