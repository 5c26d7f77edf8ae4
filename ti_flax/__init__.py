"""ti_flax: textual inversion for Stable Diffusion in JAX/Flax.

    >>> from ti_flax import TrainConfig, train
    >>> result = train(TrainConfig(pretrained_model_name_or_path="...", train_data_dir="...",
    ...                            placeholder_token="<cat-toy>", initializer_token="toy"))  # doctest: +SKIP
"""

from .config import TrainConfig
from .errors import UserError

__all__ = ["TrainConfig", "UserError", "train", "TrainResult", "export", "generate", "plan"]

# name -> the module that defines it. `python -m ti_flax.train` (and .export, .generate, .plan) runs a
# separate entry module that nothing imports, so these names always stay the functions.
_LAZY = {"train": "training", "TrainResult": "training", "export": "exporting", "generate": "generation",
         "plan": "planning"}


def __getattr__(name):
    # Importing jax and the model libraries is slow: do it when they are asked for.
    if name not in _LAZY:
        raise AttributeError(f"module 'ti_flax' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module("." + _LAZY[name], __name__), name)
