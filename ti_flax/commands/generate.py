"""Generate images with one or more textual-inversion embeddings, in Flax.

    python -m ti_flax.generate --pretrained_model_name_or_path MODEL_DIR \\
        --embeddings out/learned_embeds.safetensors my-style.pt \\
        --prompt "a photo of <cat-toy> in the style of my-style" --num_images 4 --output_dir images

or from Python:

    >>> from ti_flax import generate
    >>> paths = generate("MODEL_DIR", "a photo of <cat-toy>", ["out/learned_embeds.safetensors"])  # doctest: +SKIP

Embeddings are read by ti_flax.formats.read_embedding: diffusers files, A1111 `.pt` /
`.safetensors`, kohya files, `.npy`, output or checkpoint-N folders. The word that stands
for an embedding in a prompt is, in this order: TOKEN when it is given as `FILE:TOKEN`, the
token the file names (the diffusers key, the A1111 `name`), or the file name without its
extension (as A1111 does). An embedding of N vectors becomes the tokens tok, tok_1, ...,
tok_{N-1}; writing tok in --prompt or --negative_prompt stands for all of them, as in
diffusers. Several embeddings can be used at once, in either prompt.

An SDXL model folder takes SDXL embeddings: diffusers' pair learned_embeds.safetensors +
learned_embeds_2.safetensors (either file, or the folder holding both), or one
`{"clip_l", "clip_g"}` file (A1111 / ComfyUI / kohya), named by its file name as A1111 does.
An empty --negative_prompt is all zeros for SDXL, and --scheduler defaults to the model's own
(euler for SDXL base), as in diffusers' StableDiffusionXLPipeline.

A FLUX.1 model (a FluxPipeline folder, or its transformer file with --clip_l, --t5xxl and --ae)
takes FLUX.1 embeddings (diffusers' pair, or one `{"clip_l", "t5xxl"}` file) and samples as
FluxPipeline does: flow-matching Euler, 28 steps at guidance 3.5 for [dev] (its embedded
guidance), 4 for [schnell], no negative prompt.

Images are written to OUTPUT_DIR/000.png, 001.png, ... (a rerun overwrites them), each
written atomically and carrying its settings in a PNG "parameters" text chunk.
"""

import argparse
import os
import sys
import warnings

import numpy as np

from ..config import TrainConfig, flags
from ..config.choices import LORA_TARGET_GROUPS, PREDICTION_TYPES, SAMPLERS
from ..errors import UserError, run_cli

MAX_SEED = 2**32 - 1


def parse_embedding_arg(arg):
    """(path, token or None) of an --embeddings entry: FILE, or FILE:TOKEN to name its token."""
    if isinstance(arg, (tuple, list)):
        path, token = arg
        return os.fspath(path), token
    arg = os.fspath(arg)
    if not os.path.exists(arg):
        head, sep, tail = arg.rpartition(":")
        if sep and head and tail and os.path.exists(head):
            return head, tail
    return arg, None


