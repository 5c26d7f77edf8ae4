"""Checking embedding files in PyTorch diffusers against ti_flax's own text encoders.

`verify_files` loads each file into a PyTorch pipeline of the model's family (`ModelFamily.
pipeline_class`, its text encoders only) with diffusers' own `load_textual_inversion`, once per
text encoder (the way users load it), checks that the tokens got the ids after the base
vocabulary and the exact rows, and compares the pipeline's `encode_prompt` for a prompt using the
token with the family's `condition` given the same rows (`reference_outputs` / `our_outputs`: for
SDXL the pooled embedding too).

Needs torch and diffusers' PyTorch classes, which are imported only when called; the tests of
the trainer reuse `load_torch_pipeline` and `torch_hidden_states`.
"""

import copy
import dataclasses
import os

import numpy as np

from .. import families, files, models
from ..errors import UserError, first_line
from ..tokens import join_rows, placeholder_tokens

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


def check_model(model_dir, parts):
    """The family of MODEL_DIR; UserError unless it is a model the embedding's rows are for: rows
    for each of its text encoders (`parts`: float32 [N, D] per encoder, in order), each as wide as
    that encoder's config.json says."""
    if not os.path.isfile(os.path.join(model_dir, "text_encoder", "config.json")):
        raise UserError(f"--verify {model_dir}: not a Stable Diffusion model folder (no text_encoder/config.json)")
    family = families.family_of_folder(model_dir)
    if len(parts) != len(family.encoders):
        have = f"{len(family.encoders)} text encoder{'s' if len(family.encoders) > 1 else ''}"
        raise UserError(f"--verify {model_dir}: an {family.title} model ({have}: "
                        f"{', '.join(e.part + '/' for e in family.encoders)}), but the embedding holds rows for "
                        f"{len(parts)}; verify it with the model it was made for")
    for encoder, part in zip(family.encoders, parts):
        _check_encoder_width(model_dir, encoder, part.shape[-1])
    return family


def _check_encoder_width(model_dir, encoder, got):
    config = os.path.join(model_dir, encoder.part, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"--verify {model_dir}: not a Stable Diffusion model folder (no {encoder.part}/config.json)")
    read = files.read_json(config, "a text encoder config (JSON)")
    width = read.get("hidden_size", read.get("d_model"))  # CLIP's, or T5's (FLUX.1's second encoder)
    if not isinstance(width, int):
        raise files.DamagedFile(config, "has no integer hidden_size (or d_model); not a text encoder config")
    if got != width:
        what = "text encoder" if encoder.part == "text_encoder" else f"{encoder.title} text encoder ({encoder.part})"
        raise UserError(
            f"--verify {model_dir}: embedding width is {got} but this model's {what} "
            f"width is {width}; the embedding was made for a different model"
        )


def load_torch_pipeline(model_dir):
    """A PyTorch `StableDiffusionPipeline` from a local model folder, without safety checker."""
    return _load_quietly("StableDiffusionPipeline", model_dir, safety_checker=None, requires_safety_checker=False)


def load_torch_text_pipeline(model_dir, family):
    """The PyTorch pipeline of `family` from a local folder, with its text encoders and tokenizers
    only (`encode_prompt` needs no UNet or VAE, and SDXL's UNet is 10 GB)."""
    return _load_quietly(family.pipeline_class, model_dir, **family.reference_kwargs())


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


def prompt_ids(pipe, tokenizer, prompt, max_length=None):
    """int64 [1, max_length] ids of `prompt` after the pipeline expands multi-vector tokens
    (`max_length`: default the tokenizer's model_max_length)."""
    text = pipe.maybe_convert_prompt(prompt, tokenizer)
    return tokenizer(
        text, padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True,
        return_tensors="np",
    ).input_ids


def torch_hidden_states(text_encoder, input_ids):
    """Last hidden state [B, L, D] of a PyTorch CLIP text encoder, as float32 numpy."""
    torch = require_torch()
    with torch.no_grad():
        return text_encoder(torch.from_numpy(np.asarray(input_ids, dtype=np.int64)))[0].float().numpy()


