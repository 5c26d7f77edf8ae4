"""Learned rows -> embedding files that other Stable Diffusion tools load.

`export_embedding` (and `python -m ti_flax.export`, console script `ti-flax-export`) converts
any embedding `ti_flax.formats.read_embedding` understands into the layout of diffusers, A1111
or kohya / ComfyUI (the layouts themselves live in `ti_flax.formats`), reads every file back
before reporting success, and with `verify=MODEL_DIR` checks it in PyTorch diffusers against
the Flax text encoder(s).

SDXL embeddings (rows for two text encoders) convert between SDXL's two layouts only: `sdxl`,
the one `{"clip_l", "clip_g"}` file A1111 / Forge, ComfyUI and kohya read, and
`diffusers-sdxl`, diffusers' two files learned_embeds.safetensors + learned_embeds_2.safetensors.

Every file is written to a temporary name in the destination folder and renamed into place
only when complete and checked, so a crash never leaves a half-written embedding behind.

Example:
    ti-flax-export out/checkpoint-500 --format a1111 --output embeddings/
    ti-flax-export sd-flax-out --token '<cat-toy>' --output cat-toy.safetensors --format kohya
    ti-flax-export sd-flax-out/learned_embeds.npy --allow-pickle --output out/ --verify MODEL_DIR
    ti-flax-export sdxl-out/ --format sdxl --output embeddings/cat-toy.safetensors
    ti-flax-export embeddings/cat-toy.safetensors --format diffusers-sdxl --token '<cat-toy>' --output sdxl-out/
"""

import argparse
import contextlib
import os
import re
import secrets
import sys

import numpy as np

from .. import files, formats
from ..config import choices
from ..errors import UserError, run_cli
from ..formats import DIFFUSERS_BIN, read_embedding

# --format's values: the layouts ti_flax writes, as registered in ti_flax.formats, then other
# tools' names for them (comfyui reads kohya's layout); and their row of the "Choices" table (docs/flags.md).
# Pivotal tuning's LoRA files (export_lora), beside the embedding layouts: --format's last values.
LORA_FORMATS = ("lora-kohya", "lora-diffusers")
FORMATS = (*formats.names(writable=True), *formats.ALIASES, *LORA_FORMATS)
FORMAT_CHOICE = choices.Choice("--format (ti_flax.export)", FORMATS, "diffusers")


# --------------------------------------------------------------------------------------------
# Export