def load_concepts(tokenizers, spec, embedding_args, allow_pickle=False):
    """Read embeddings and add their tokens to the model's tokenizer(s) (in place), after the base vocabulary.

    Args:
      tokenizers: the model's CLIP tokenizer, or all of them (LoadedModel.tokenizers: SDXL's
        two, which get the same ids). spec: models.ModelSpec.
      embedding_args: paths, "FILE:TOKEN" strings or (path, token) pairs.
      allow_pickle: let read_embedding unpickle a `.npy` (trusted files only).
    Returns:
      (concepts, rows): concepts is a list of token lists, one per embedding
      ([tok, tok_1, ...]); rows is float32 [total vectors, spec.row_width] in the same order, so
      the token with id base_vocab_size + i reads rows[i] (for SDXL, the clip_l row and the
      clip_g row side by side).
    Raises:
      UserError: unreadable file, width that does not fit the model (an SD 1.x / 2.x embedding
        for an SDXL model or the reverse), token already in the vocabulary or used twice, token
        that is not one word.
      ValueError: a tokenizer already holds added tokens.
    """
    from .. import tokens as tokens_lib
    from ..formats import check_embedding_fits, read_embedding

    tokenizers = tuple(tokenizers) if isinstance(tokenizers, (tuple, list)) else (tokenizers,)
    if len(tokenizers) != len(spec.text_widths):
        raise ValueError(f"load_concepts needs every tokenizer of the model (model.tokenizers), got {len(tokenizers)}")
    if any(len(tokenizer) != base for tokenizer, base in zip(tokenizers, spec.vocab_bases)):
        raise ValueError("load_concepts needs the model's own tokenizers, with no tokens added yet")
    # Read and check every file before the tokenizers change, so an error leaves them untouched.
    concepts, rows, owners = [], [], {}
    vocab = {word for tokenizer in tokenizers for word in tokenizer.get_vocab()}
    for arg in embedding_args:
        path, token = parse_embedding_arg(arg)
        emb = read_embedding(path, token=token, allow_pickle=allow_pickle)
        token = emb.token or os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        parts = check_embedding_fits(emb, None, spec.text_widths, what=f"--embeddings {path}")
        emb_rows = tokens_lib.join_rows(parts)  # SDXL: the clip_l and clip_g rows side by side
        if not token or any(ch.isspace() for ch in token):
            raise UserError(f"--embeddings {path}: token {token!r} is not one word; name it with {path}:<token>")
        names = tokens_lib.placeholder_tokens(token, emb_rows.shape[0])
        for name in names:
            if name in owners:
                raise UserError(
                    f"--embeddings {path}: token {name!r} is also used by {owners[name]}; "
                    f"give one of them another name with FILE:<token>"
                )
            if name in vocab:
                raise UserError(
                    f"--embeddings {path}: token {name!r} is already in the tokenizer's vocabulary, so "
                    f"prompts could not reach the embedding; give it a new name with {path}:<new-token>"
                )
        owners.update((name, path) for name in names)
        concepts.append(names)
        rows.append(emb_rows)
    for names in concepts:
        try:
            # Ids follow the base vocabulary in order, so token id base + i reads rows[i]: the same
            # ids in each tokenizer, each after its own vocabulary (SDXL: the same ids).
            tokens_lib.add_to_tokenizers(tokenizers, names)
        except UserError as err:
            raise UserError(f"--embeddings {owners[names[0]]}: {err}") from None
    rows = np.concatenate(rows) if rows else np.zeros((0, spec.row_width), np.float32)
    return concepts, rows


