#!/usr/bin/env bash
# The test suite: single-device parity, GRAPH/jit, errors, properties, and msrun jobs on 2 and 4 ranks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/env.sh")"
cd "$root"
# msrun starts workers with the first `python` on PATH: the venv's.
export PATH="$(dirname "$python"):$PATH"
exec "$python" -m pytest -q --durations=25 "$@"
