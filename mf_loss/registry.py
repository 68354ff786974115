"""Losses by name, for configuration files. MindFormers' registry is filled by mf_loss.integrations.mindformers
(importing it registers every loss here as `mf_loss.<Name>`); the library itself never imports MindFormers."""

_LOSSES = {}


def register_loss(cls):
    """Class decorator: makes `cls` buildable by name (`get_loss_class(cls.__name__)`)."""
    _LOSSES[cls.__name__] = cls
    return cls


def get_loss_class(name: str):
    """The loss class registered as `name`; KeyError naming the registered ones otherwise."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss type {name!r}; registered: {', '.join(sorted(_LOSSES))}") from None


def registered_losses():
    """{name: class} of every registered loss."""
    return dict(_LOSSES)