def generate(pretrained_model_name_or_path, prompt, embeddings=(), negative_prompt="", num_images=4, steps=None,
             guidance_scale=None, seed=0, height=None, width=None, scheduler=None, output_dir="generated",
             allow_pickle=False, devices=None, compilation_cache=True, prediction_type=None, zero_terminal_snr=None,
             vae=None, separate=None, lora=None, lora_scale=1.0):
    """Generate images from `prompt` with the given embeddings and save them as PNG files.

    Args:
      pretrained_model_name_or_path: a Stable Diffusion 1.x / 2.x, SDXL or FLUX.1 folder, Hub id, or
        one original SD 1.x/2.x or SDXL checkpoint file (`.safetensors`; `.ckpt` with allow_pickle),
        or FLUX.1's transformer file (with `separate`).
      prompt, negative_prompt: the texts; either may use the embeddings' tokens (FLUX.1 takes no
        negative prompt: it is guidance-distilled).
      embeddings: paths, "FILE:TOKEN" strings or (path, token) pairs (see the module docstring);
        SDXL embeddings for an SDXL model.
      num_images, steps, guidance_scale, seed: sampling settings; the same seed and settings give
        the same images whatever the number of devices. steps, guidance_scale: None for the
        family's pipeline's (25 steps at 7.5; FLUX.1 [dev] 28 at 3.5, [schnell] 4).
      height, width: pixels, multiples of 8; default: the model's native size.
      scheduler: one of "pndm", "ddim", "dpm" (DPM-Solver++ multistep), "euler"; None: "pndm" for
        SD 1.x / 2.x (with zero terminal SNR: ddim, euler for epsilon models), the model's own
        scheduler for SDXL (see sampler.default_scheduler).
      output_dir: where 000.png, 001.png, ... are written.
      allow_pickle: allow reading a pickled `.npy` embedding or `.ckpt` model (trusted files only).
      devices: the local devices to split images over (default: all).
      compilation_cache: keep compiled programs on disk for the next call (see
        ti_flax.training.compile_cache); False is `--no_compilation_cache`.
      prediction_type: "epsilon" or "v_prediction" instead of the model's scheduler config (a
        single file: its v_pred key, else epsilon; v_prediction for SD 2.x 768-v files).
      zero_terminal_snr: True samples on the schedule rescaled to zero terminal SNR, with trailing
        timesteps; False never; None: as the model says (its scheduler config, a file's ztsnr key).
      vae: another VAE to decode with (--pretrained_vae_model_name_or_path): an AutoencoderKL folder
        or Hub id, or one VAE file in the original layout.
      separate: FLUX.1 kept as files: {"clip_l", "t5xxl", "ae", "t5xxl_tokenizer"} paths (kohya's
        --clip_l, --t5xxl, --ae), with its transformer file as pretrained_model_name_or_path.
      lora: a LoRA file of the UNet (pivotal tuning's `pytorch_lora_weights.safetensors`, or the
        kohya-layout `<token>_lora.safetensors`, whose bundled embedding is not read: pass the
        embedding in `embeddings`). lora_scale: its weight (diffusers' `scale`, A1111's
        `<lora:name:weight>`; default 1).
    Returns:
      The paths of the images written, in order.
    Raises:
      UserError: on bad input, before anything is written.

    Example:
        >>> import ti_flax
        >>> ti_flax.generate("runwayml/stable-diffusion-v1-5", "a photo of <cat-toy> on a beach",
        ...                  ["out/learned_embeds.safetensors"], num_images=2, output_dir="images")  # doctest: +SKIP
        ['images/000.png', 'images/001.png']
    """
    from .. import families, files
    from ..data.prompts import CUT, encode_prompt
    from ..sampling.sampler import Sampler
    from ..training import compile_cache

    # Checks that need no model come first, so a typo fails fast.
    if num_images < 1:
        raise UserError(f"--num_images {num_images}: must be at least 1")
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: must be at least 1")
    for flag, size in (("--height", height), ("--width", width)):
        if size is not None and (size <= 0 or size % 8):
            raise UserError(f"{flag} {size}: must be a positive multiple of 8")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed}: must be between 0 and {MAX_SEED}")
    if guidance_scale is not None and not np.isfinite(guidance_scale):
        raise UserError(f"--guidance_scale {guidance_scale}: must be a finite number")
    if scheduler is not None and scheduler not in SAMPLERS:
        raise UserError(f"--scheduler {scheduler!r}: choose one of {', '.join(SAMPLERS)}")
    if not np.isfinite(lora_scale):
        raise UserError(f"--lora_scale {lora_scale}: must be a finite number")
    if isinstance(embeddings, (str, os.PathLike)):
        embeddings = [embeddings]
    compile_cache.configure(enabled=compilation_cache)
    model = families.load_model(pretrained_model_name_or_path, prediction_type=prediction_type, allow_pickle=allow_pickle,
                                zero_terminal_snr=zero_terminal_snr, vae=vae, separate=separate)
    family = families.of(model.spec)
    if negative_prompt and not family.negative_prompt:
        raise UserError(f"--negative_prompt: {family.title} samples without one (it is guidance-distilled); drop it")
    default_steps, default_guidance = family.sampling_defaults(model.spec)
    steps = default_steps if steps is None else steps
    guidance_scale = default_guidance if guidance_scale is None else guidance_scale
    concepts, rows = load_concepts(model.tokenizers, model.spec, embeddings, allow_pickle)
    lora_pair = None
    if lora:
        from ..formats import lora as lora_files

        shapes = family.lora_targets(model.spec, tuple(LORA_TARGET_GROUPS))
        lora_pair = (lora_files.read(lora, shapes, family.kohya_lora_names(model.spec, shapes)), float(lora_scale))
    sampler = Sampler.from_model(model, num_images=num_images, num_inference_steps=steps, guidance_scale=guidance_scale,
                                 height=height, width=width, scheduler=scheduler, devices=devices)
    tokenizers = families.of(model.spec).prompt_tokenizers(model)
    prompt_ids = encode_prompt(tokenizers, prompt, concepts, overflow=CUT)
    negative_ids = encode_prompt(tokenizers, negative_prompt, concepts, overflow=CUT)
    for names in concepts:
        first = model.tokenizer.convert_tokens_to_ids(names[0])
        if first not in prompt_ids and first not in negative_ids:
            warnings.warn(f"embedding token {names[0]} appears in neither --prompt nor --negative_prompt", stacklevel=2)
    images = sampler.sample(rows, prompt_ids, negative_ids, seed, lora=lora_pair)
    parameters = (
        f"{prompt}\nNegative prompt: {negative_prompt}\nSteps: {steps}, Sampler: {sampler.settings.scheduler}, "
        f"CFG scale: {guidance_scale}, Seed: {seed}, Size: {sampler.width}x{sampler.height}, "
        f"Model: {pretrained_model_name_or_path}, Embeddings: {', '.join(n[0] for n in concepts) or 'none'}"
        + (f", Lora: {os.path.basename(lora)} ({lora_scale:g})" if lora else "")
    )
    written = []
    for i, image in enumerate(images):
        try:
            written.append(files.atomic_write(
                os.path.join(output_dir, f"{i:03d}.png"), _png_writer(image, f"{parameters}, Image: {i}")))
        except files.WriteFailed as err:  # the images already written stay, and are named
            raise err.with_saved(written) from None
    return written


