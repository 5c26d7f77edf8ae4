"""`.npy` files: diffusers' Flax script output and bare arrays. ti_flax reads them, never writes
them (no other tool loads a `.npy` embedding).

diffusers' Flax script (`textual_inversion_flax.py`, diffusers <= 0.39) writes
`learned_embeds.npy` with `jnp.save(path, {token: row})`: a 0-d object array holding a pickled
dict ("flax-npy"). Reading it needs unpickling, which can run code, so only with allow_pickle.
A plain numeric `.npy` is taken as the rows themselves ("npy").
"""

import numpy as np

from ..errors import UserError, first_line
from .base import Layout, register

FLAX_NPY = "learned_embeds.npy"


def load(path, allow_pickle):
    """What a `.npy` holds: a numeric array (the rows), or the `{token: row}` dict it pickles.

    Raises:
        UserError: not a readable `.npy`, a pickle without `allow_pickle`, or a pickled object
            other than a dict.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise UserError(f"{path}: not a readable .npy file ({first_line(err)})") from None
        if not allow_pickle:
            raise UserError(
                f"{path}: a pickled Python object (as diffusers' Flax script writes it); unpickling can run "
                "code: pass --allow-pickle (allow_pickle=True) only for files you trust"
            ) from None
        array = np.load(path, allow_pickle=True)
    except Exception as err:
        raise UserError(f"{path}: not a readable .npy file ({first_line(err)})") from None
    if array.dtype != object:
        return array
    data = array.item() if array.shape == () else None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the pickled object is a {type(data).__name__}, not a {{token: row}} dict")
    return {k: np.asarray(v) for k, v in data.items()}


FLAX = register(Layout("flax-npy", "{token: row} pickled in a .npy (diffusers' Flax script; needs allow_pickle)"))
BARE = register(Layout("npy", "a numeric [N, D] or [D] array in a .npy"))
