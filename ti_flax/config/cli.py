"""Command-line flags -> TrainConfig. Flag names follow diffusers' textual_inversion scripts.

The flags are TrainConfig's fields, each declared once there with `flag(...)` (flags.py builds the
parser from the declarations); this module adds what is not a setting of the run (`--local_rank`,
refused) and turns the parsed values into a validated config.
"""

import argparse
import os

from ..errors import UserError
from . import flags
from .train_config import TrainConfig


def build_parser():
    """`python -m ti_flax.train`'s parser: every TrainConfig field's flag, by group."""
    p = argparse.ArgumentParser(
        prog="python -m ti_flax.train",
        description="Textual inversion for Stable Diffusion in JAX/Flax: learn new token embeddings "
        "for a concept from a few images.",
    )
    flags.add_arguments(p, TrainConfig)
    # PyTorch launchers pass it; JAX has no use for it (parse_config refuses any value but -1).
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def parse_config(argv=None, parser=None, validate=True):
    """Parse flags into a validated TrainConfig. Raises UserError on bad values.

    `parser`: another command's parser built on `build_parser` (its own flags are left out of the
    config); `validate=False` leaves the checks to the caller (`ti_flax.plan` fills in the data flags first).
    """
    args = vars((parser or build_parser()).parse_args(argv))
    if args.pop("local_rank") != -1:
        raise UserError(
            "--local_rank is a PyTorch launcher flag; JAX runs one process per host and uses every local device"
        )
    config = TrainConfig(**flags.from_cli(TrainConfig, args))
    if config.output_dir and os.path.isfile(config.output_dir):
        raise UserError(f"--output_dir {config.output_dir}: is a file, not a folder")
    return config.validate() if validate else config