def _png_writer(image, parameters):
    from PIL import Image, PngImagePlugin

    from .. import files

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)  # where A1111 and others look for generation settings
    return files.png_bytes(Image.fromarray(image), pnginfo=info)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ti-flax-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="Stable Diffusion 1.x/2.x, SDXL or FLUX.1 folder, Hub id, or one original SD 1.x/2.x or "
                        "SDXL .safetensors file, or FLUX.1's transformer file (with --clip_l, --t5xxl, --ae)")
    parser.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=None,
                        help="the model's target instead of its scheduler config's "
                        "(single files: their v_pred key, else epsilon)")
    parser.add_argument("--zero_terminal_snr", action="store_const", const=True, default=None,
                        help="sample on the noise schedule rescaled to zero terminal SNR, with trailing timesteps "
                        "(default: as the model says: its scheduler config, or a single file's ztsnr key)")
    parser.add_argument("--no_zero_terminal_snr", dest="zero_terminal_snr", action="store_const", const=False,
                        help="sample on the model's plain schedule even where it asks for zero terminal SNR")
    parser.add_argument("--pretrained_vae_model_name_or_path", help="another VAE instead of the model's, as diffusers' scripts' flag and kohya's --vae: an AutoencoderKL folder or Hub id (e.g. an fp16-fix VAE), or one VAE file in the original layout (A1111's models/VAE)")
    flags.add_arguments(parser, TrainConfig, only=(flags.MODEL_FILES,))  # FLUX.1's --clip_l, --t5xxl, --ae, ...
    parser.add_argument("--embeddings", nargs="+", default=[], metavar="FILE[:TOKEN]",
                        help="embedding files or folders; FILE:TOKEN names the token used in prompts")
    parser.add_argument("--lora", default=None, metavar="FILE",
                        help="a LoRA of the UNet: pivotal tuning's pytorch_lora_weights.safetensors or "
                             "<token>_lora.safetensors (kohya's layout; pass its embedding with --embeddings)")
    parser.add_argument("--lora_scale", type=float, default=1.0,
                        help="the LoRA's weight (diffusers' scale, A1111's <lora:name:weight>; default 1)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative_prompt", default="", help="may use embedding tokens too")
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: 25; FLUX.1 [dev] 28, [schnell] 4, as FluxPipeline)")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="default: 7.5; FLUX.1 [dev] 3.5 (its embedded guidance, FluxPipeline's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    parser.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    parser.add_argument("--scheduler", choices=SAMPLERS, default=None,
                        help="default: pndm (zero terminal SNR: ddim, euler for epsilon models); for SDXL the model's own scheduler "
                        "(euler for SDXL base)")
    parser.add_argument("--output_dir", default="generated", help="where 000.png, 001.png, ... are written")
    parser.add_argument("--allow_pickle", "--allow-pickle", action="store_true",
                        help="allow reading a pickled .npy embedding or .ckpt model "
                        "(it can run code: trusted files only)")
    parser.add_argument("--no_compilation_cache", action="store_true",
                        help="do not keep compiled programs on disk for the next run (default: in "
                        "$XDG_CACHE_HOME/ti_flax/jax_cache, or $JAX_COMPILATION_CACHE_DIR if set)")
    return parser


def model_files(args):
    """{flag: path} of the MODEL_FILES flags on a parsed command line (FLUX.1's parts apart)."""
    return {name: getattr(args, name) for name, declared, _ in flags.flags(TrainConfig)
            if declared.group == flags.MODEL_FILES}


def main(argv=None):
    args = build_parser().parse_args(argv)
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        code = run_cli(lambda: paths.extend(generate(
            args.pretrained_model_name_or_path, args.prompt, args.embeddings, args.negative_prompt,
            args.num_images, args.steps, args.guidance_scale, args.seed, args.height, args.width,
            args.scheduler, args.output_dir, args.allow_pickle, compilation_cache=not args.no_compilation_cache,
            prediction_type=args.prediction_type, zero_terminal_snr=args.zero_terminal_snr,
            vae=args.pretrained_vae_model_name_or_path, separate=model_files(args), lora=args.lora,
            lora_scale=args.lora_scale,
        )))
    for path in paths:
        print(path)
    return code
