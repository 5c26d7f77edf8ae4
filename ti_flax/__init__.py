"""ti_flax: textual inversion for Stable Diffusion in JAX/Flax.

    >>> from ti_flax import TrainConfig, train
    >>> result = train(TrainConfig(pretrained_model_name_or_path="...", train_data_dir="...",
    ...                            placeholder_token="<cat-toy>", initializer_token="toy"))  # doctest: +SKIP
"""

from .config import TrainConfig
from .errors import UserError

__all__ = ["TrainConfig", "UserError", "train", "TrainResult", "export", "generate"]

# name -> the module that defines it; `train`, `export` and `generate` are callable modules
# (see _entry.py), so `ti_flax.train(config)` works however the module was imported.
_LAZY = {"train": "train", "TrainResult": "train", "export": "export", "generate": "generate"}


def __getattr__(name):
    # Importing jax and the model libraries is slow: do it when they are asked for.
    if name not in _LAZY:
        raise AttributeError(f"module 'ti_flax' has no attribute {name!r}")
    import importlib

    module = importlib.import_module("." + _LAZY[name], __name__)  # binds ti_flax.<module>
    return module if name == _LAZY[name] else getattr(module, name)