def export_embedding(source, output, format="diffusers", token=None, name=None, allow_pickle=False,
                     overwrite=False, bin=False, verify=None, log=None):
    """Convert an embedding in any layout into the layout another tool loads.

    Args:
        source: anything `ti_flax.formats.read_embedding` reads: an output or checkpoint-N
            folder, a pipeline folder (with `token`), a `learned_embeds.npy` (with
            `allow_pickle`), a diffusers, A1111 or kohya file, or an SDXL embedding (a
            clip_l / clip_g file, or diffusers' pair of files or their folder).
        output: the file to write, or a folder (then `learned_embeds.safetensors` for
            diffusers, `NAME.pt` for a1111, `NAME.safetensors` for kohya / comfyui / sdxl,
            and learned_embeds.safetensors + learned_embeds_2.safetensors for diffusers-sdxl).
        format: "diffusers", "a1111", "kohya" or "comfyui" (kohya's layout) for SD 1.x / 2.x
            embeddings; "sdxl" or "diffusers-sdxl" (two files) for SDXL embeddings.
        token: the token (picks the rows of a pipeline folder; renames the token otherwise).
        name: the A1111 embedding name and default file name (default: token without <>).
        allow_pickle: allow reading a pickled `.npy`; unpickling can run code, trusted files only.
        overwrite: replace existing output files instead of refusing.
        bin: with format "diffusers", also write `learned_embeds.bin` (needs torch).
        verify: a Stable Diffusion model folder: load each written file with diffusers'
            PyTorch `load_textual_inversion` and compare text-encoder outputs with Flax (an
            SDXL embedding: into both text encoders of a `StableDiffusionXLPipeline`, comparing
            its `encode_prompt` outputs).
        log: called with one line per file written and per verification, e.g. `print`.

    Returns:
        The list of paths written (two for diffusers-sdxl, and for diffusers with `bin`).

    Raises:
        UserError: on any bad input, an SDXL embedding for an SD 1.x / 2.x format or the
            reverse, or a `verify` model of another kind or width than the embedding, or a
            failed verification; nothing is written then.

    Example:
        >>> import ti_flax
        >>> ti_flax.export("out/learned_embeds.safetensors", "embeddings/", format="a1111")  # doctest: +SKIP
        ['embeddings/cat-toy.pt']
        >>> ti_flax.export("learned_embeds.npy", "out/", allow_pickle=True)  # doctest: +SKIP
        ['out/learned_embeds.safetensors']
    """
    layout = _layout_name(format)
    if bin and layout != "diffusers":
        raise UserError(f"--bin writes {DIFFUSERS_BIN}, the diffusers layout; it does not go with --format {format}")
    if token is not None:
        _check_token(token)
    emb = read_embedding(source, token=token, allow_pickle=allow_pickle)
    target = formats.get(layout)
    formats.check_fits(target, emb, f"--format {format}")
    token = emb.token
    if target.token_from == "token" and token is None:
        raise UserError(f"{emb.path}: the {emb.format} file does not name its token; pass --token, e.g. --token '<my-concept>'")
    name = name or _default_name(token, output)
    # Each file to write and the embedding it holds (diffusers' SDXL pair: one text encoder each).
    pieces = [piece for path in _output_paths(output, layout, name, bin) for piece in target.pieces(path, emb)]
    for path, _ in pieces:
        if os.path.isdir(path):
            raise UserError(f"{path}: is a folder; pass a file name or its parent folder as --output")
        if os.path.exists(path) and not overwrite:
            raise UserError(f"{path}: already exists; pass --overwrite to replace it")
    if verify is not None:
        from . import verify as verify_lib

        verify_lib.require_torch()
        verify_lib.check_model(verify, tuple(emb.parts.values()))
    return _write_checked(pieces, layout, emb, token, name, verify, log or (lambda line: None))


def export_lora(source, output, format="lora-kohya", model=None, embedding=None, token=None, overwrite=False,
                log=None):
    """Convert pivotal tuning's LoRA between diffusers' PEFT layout and kohya's (formats/lora.py).

    Args:
        source: a LoRA file in either layout (`pytorch_lora_weights.safetensors`,
            `<token>_lora.safetensors`; a kohya file's bundled embedding is not carried over).
        output: the file to write (a folder: `pytorch_lora_weights.safetensors` for
            lora-diffusers, the source's name for lora-kohya).
        format: "lora-kohya" (A1111 / Forge, ComfyUI, kohya) or "lora-diffusers" (diffusers'
            `load_lora_weights`).
        model: the model the LoRA was trained on (its folder or file): its modules' names and shapes.
        embedding: with lora-kohya, an embedding file to bundle (as A1111 reads it), under `token`
            (default: the token the file names, else its name without the extension).
        overwrite: replace an existing output file.
    Returns:
        [the path written]. The file is read back and checked against the source's factors.
    Raises:
        UserError: no --model, a LoRA of another model, an output that exists.
    """
    from .. import families
    from ..config.choices import LORA_TARGET_GROUPS
    from ..formats import lora as lora_files

    if format not in LORA_FORMATS:
        raise UserError(f"--format {format!r}: a LoRA converts to one of {', '.join(LORA_FORMATS)}")
    if not model:
        raise UserError(f"--format {format}: pass --model, the model the LoRA was trained on (its modules' names)")
    if embedding is not None and format != "lora-kohya":
        raise UserError("--embedding: only kohya's layout bundles an embedding; diffusers loads it on its own")
    from ..models import pretrained

    # A folder's configs say its modules; a single file is loaded to know them.
    spec = families.load_model(model).spec if pretrained.is_single_file(model) else families.read_spec(model)[0]
    family = families.of(spec)
    shapes = family.lora_targets(spec, tuple(LORA_TARGET_GROUPS))
    names = family.kohya_lora_names(spec, shapes)
    factors = lora_files.read(source, shapes, names)  # alpha / rank folded into lora_B
    if os.path.isdir(output):
        output = os.path.join(output, lora_files.DIFFUSERS_FILE if format == "lora-diffusers"
                              else os.path.basename(source))
    if os.path.exists(output) and not overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to replace it")
    if format == "lora-diffusers":
        tensors, metadata = lora_files.diffusers_tensors(factors, 1.0), None
    else:
        rank = next(iter(factors.values()))["lora_A"].shape[0]
        # The scale is folded into lora_up: alpha = rank says so to every reader.
        tensors = lora_files.kohya_tensors(factors, float(rank), {m: names[m] for m in factors})
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                    "ss_base_model_version": family.kohya_base_model}
        if embedding is not None:
            emb = read_embedding(embedding, token=token)
            name = token or emb.token or os.path.splitext(os.path.basename(embedding))[0]
            tensors.update(lora_files.bundle(name, list(emb.parts.values())))
    lora_files.save(output, tensors, metadata)
    back = lora_files.read(output, shapes, names)
    if set(back) != set(factors) or any(not np.allclose(back[m][k], factors[m][k], rtol=1e-6, atol=0)
                                         for m in factors for k in factors[m]):
        raise UserError(f"{output}: does not read back as the source's LoRA")
    (log or (lambda line: None))(f"wrote {output} ({format}, {len(factors)} modules)")
    return [output]


