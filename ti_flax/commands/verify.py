"""Checking an embedding file in PyTorch diffusers against the Flax text encoder.

`verify_files` loads each file into a PyTorch `StableDiffusionPipeline` with diffusers' own
`load_textual_inversion` (the way users will load it), checks that the tokens got the ids
after the base vocabulary and the exact rows, and compares the PyTorch text encoder's hidden
states for a prompt using the token with ti_flax's Flax text encoder given the same rows.

`verify_sdxl_files` does the same for SDXL embeddings in a `StableDiffusionXLPipeline`: two
`load_textual_inversion` calls per embedding (the CLIP-L rows into text_encoder / tokenizer, the
bigG rows into text_encoder_2 / tokenizer_2), then the pipeline's `encode_prompt` against
`models.condition`: prompt_embeds (both penultimate states) and pooled_prompt_embeds.

Needs torch and diffusers' PyTorch classes, which are imported only when called; the tests of
the trainer reuse `load_torch_pipeline` and `torch_hidden_states`.
"""

import copy
import dataclasses
import os

import numpy as np

from ..errors import UserError, first_line
from ..tokens import join_rows

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


def check_width(model_dir, rows, rows_2=None):
    """UserError unless MODEL_DIR is the kind of model the rows are for: SD 1.x / 2.x for `rows`
    alone, SDXL for `rows` and `rows_2` (its second text encoder's rows), each width the hidden
    size in that text encoder's config.json."""
    from .. import models

    if not os.path.isfile(os.path.join(model_dir, "text_encoder", "config.json")):
        raise UserError(f"--verify {model_dir}: not a Stable Diffusion model folder (no text_encoder/config.json)")
    sdxl = models.is_sdxl_dir(model_dir)
    if sdxl and rows_2 is None:
        raise UserError(f"--verify {model_dir}: an SDXL model, but the embedding holds one text encoder's rows "
                        "(SD 1.x / 2.x); verify it with the model it was made for")
    if rows_2 is not None and not sdxl:
        raise UserError(f"--verify {model_dir}: not an SDXL model (no text_encoder_2/), but the embedding is an SDXL "
                        "one (clip_l and clip_g); verify it with the SDXL model it was made for")
    for folder, part in (("text_encoder", rows), ("text_encoder_2", rows_2)):
        if part is not None:
            _check_encoder_width(model_dir, folder, part.shape[-1])


def _check_encoder_width(model_dir, folder, got):
    from .. import files

    config = os.path.join(model_dir, folder, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"--verify {model_dir}: not a Stable Diffusion model folder (no {folder}/config.json)")
    width = files.read_json(config, "a CLIP text model config (JSON)").get("hidden_size")
    if not isinstance(width, int):
        raise files.DamagedFile(config, "has no integer hidden_size; not a CLIP text model config")
    if got != width:
        what = "text encoder" if folder == "text_encoder" else "second text encoder (clip_g)"
        raise UserError(
            f"--verify {model_dir}: embedding width is {got} but this model's {what} "
            f"width is {width}; the embedding was made for a different model"
        )


def load_torch_pipeline(model_dir):
    """A PyTorch `StableDiffusionPipeline` from a local model folder, without safety checker."""
    return _load_quietly("StableDiffusionPipeline", model_dir, safety_checker=None, requires_safety_checker=False)


def load_torch_sdxl_text_pipeline(model_dir):
    """A PyTorch `StableDiffusionXLPipeline` from a local SDXL folder with its text encoders and
    tokenizers only (no UNet or VAE: `encode_prompt` needs neither, and SDXL's UNet is 10 GB)."""
    return _load_quietly("StableDiffusionXLPipeline", model_dir, unet=None, vae=None)


def _load_quietly(class_name, model_dir, **kwargs):
    """diffusers' `class_name` from_pretrained, its and transformers' load-time advice and
    progress bars silenced (importing the SDXL pipeline warns about torchvision)."""
    require_torch()
    import diffusers
    from diffusers.utils import logging as dlogging

    from transformers.utils import logging as tlogging

    verbosity, t_verbosity = dlogging.get_verbosity(), tlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "accelerate not found" and similar load-time advice
    tlogging.set_verbosity_error()  # transformers 5: "requires torchvision", ...
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()  # transformers 5: "Loading weights" bars
    try:
        return getattr(diffusers, class_name).from_pretrained(model_dir, **kwargs)
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
    from .. import models

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
            raise UserError(f"--verify: diffusers' load_textual_inversion refused the file ({first_line(err)})") from None
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


def _check_loaded(tokenizer, text_encoder, token, rows, base, where=""):
    """The tokens' ids after diffusers loaded them; UserError unless they follow the base
    vocabulary and the text encoder's table holds exactly `rows` for them. `where` names the
    tokenizer / text encoder pair in messages (SDXL has two)."""
    from ..tokens import placeholder_tokens

    tokens = placeholder_tokens(token, rows.shape[0])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(base, base + len(tokens))):
        raise UserError(f"--verify: diffusers gave {tokens} the ids {ids}{where}, "
                        f"expected {list(range(base, base + len(tokens)))}")
    table = text_encoder.get_input_embeddings().weight.detach().float().numpy()
    if table.shape[0] != base + len(tokens) or not np.array_equal(table[ids], rows):
        raise UserError(f"--verify: the rows diffusers loaded{where} differ from the embedding's rows")
    return ids


