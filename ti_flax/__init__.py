"""ti_flax: textual inversion for Stable Diffusion in JAX/Flax.

    >>> from ti_flax import TrainConfig, train
    >>> result = train(TrainConfig(pretrained_model_name_or_path="...", train_data_dir="...",
    ...                            placeholder_token="<cat-toy>", initializer_token="toy"))  # doctest: +SKIP

The commands `train`, `export`, `generate` and `plan` are the functions of those names in
`ti_flax/commands/`, looked up on first use, so `import ti_flax` (and `--help`) does not import jax.
"""

from .config import TrainConfig
from .errors import UserError

COMMANDS = ("train", "export", "generate", "plan")  # each the function of its name in commands/<name>.py
__all__ = ["TrainConfig", "UserError", "TrainResult", *COMMANDS]


def __getattr__(name):
    import importlib

    if name in COMMANDS:
        return getattr(importlib.import_module(f".commands.{name}", __name__), name)
    if name == "TrainResult":
        return importlib.import_module(".commands.train", __name__).TrainResult
    raise AttributeError(f"module 'ti_flax' has no attribute {name!r}")
