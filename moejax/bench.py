"""`python -m moejax.bench`: the benchmark command, kept at its old name (moejax/cli/bench.py)."""
from moejax.cli.bench import run

if __name__ == '__main__':
  run()