def _write_checked(pieces, layout, emb, token, name, verify, log):
    """Stage every file, read each back, verify, then rename all into place (or none).

    `pieces`: [(path, the embedding that file holds)]."""
    target = formats.get(layout)
    said = target.token_from  # what a file in this layout calls the embedding, if anything
    paths = [path for path, _ in pieces]
    staged = []
    try:
        for path, piece in pieces:
            with files.writing(path):  # disk full, read-only...: one line naming `path`
                tmp = _staging_name(path)
                staged.append(tmp)
                target.write_file(tmp, piece, name)
            formats.check_written(tmp, path, piece, target.token_on_reload(token, name))
        results = []
        if verify is not None:
            from . import verify as verify_lib

            # diffusers-layout files carry their token; the others need token= (A1111's name may
            # be an ordinary word already in the vocabulary).
            verify_token, pass_token = token or verify_lib.VERIFY_TOKEN, said != "token"
            parts = tuple(emb.parts.values())
            if len(parts) > 1:  # one embedding in all the staged files (diffusers' pair, or the one clip_l/clip_g file)
                checks = [(tuple(staged), verify_token, pass_token)]
            else:
                checks = [(tmp, verify_token, pass_token) for tmp in staged]
            results = verify_lib.verify_files(verify, parts, checks)
        renamed = []
        for tmp, path in zip(staged, paths):
            try:
                with files.writing(path):
                    files.give_default_permissions(tmp)
                    os.replace(tmp, path)
            except files.WriteFailed as err:
                raise err.with_saved(renamed) from None
            renamed.append(path)
    finally:
        for tmp in staged:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    label = f", {said} {token if said == 'token' else name}" if said else ""
    for path, piece in pieces:
        log(f"wrote {path}: {layout} layout, {piece.shape_text()}{label} (from {emb.format} {emb.path})")
    verified = [" + ".join(paths)] if len(emb.parts) > 1 else paths  # what each result is about
    for what, result in zip(verified, results):
        log(f"verified {what} in diffusers (PyTorch) as {result.token} (ids {list(result.token_ids)}): "
            f"max abs difference to Flax {result.max_abs_diff:.2e}")
    return list(paths)


def _staging_name(path):
    # Keep the extension last: readers and diffusers pick the loader by it.
    folder, base = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(base)
    return os.path.join(folder, f".{stem}.{secrets.token_hex(4)}.tmp{ext}")


def _layout_name(format):
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: unknown; choose one of {', '.join(FORMATS)}")
    if format in LORA_FORMATS:
        raise UserError(f"--format {format}: converts a LoRA file (ti_flax.export's export_lora), not an embedding")
    return formats.ALIASES.get(format, format)


