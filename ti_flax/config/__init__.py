"""A run's settings: the frozen `TrainConfig`, its command line, and every closed list of values.

| module | holds |
| --- | --- |
| `train_config.py` | `TrainConfig`: every training flag as a field, `validate()`, JSON round trip |
| `cli.py` | flags -> `TrainConfig` (`build_parser`, `parse_config`) |
| `choices.py` | every closed list of values a flag takes, once (imports nothing of ti_flax) |
| `concepts.py` | `--concepts`: the run's concepts, read from a file or the flags and checked |

Imports only `errors` and `tokens`; no jax, so `--help` stays fast.
"""

from .train_config import TrainConfig

__all__ = ["TrainConfig"]
