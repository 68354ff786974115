#!/usr/bin/env bash
# The main job: trains a small language model with a vocabulary-parallel output layer and this loss on
# dp=2 x mp=2 msrun ranks (override with --config configs/<file>.yaml and other `mf-loss train` flags).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/env.sh")"
cd "$root"
export PATH="$(dirname "$python"):$PATH"
if [[ " $* " != *" --config "* ]]; then set -- --config configs/dp2_mp2.yaml "$@"; fi
exec "$python" -m mf_loss.cli train "$@"
