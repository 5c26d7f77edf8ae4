"""ti_flax: textual inversion for Stable Diffusion in JAX/Flax.

    >>> from ti_flax import TrainConfig, train
    >>> result = train(TrainConfig(pretrained_model_name_or_path="...", train_data_dir="...",
    ...                            placeholder_token="<cat-toy>", initializer_token="toy"))  # doctest: +SKIP
"""

from .config import TrainConfig
from .errors import UserError

__all__ = ["TrainConfig", "UserError", "train", "TrainResult"]


def __getattr__(name):
    # Importing jax and the model libraries is slow: do it when training is asked for.
    if name in ("train", "TrainResult"):
        import importlib

        module = importlib.import_module(".train", __name__)  # binds ti_flax.train to the module
        return module if name == "train" else module.TrainResult
    raise AttributeError(name)
