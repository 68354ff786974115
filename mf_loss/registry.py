"""Losses by name, for configuration files; mirrored into MindFormers' registry when it is installed."""
import importlib.util

_LOSSES = {}


def register_loss(cls):
    """Class decorator: makes `cls` buildable by name, here and (if importable) in MindFormers."""
    _LOSSES[cls.__name__] = cls
    if importlib.util.find_spec("mindformers") is not None:
        # Optional: importing MindFormers is heavy and writes ./output/log, so only when installed.
        from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
        MindFormerRegister.register_cls(cls, module_type=MindFormerModuleType.LOSS, alias="mf_loss." + cls.__name__)
    return cls


def get_loss_class(name: str):
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss type {name!r}; registered: {', '.join(sorted(_LOSSES))}") from None


def registered_losses():
    return dict(_LOSSES)
