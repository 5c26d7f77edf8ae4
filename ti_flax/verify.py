"""Checking an embedding file in PyTorch diffusers against the Flax text encoder.

`verify_files` loads each file into a PyTorch `StableDiffusionPipeline` with diffusers' own
`load_textual_inversion` (the way users will load it), checks that the tokens got the ids
after the base vocabulary and the exact rows, and compares the PyTorch text encoder's hidden
states for a prompt using the token with ti_flax's Flax text encoder given the same rows.

Needs torch and diffusers' PyTorch classes, which are imported only when called; the tests of
the trainer reuse `load_torch_pipeline` and `torch_hidden_states`.
"""

import copy
import dataclasses
import os

import numpy as np

from .errors import UserError

TOLERANCE = 1e-4
VERIFY_TOKEN = "<ti-flax-verify>"  # for files that do not name a token (kohya)
PROMPT = "a photo of {}"


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What one file's check found."""

    path: str
    token: str
    token_ids: tuple
    max_abs_diff: float


def require_torch():
    """Import torch, or raise UserError saying --verify needs it."""
    try:
        import torch
    except ImportError:
        raise UserError("--verify needs torch and diffusers' PyTorch classes: `pip install torch`") from None
    return torch


def check_width(model_dir, rows):
    """UserError unless the rows' width is the hidden size in MODEL_DIR/text_encoder/config.json."""
    config = os.path.join(model_dir, "text_encoder", "config.json")
    if not os.path.isfile(config):
        raise UserError(f"--verify {model_dir}: not a Stable Diffusion model folder (no text_encoder/config.json)")
    from . import files

    width = files.read_json(config, "a CLIP text model config (JSON)").get("hidden_size")
    if not isinstance(width, int):
        raise files.DamagedFile(config, "has no integer hidden_size; not a CLIP text model config")
    if rows.shape[-1] != width:
        raise UserError(
            f"--verify {model_dir}: embedding width is {rows.shape[-1]} but this model's text encoder "
            f"width is {width}; the embedding was made for a different model"
        )


def load_torch_pipeline(model_dir):
    """A PyTorch `StableDiffusionPipeline` from a local model folder, without safety checker."""
    require_torch()
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    from transformers.utils import logging as tlogging

    verbosity, t_verbosity = dlogging.get_verbosity(), tlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "accelerate not found" and similar load-time advice
    tlogging.set_verbosity_error()  # transformers 5: "requires torchvision", ...
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()  # transformers 5: "Loading weights" bars
    try:
        return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    except Exception as err:
        raise UserError(f"--verify {model_dir}: PyTorch diffusers could not load it ({type(err).__name__}: {err})") from None
    finally:
        dlogging.set_verbosity(verbosity)
        tlogging.set_verbosity(t_verbosity)
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()


def prompt_ids(pipe, tokenizer, prompt):
    """int64 [1, max_length] ids of `prompt` after the pipeline expands multi-vector tokens."""
    text = pipe.maybe_convert_prompt(prompt, tokenizer)
    return tokenizer(
        text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
    ).input_ids


def torch_hidden_states(text_encoder, input_ids):
    """Last hidden state [B, L, D] of a PyTorch CLIP text encoder, as float32 numpy."""
    torch = require_torch()
    with torch.no_grad():
        return text_encoder(torch.from_numpy(np.asarray(input_ids, dtype=np.int64)))[0].float().numpy()


def verify_files(model_dir, rows, checks, tolerance=TOLERANCE):
    """Load each embedding file in PyTorch diffusers and compare with the Flax text encoder.

    Args:
        model_dir: a local Stable Diffusion folder both PyTorch diffusers and ti_flax load.
        rows: float32 [N, D], the rows the files should hold.
        checks: (path, token, pass_token) triples; with pass_token the token is given to
            `load_textual_inversion(token=...)` (kohya and A1111 files), otherwise the token
            must come from the file itself (diffusers layout).
        tolerance: the largest allowed absolute difference of hidden states.

    Returns:
        A `VerifyResult` per file.

    Raises:
        UserError: diffusers refuses a file, gives unexpected ids or rows, or the hidden
            states differ by more than `tolerance`.
    """
    from . import models

    rows = np.asarray(rows, dtype=np.float32)
    check_width(model_dir, rows)
    pipe = load_torch_pipeline(model_dir)
    flax = models.load_model(model_dir)
    results = []
    for path, token, pass_token in checks:
        # Fresh copies per file: load_textual_inversion grows the tokenizer and table in place.
        tokenizer, text_encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
        base = len(tokenizer)
        if base != flax.spec.base_vocab_size:
            raise UserError(f"--verify {model_dir}: PyTorch tokenizer has {base} tokens, the Flax model {flax.spec.base_vocab_size}")
        try:
            pipe.load_textual_inversion(
                path, token=token if pass_token else None, tokenizer=tokenizer, text_encoder=text_encoder
            )
        except (ValueError, OSError, RuntimeError) as err:
            raise UserError(f"--verify: diffusers' load_textual_inversion refused the file ({_first_line(err)})") from None
        ids = _check_loaded(tokenizer, text_encoder, token, rows, base)
        input_ids = prompt_ids(pipe, tokenizer, PROMPT.format(token))
        if not _contains(input_ids[0].tolist(), ids):
            raise UserError(f"--verify: the prompt {PROMPT.format(token)!r} did not tokenize to the ids {ids}")
        torch_hidden = torch_hidden_states(text_encoder, input_ids)
        flax_hidden = np.asarray(models.encode_text(flax.spec, models.Compute(), flax.params["text_encoder"],
                                                    input_ids.astype(np.int32), rows))
        diff = float(np.max(np.abs(torch_hidden - flax_hidden)))
        if not diff <= tolerance:  # `not <=` also catches NaN
            raise UserError(
                f"--verify {model_dir}: PyTorch and Flax text encoders differ by {diff:.3g} (more than {tolerance:g}) "
                f"for the prompt {PROMPT.format(token)!r}"
            )
        results.append(VerifyResult(path, token, tuple(ids), diff))
    return results


def _check_loaded(tokenizer, text_encoder, token, rows, base):
    from .tokens import placeholder_tokens

    tokens = placeholder_tokens(token, rows.shape[0])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(base, base + len(tokens))):
        raise UserError(f"--verify: diffusers gave {tokens} the ids {ids}, expected {list(range(base, base + len(tokens)))}")
    table = text_encoder.get_input_embeddings().weight.detach().float().numpy()
    if table.shape[0] != base + len(tokens) or not np.array_equal(table[ids], rows):
        raise UserError("--verify: the rows diffusers loaded differ from the embedding's rows")
    return ids


def _contains(seq, sub):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def _first_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
