#!/usr/bin/env bash
# The main job: trains a small language model with a vocabulary-parallel output layer and this loss on
# dp=2 x mp=2 msrun ranks (override with --config configs/<file>.yaml and other `mf-loss train` flags).
# A MindFormers YAML (model.arch.type naming our MindFormers Llama, e.g. configs/mindformers_llama.yaml) trains
# MindFormers' Llama instead, in the MindFormers environment that scripts/mindformers_env.sh builds on first use;
# one with MindFormers' dataset section (configs/mindformers_trainer.yaml) runs MindFormers' own Trainer.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(bash "$root/scripts/env.sh")"
cd "$root"
export PATH="$(dirname "$python"):$PATH"
if [[ " $* " != *" --config "* && " $* " != *" --config="* ]]; then set -- --config configs/dp2_mp2.yaml "$@"; fi
config=""
previous=""
for arg in "$@"; do
  if [ "$previous" = "--config" ]; then config="$arg"; fi
  case "$arg" in --config=*) config="${arg#--config=}" ;; esac
  previous="$arg"
done
is_mindformers='import sys; from mf_loss.integrations import is_mindformers_config as f; sys.exit(not f(sys.argv[1]))'
if "$python" -c "$is_mindformers" "$config"; then
  mindformers_python="$(bash "$root/scripts/mindformers_env.sh")"
  export PATH="$(dirname "$mindformers_python"):$PATH"
  exec "$mindformers_python" -m mf_loss.integrations.mindformers_train "$@"
fi
exec "$python" -m mf_loss.cli train "$@"