def _check_token(token):
    if not token.strip() or any(ch.isspace() for ch in token):
        raise UserError(f"--token {token!r}: must be one word without spaces, like <cat-toy>")


def _default_name(token, output):
    if token and token.strip("<>"):
        return token.strip("<>")
    if os.path.splitext(output)[1].lower() in (".pt", ".safetensors", ".bin") and not os.path.isdir(output):
        return os.path.splitext(os.path.basename(output))[0]
    return None


def _output_paths(output, layout, name, bin):
    output = os.fspath(output)
    ext = os.path.splitext(output)[1].lower()
    target = formats.get(layout)
    extensions = target.extensions
    if os.path.isdir(output) or not ext:
        if target.folder_file:
            base = os.path.join(output, target.folder_file)
        elif name is None:
            raise UserError(f"--output {output}: a folder, and the embedding has no name to call the file by; pass --name or --token")
        elif not re.fullmatch(r"[\w.\- ]+", name):
            raise UserError(f"--name {name!r}: use letters, digits, '.', '-', '_' or spaces for a file name")
        else:
            base = os.path.join(output, name + extensions[0])
    elif ext not in extensions:
        raise UserError(f"--output {output}: a {layout} file ends in {' or '.join(extensions)}, not {ext}")
    else:
        base = output
    if not bin or base.endswith(".bin"):
        return [base]
    return [base, os.path.splitext(base)[0] + ".bin"]  # learned_embeds.safetensors -> learned_embeds.bin


# --------------------------------------------------------------------------------------------
# Command line


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ti-flax-export",
        description="Convert a textual-inversion embedding to the layout diffusers, A1111 or kohya / ComfyUI load "
        "(SDXL embeddings: between the clip_l / clip_g file and diffusers' pair of files).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Example:", 1)[1],
    )
    parser.add_argument("source", help="output or checkpoint-N folder, pipeline folder (with --token), "
                        "learned_embeds.npy (with --allow-pickle), a diffusers / A1111 / kohya file, or an SDXL "
                        "clip_l / clip_g file or diffusers' SDXL pair (its folder)")
    parser.add_argument("--output", "-o", required=True, help="file to write, or a folder for the default file name")
    parser.add_argument("--format", default="diffusers", help=f"one of {', '.join(FORMATS)} (default diffusers)")
    parser.add_argument("--token", default=None, help="the learned token: picks it in a pipeline folder, renames it otherwise")
    parser.add_argument("--name", default=None, help="A1111 name and default file name (default: the token without <>)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a pickled .npy (diffusers' Flax script output); pickle can run code, "
                        "so only use this for files you trust")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--bin", action="store_true", help=f"with --format diffusers, also write {DIFFUSERS_BIN} (needs torch)")
    parser.add_argument("--verify", metavar="MODEL_DIR", default=None,
                        help="load the written file in PyTorch diffusers from MODEL_DIR and compare with Flax (needs torch)")
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="with --format lora-kohya / lora-diffusers: the model the LoRA was trained on")
    parser.add_argument("--embedding", default=None, metavar="FILE",
                        help="with --format lora-kohya: an embedding file to bundle in the LoRA (A1111 reads it)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.format in LORA_FORMATS:
        return run_cli(lambda: export_lora(args.source, args.output, format=args.format, model=args.model,
                                           embedding=args.embedding, token=args.token, overwrite=args.overwrite,
                                           log=print))
    if args.model or args.embedding:
        print(f"error: --model and --embedding go with --format {' or '.join(LORA_FORMATS)}", file=sys.stderr)
        return 2
    return run_cli(lambda: export_embedding(
        args.source, args.output, format=args.format, token=args.token, name=args.name,
        allow_pickle=args.allow_pickle, overwrite=args.overwrite, bin=args.bin, verify=args.verify, log=print,
    ))


def export(source, output, **kwargs):
    """`ti_flax.export(...)`: `export_embedding` (see there for the arguments), or `export_lora`
    with a `format` of LORA_FORMATS."""
    if kwargs.get("format") in LORA_FORMATS:
        return export_lora(source, output, **kwargs)
    return export_embedding(source, output, **kwargs)
