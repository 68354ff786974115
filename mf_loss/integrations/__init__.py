"""Integrations of mf_loss with other frameworks; they sit beside the library, which never imports them.

`mf_loss.integrations.mindformers` (needs MindFormers: `bash scripts/mindformers_env.sh` builds an environment
with it) registers our losses and a vocabulary-parallel Llama in MindFormers' registries;
`mf_loss.integrations.mindformers_train` trains that Llama from a MindFormers YAML on dp x mp msrun ranks;
`mf_loss.integrations.mindformers_run` runs MindFormers' own Trainer on it (data-parallel ranks), with the corpus
as a MindRecord from `mf_loss.integrations.mindformers_data`.
This module itself imports nothing heavy: scripts/train.sh asks it which trainer a YAML file is for.
"""
from pathlib import Path

# model.arch.type values that mean "a MindFormers model": the classes mindformers.py registers under MODELS.
MINDFORMERS_MODEL_TYPES = ("VocabParallelLlamaForCausalLM",)
ENV_SCRIPT = "scripts/mindformers_env.sh"


def is_mindformers_config(path) -> bool:
    """True when the YAML file's model.arch.type names one of our MindFormers model classes."""
    import yaml
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # the trainer that reads it reports the problem
    model = tree.get("model") if isinstance(tree, dict) else None
    arch = model.get("arch") if isinstance(model, dict) else None
    return isinstance(arch, dict) and arch.get("type") in MINDFORMERS_MODEL_TYPES