def verify_files(model_dir, rows, checks, tolerance=TOLERANCE):
    """Load each embedding in PyTorch diffusers and compare with ti_flax.

    Each embedding goes in as diffusers documents it: `load_textual_inversion` once per text
    encoder of the model's family, each encoder's rows into its own text encoder and tokenizer.
    Then the pipeline's `encode_prompt` (no guidance) for a prompt with the token is compared with
    the family's `condition` on the first tokenizer's ids.

    Args:
        model_dir: a local model folder both PyTorch diffusers and ti_flax load.
        rows: float32 [N, D], the rows the files should hold for a model of one text encoder; for
            several, a tuple of each encoder's rows (SDXL: clip_l's [N, D1], clip_g's [N, D2]).
        checks: (paths, token, pass_token) triples: `paths` is one file, or a tuple of one file
            per text encoder (diffusers' SDXL pair, each `{token: rows}`), or a tuple of one file
            holding every encoder's rows under its key (`{"clip_l", "clip_g"}`, read with
            safetensors or torch.load by its extension, each tensor given to
            `load_textual_inversion` with `token=`). With pass_token, `token` is given to the
            loads of whole files too; otherwise it must come from the files (diffusers layout).
        tolerance: the largest allowed absolute difference of any output.

    Returns:
        A `VerifyResult` per check (`path` its first file).

    Raises:
        UserError: diffusers refuses a file, gives any tokenizer unexpected ids, loads other rows
            into any text encoder, or an output differs by more than `tolerance`.
    """
    torch = require_torch()
    parts = tuple(np.asarray(r, dtype=np.float32) for r in (rows if isinstance(rows, (tuple, list)) else (rows,)))
    family = check_model(model_dir, parts)
    pipe = load_torch_text_pipeline(model_dir, family)
    flax = families.load_model(model_dir)
    bases = flax.spec.vocab_bases  # where each encoder's learned ids start (FLUX.1's T5: its own vocabulary's end)
    for encoder, base, ours in zip(family.encoders, bases, flax.tokenizers):
        theirs = getattr(pipe, encoder.tokenizer)
        if len(theirs) != base:
            raise UserError(f"--verify {model_dir}: PyTorch {encoder.tokenizer} has {len(theirs)} tokens, the Flax "
                            f"model {base}")
        theirs.model_max_length = ours.model_max_length  # FLUX.1's T5 context is the model's (512 / 256)
    text_params = tuple(flax.params[e.part] for e in family.encoders)
    several = len(family.encoders) > 1
    results = []
    for paths, token, pass_token in checks:
        paths = (paths,) if isinstance(paths, (str, os.PathLike)) else tuple(paths)
        # Fresh copies per check: load_textual_inversion grows each tokenizer and table in place.
        loaded = {name: copy.deepcopy(getattr(pipe, name)) for e in family.encoders for name in (e.part, e.tokenizer)}
        all_ids = {}
        for encoder, (source, load_token), want, base in zip(family.encoders, _loads(family, paths, token, pass_token),
                                                             parts, bases):
            tokenizer, text_encoder = loaded[encoder.tokenizer], loaded[encoder.part]
            try:
                pipe.load_textual_inversion(source, token=load_token, tokenizer=tokenizer, text_encoder=text_encoder)
            except (ValueError, OSError, RuntimeError) as err:
                raise UserError(f"--verify: diffusers' load_textual_inversion refused the file ({first_line(err)})") from None
            where = f" ({encoder.tokenizer}, {encoder.part})" if several else ""
            all_ids[encoder.tokenizer] = _check_loaded(tokenizer, text_encoder, token, want, base, where)
        view = type(pipe)(**dict(pipe.components, **loaded))  # the loaded copies, the rest shared
        prompt = PROMPT.format(token)
        # The ids `condition` reads: the first tokenizer's (SD, SDXL), or each tokenizer's in turn (FLUX.1).
        tokenizers = family.prompt_tokenizers(view)
        tokenizers = tokenizers if isinstance(tokenizers, (tuple, list)) else (tokenizers,)
        segments = [prompt_ids(view, t, prompt) for t in tokenizers]
        input_ids = np.concatenate(segments, axis=-1)
        names = [e.tokenizer for e in family.encoders][: len(segments)]
        for name, segment in zip(names, segments):
            if not _contains(segment[0].tolist(), all_ids[name]):
                raise UserError(f"--verify: the prompt {prompt!r} did not tokenize to the ids {all_ids[name]}")
        ids = all_ids[family.encoders[0].tokenizer]
        with torch.no_grad():
            theirs = family.reference_outputs(view, prompt)
        cond = family.condition(flax.spec, models.Compute(), text_params, input_ids.astype(np.int32), join_rows(parts))
        ours = family.our_outputs(cond)
        diffs = {name: float(np.max(np.abs(theirs[name] - np.asarray(ours[name])))) for name in theirs}
        for name, diff in diffs.items():
            if not diff <= tolerance:  # `not <=` also catches NaN
                what = "PyTorch's encode_prompt and Flax" if several else "PyTorch and Flax text encoders"
                raise UserError(
                    f"--verify {model_dir}: {what} differ by {diff:.3g} (more than {tolerance:g}) "
                    f"{f'in {name} ' if several else ''}for the prompt {prompt!r}"
                )
        results.append(VerifyResult(os.fspath(paths[0]), token, tuple(ids), max(diffs.values())))
    return results


def _check_loaded(tokenizer, text_encoder, token, rows, base, where=""):
    """The tokens' ids after diffusers loaded them; UserError unless they follow the base
    vocabulary and the text encoder's table holds exactly `rows` for them. `where` names the
    tokenizer / text encoder pair in messages (SDXL has two)."""
    tokens = placeholder_tokens(token, rows.shape[0])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(base, base + len(tokens))):
        raise UserError(f"--verify: diffusers gave {tokens} the ids {ids}{where}, "
                        f"expected {list(range(base, base + len(tokens)))}")
    table = text_encoder.get_input_embeddings().weight.detach().float().numpy()
    if table.shape[0] != base + len(tokens) or not np.array_equal(table[ids], rows):
        raise UserError(f"--verify: the rows diffusers loaded{where} differ from the embedding's rows")
    return ids


def _loads(family, paths, token, pass_token):
    """[(what to give load_textual_inversion, token=)] for each text encoder of `family`."""
    if len(paths) == len(family.encoders):  # one file per text encoder: {token: rows} each
        return [(os.fspath(path), token if pass_token else None) for path in paths]
    (path,) = paths  # one file holding every encoder's rows under its key
    path = os.fspath(path)
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = require_torch().load(path, map_location="cpu", weights_only=True)
    keys = [e.key for e in family.encoders]
    missing = [key for key in keys if key not in state]
    if missing:
        raise UserError(f"--verify: {path} has no {' or '.join(missing)} entry; not an {family.title} embedding file")
    return [(state[key], token) for key in keys]


def _contains(seq, sub):
    """`sub`'s ids appear in `seq` in their order: one after the other (CLIP), or with the pieces a
    tokenizer puts between added tokens (transformers 4's T5: "▁" before each)."""
    rest = iter(seq)
    return all(token in rest for token in sub)
