"""moejax command line: python main.py --config=configs/tp4pp4.py:tiny --workdir=/tmp/run.

The same as the installed `moejax-train` (moejax/cli/train.py).
"""
from moejax.cli import train

if __name__ == '__main__':
  train.run()