def verify_sdxl_files(model_dir, rows, rows_2, checks, tolerance=TOLERANCE):
    """Load each SDXL embedding in a PyTorch `StableDiffusionXLPipeline` and compare with Flax.

    Each embedding goes in as diffusers documents for SDXL: `load_textual_inversion` once with
    the first text encoder's rows into text_encoder / tokenizer, once with the second's into
    text_encoder_2 / tokenizer_2. Then the pipeline's `encode_prompt` (no guidance) for a
    prompt with the token is compared with `models.condition` on the first tokenizer's ids:
    prompt_embeds with the context, pooled_prompt_embeds with the text embeds.

    Args:
        model_dir: a local SDXL folder both PyTorch diffusers and ti_flax load.
        rows, rows_2: float32 [N, D1], [N, D2], the rows the files should hold for the first
            (clip_l) and second (clip_g) text encoder.
        checks: (paths, token, pass_token) triples: `paths` is (first file, second file) of
            diffusers' pair, each `{token: rows}`, or (one file,) holding `{"clip_l", "clip_g"}`
            (read with safetensors or torch.load by its extension, its two tensors given to
            `load_textual_inversion` with `token=`). With pass_token, `token` is given to the
            pair's loads too; otherwise it must come from the files.
        tolerance: the largest allowed absolute difference of either output.

    Returns:
        A `VerifyResult` per check (`path` its first file).

    Raises:
        UserError: diffusers refuses a file, gives either tokenizer unexpected ids, loads other
            rows into either text encoder, or an output differs by more than `tolerance`.
    """
    from .. import models
    from ..formats import TEXT_ENCODER_2

    torch = require_torch()
    rows, rows_2 = np.asarray(rows, dtype=np.float32), np.asarray(rows_2, dtype=np.float32)
    check_width(model_dir, rows, rows_2)
    pipe = load_torch_sdxl_text_pipeline(model_dir)
    flax = models.load_model(model_dir)
    base = flax.spec.base_vocab_size
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        if len(tokenizer) != base:
            raise UserError(f"--verify {model_dir}: PyTorch tokenizer has {len(tokenizer)} tokens, the Flax model {base}")
    results = []
    for paths, token, pass_token in checks:
        parts = {"text_encoder": copy.deepcopy(pipe.text_encoder), "text_encoder_2": copy.deepcopy(pipe.text_encoder_2),
                 "tokenizer": copy.deepcopy(pipe.tokenizer), "tokenizer_2": copy.deepcopy(pipe.tokenizer_2)}
        loads = _sdxl_loads(paths, token, pass_token)
        for (source, load_token), suffix, want in zip(loads, ("", "_2"), (rows, rows_2)):
            tokenizer, text_encoder = parts["tokenizer" + suffix], parts["text_encoder" + suffix]
            try:
                pipe.load_textual_inversion(source, token=load_token, tokenizer=tokenizer, text_encoder=text_encoder)
            except (ValueError, OSError, RuntimeError) as err:
                raise UserError(f"--verify: diffusers' load_textual_inversion refused the file ({first_line(err)})") from None
            ids = _check_loaded(tokenizer, text_encoder, token, want, base, f" (tokenizer{suffix}, text_encoder{suffix})")
        view = type(pipe)(**dict(pipe.components, **parts))  # the loaded copies, the rest shared
        prompt = PROMPT.format(token)
        input_ids = prompt_ids(view, view.tokenizer, prompt)
        if not _contains(input_ids[0].tolist(), ids):
            raise UserError(f"--verify: the prompt {prompt!r} did not tokenize to the ids {ids}")
        with torch.no_grad():
            embeds, _, pooled, _ = view.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        cond = models.condition(flax.spec, models.Compute(), (flax.params["text_encoder"], flax.params[TEXT_ENCODER_2]),
                                input_ids.astype(np.int32), join_rows((rows, rows_2)))
        diffs = {
            "prompt_embeds": float(np.max(np.abs(embeds.float().numpy() - np.asarray(cond.context)))),
            "pooled_prompt_embeds": float(np.max(np.abs(pooled.float().numpy() - np.asarray(cond.text_embeds)))),
        }
        for name, diff in diffs.items():
            if not diff <= tolerance:  # `not <=` also catches NaN
                raise UserError(
                    f"--verify {model_dir}: PyTorch's encode_prompt and Flax differ by {diff:.3g} (more than "
                    f"{tolerance:g}) in {name} for the prompt {prompt!r}"
                )
        results.append(VerifyResult(paths[0], token, tuple(ids), max(diffs.values())))
    return results


def _sdxl_loads(paths, token, pass_token):
    """[(what to give load_textual_inversion, token=)] for the first and the second text encoder."""
    if len(paths) == 2:  # diffusers' pair: one {token: rows} file per text encoder
        return [(path, token if pass_token else None) for path in paths]
    (path,) = paths
    from ..formats.sdxl import CLIP_G, CLIP_L

    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = require_torch().load(path, map_location="cpu", weights_only=True)
    missing = [key for key in (CLIP_L, CLIP_G) if key not in state]
    if missing:
        raise UserError(f"--verify: {path} has no {' or '.join(missing)} entry; not an SDXL embedding file")
    return [(state[CLIP_L], token), (state[CLIP_G], token)]


def _contains(seq, sub):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))
