#!/usr/bin/env bash
# Builds the project's virtual environment (.venv, or $MF_LOSS_VENV) when it is missing or when
# pyproject.toml changed since it was built. Sourced by the other scripts; prints the python to use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MF_LOSS_VENV:-$root/.venv}"
stamp="$venv/.mf_loss_stamp"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  version="$("$python_bin" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ "$version" != "3.11" ]; then
    echo "mf_loss needs Python 3.11 (MindSpore 2.10 wheels); $python_bin is $version. Set PYTHON=/path/to/python3.11." >&2
    exit 1
  fi
  echo "Setting up $venv (mf_loss with the tools' and the tests' extras: MindSpore 2.10, NumPy<2, torch 2.13 CPU; about 2 minutes)..." >&2
  "$python_bin" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "$root[train,bench,test]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
