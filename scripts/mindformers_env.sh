#!/usr/bin/env bash
# Builds the separate MindFormers virtual environment (.venv-mindformers, or $MF_LOSS_MINDFORMERS_VENV) when it
# is missing or when its recipe (below) or pyproject.toml changed since it was built; prints its python.
#
# Why a separate environment: MindFormers 1.9.0 is the newest release whose own dependencies are published
# (2.1.0 needs MindSpore 2.11, 2.0.0 needs `hyper-parallel`), and it declares MindSpore 2.9; pip refuses it
# beside MindSpore 2.10 (ResolutionImpossible), so it is installed with --no-deps next to the dependencies it
# really imports. pyarrow is pinned: newer ones need NumPy 2, which MindSpore 2.10 cannot use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MF_LOSS_MINDFORMERS_VENV:-$root/.venv-mindformers}"
stamp="$venv/.mf_loss_mindformers_stamp"

mindformers_requirements=(mindspore==2.10.0 "numpy<2" pyyaml deprecated regex requests jieba rouge-chinese
  "nltk==3.9.1" "datasets>=4.0.0" "pyarrow==19.0.0" tokenizers sentencepiece "mindpet==1.0.4" tensorboardX
  tiktoken tqdm)
mindformers_package="mindformers==1.9.0"
# What mf_loss and its MindFormers tests need besides (pyproject.toml's dependencies; torch is not needed).
project_requirements=(psutil matplotlib pytest hypothesis "scipy-openblas32>=0.3.27")

want="$( { printf '%s\n' "${mindformers_requirements[@]}" "$mindformers_package" "${project_requirements[@]}";
           cat "$root/pyproject.toml"; } | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  version="$("$python_bin" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ "$version" != "3.11" ]; then
    echo "the MindFormers environment needs Python 3.11 (MindSpore 2.10 wheels); $python_bin is $version." \
         "Set PYTHON=/path/to/python3.11." >&2
    exit 1
  fi
  echo "Setting up $venv (MindSpore 2.10 + MindFormers 1.9.0, about 3 GB; a few minutes the first time)..." >&2
  rm -f "$stamp"
  [ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip >&2
  "${pip[@]}" "${mindformers_requirements[@]}" >&2
  "${pip[@]}" --no-deps "$mindformers_package" >&2
  # This project, editable, without letting pip re-resolve MindSpore; then what it needs that is still missing.
  "${pip[@]}" --no-deps --no-build-isolation -e "$root" >&2
  "${pip[@]}" "${project_requirements[@]}" >&2
  # A check that the environment imports (in a scratch directory: MindFormers writes ./output/log on import).
  scratch="$(mktemp -d)"
  (cd "$scratch" && LOCAL_DEFAULT_PATH="$scratch/log" "$venv/bin/python" -c "import mindspore, mindformers, mf_loss
assert mindspore.__version__.startswith('2.10'), mindspore.__version__" >&2)
  rm -rf "$scratch"
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
