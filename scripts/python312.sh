#!/bin/sh
# Prints the path of a Python >= 3.12 interpreter (jax 0.11+ needs one): python3.12, python3.13
# or python3 on PATH, else a pyenv-installed 3.12 (or 3.13). Exits 1 with one error line if none.
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }
for py in python3.12 python3.13 python3; do
  if command -v "$py" >/dev/null 2>&1 && ok "$py"; then command -v "$py"; exit 0; fi
done
root=$( (pyenv root) 2>/dev/null || echo "$HOME/.pyenv")
for py in "$root"/versions/3.12*/bin/python3 "$root"/versions/3.13*/bin/python3; do
  if [ -x "$py" ] && ok "$py"; then echo "$py"; exit 0; fi
done
echo "error: moejax needs Python 3.12 or newer (jax 0.12); none found on PATH or under pyenv. Install one (apt install python3.12 python3.12-venv, or pyenv install 3.12) and run again." >&2
exit 1
