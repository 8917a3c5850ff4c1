"""`build_model(name, ...)` for every model a config can name: the built-in names are mpi_afl/names.py's
MODELS, plug-ins are named by import path."""

from torch import nn

from mpi_afl.config import ConfigError
from mpi_afl.names import MODELS, builtin
from mpi_afl.plugins import call, callable_object, is_import_path


def build_model(name: str, *, in_channels: int, image_size: int, num_classes: int, norm: str) -> nn.Module:
    """Build model `name` (or call the plug-in factory 'package.module:function' with the same keyword
    arguments, docs/extending.md "Models"); `norm` is "batchnorm", "stat" (StatTracker) or "none"."""
    kwargs = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes, norm=norm)
    if is_import_path(name):
        model = call(callable_object(name, "model.name"), name, "model.name", **kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"config key 'model.name': {name!r} returned {type(model).__name__}, not a "
                              "torch.nn.Module")
        return model
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    return builtin(MODELS[name])(**kwargs)
