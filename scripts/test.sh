#!/usr/bin/env bash
# The tests. `bash scripts/test.sh` runs every tier (what CI runs: in-process checks, the C++ kernels, msrun
# jobs, training runs, the MindFormers suite); `bash scripts/test.sh --quick` runs the quick tier (in-process
# checks chosen to catch the typical slip in the loss's math, a few minutes). Other arguments go to pytest.
# Set-up comes first: the main environment (scripts/env.sh) and, for the whole suite, MindFormers' own
# (scripts/mindformers_env.sh; its test builds it too when run alone). Both are cached once built.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/env.sh")"
cd "$root"
if [ "$#" -eq 0 ]; then
  bash "$root/scripts/mindformers_env.sh" >/dev/null
fi
# msrun starts workers with the first `python` on PATH: the venv's.
export PATH="$(dirname "$python"):$PATH"
args=()
for arg in "$@"; do
  if [ "$arg" = "--quick" ]; then args+=(-m quick); else args+=("$arg"); fi
done
exec "$python" -m pytest -q --durations=25 "${args[@]}"
