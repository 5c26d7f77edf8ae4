"""Learned rows -> embedding files that other Stable Diffusion tools load.

Every file is written to a temporary name in the destination folder and renamed into place
only when complete, so a crash never leaves a half-written embedding behind.
"""

import os
import tempfile

import numpy as np

from .errors import UserError

DIFFUSERS_FILE = "learned_embeds.safetensors"
DIFFUSERS_BIN = "learned_embeds.bin"


def atomic_write(path, write):
    """Call `write(tmp_path)`, then rename tmp_path to `path`; clean up on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_rows(rows):
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise UserError(f"embedding must be [num_vectors, hidden], got shape {rows.shape}")
    if not np.all(np.isfinite(rows)):
        raise UserError("embedding holds NaN or Inf values; refusing to write it")
    return rows


def save_diffusers(path, token, rows):
    """`{token: float32 [N, D]}` safetensors with metadata format=pt: what
    `StableDiffusionPipeline.load_textual_inversion` reads (N > 1 loads as tok, tok_1, ...)."""
    from safetensors.numpy import save_file

    rows = check_rows(rows)
    return atomic_write(path, lambda tmp: save_file({token: rows}, tmp, metadata={"format": "pt"}))


def save_diffusers_bin(path, token, rows):
    """The same dict `torch.save`d to a .bin, as diffusers' PyTorch script writes it."""
    try:
        import torch
    except ImportError:
        raise UserError("writing learned_embeds.bin needs torch: `pip install torch`, or drop --no_safe_serialization") from None
    rows = check_rows(rows)
    return atomic_write(path, lambda tmp: torch.save({token: torch.from_numpy(rows.copy())}, tmp))


def load_diffusers(path):
    """(token, float32 rows [N, D]) from a diffusers-layout safetensors file."""
    from safetensors.numpy import load_file

    tensors = load_file(path)
    if len(tensors) != 1:
        raise UserError(f"{path}: expected one token in a diffusers embedding file, found {sorted(tensors)}")
    (token, rows), = tensors.items()
    rows = np.asarray(rows, dtype=np.float32)
    return token, rows.reshape(1, -1) if rows.ndim == 1 else rows
