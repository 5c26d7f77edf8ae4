"""The run's README.md: what was trained, how it went, and how to use the result elsewhere."""

import os

import numpy as np
from PIL import Image, ImageDraw

from .files import atomic_write, png_bytes

LOSS_CURVE = "loss_curve.png"


def loss_curve(losses, width=640, height=320, margin=40):
    """A plain loss-vs-step plot (raw loss in grey, moving average in blue) as uint8 RGB."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin // 2, width - margin // 2, height - margin], outline="black")
    losses = np.asarray(losses, dtype=np.float64)
    if losses.size:
        lo, hi = float(np.min(losses)), float(np.max(losses))
        span = hi - lo or 1.0
        window = max(1, losses.size // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")

        def points(values, offset):
            n = max(losses.size - 1, 1)
            return [
                (margin + (i + offset) / n * (width - 1.5 * margin), height - margin - (v - lo) / span * (height - 1.5 * margin))
                for i, v in enumerate(values)
            ]

        if losses.size > 1:
            draw.line(points(losses, 0), fill=(180, 180, 180), width=1)
            draw.line(points(smooth, (window - 1) / 2), fill=(30, 90, 200), width=2)
        draw.text((margin + 4, margin // 2 + 4), f"loss {hi:.4f}", fill="black")
        draw.text((margin + 4, height - margin - 14), f"loss {lo:.4f}", fill="black")
        draw.text((width - margin - 60, height - margin + 8), f"step {losses.size}", fill="black")
    return np.asarray(image)


def write_model_card(config, tokens, history, files, validation_grid=None, learned=()):
    """Write output_dir/README.md (and the loss curve PNG); returns the card's path.

    Args:
      config: the run's TrainConfig. tokens: the placeholder tokens (every concept's).
      history: per-step records (step, loss). files: {kind: path} written so far.
      validation_grid: path of the newest validation grid, if any.
      learned: with --concepts, the run's run.Learned, one per concept: the card lists each.
    """
    if config.concepts is not None:
        return _write(config, _concepts_card(config, history, files, validation_grid, learned), history)
    return _write(config, _single_card(config, tokens, history, files, validation_grid), history)


def _write(config, lines, history):
    out = config.output_dir
    atomic_write(os.path.join(out, LOSS_CURVE), png_bytes(Image.fromarray(loss_curve([r["loss"] for r in history]))))
    return atomic_write(os.path.join(out, "README.md"), "\n".join(lines).encode("utf-8"))


def _header(config, title):
    return [
        "---",
        "library_name: diffusers",
        f"base_model: {config.pretrained_model_name_or_path}",
        "tags: [stable-diffusion, textual-inversion, ti_flax, jax, flax]",
        "---",
        "",
        f"# Textual inversion: {title}",
        "",
    ]


def _is_sdxl(files):
    """Whether the run wrote SDXL embeddings (diffusers' pair: a learned_embeds_2 file)."""
    return any(kind.split()[0] == "diffusers_2" for kind in files)


def _diffusers_lines(model, folders, sdxl):
    """PyTorch diffusers code loading the embedding in each of `folders` (relative paths)."""
    if not sdxl:
        return ["from diffusers import StableDiffusionPipeline",
                f'pipe = StableDiffusionPipeline.from_pretrained("{model}")',
                *[f'pipe.load_textual_inversion("{_join(folder, "learned_embeds.safetensors")}")' for folder in folders]]
    # SDXL: each file of the pair into its own text encoder and tokenizer.
    return ["from diffusers import StableDiffusionXLPipeline",
            f'pipe = StableDiffusionXLPipeline.from_pretrained("{model}")',
            *[line for folder in folders for line in (
                f'pipe.load_textual_inversion("{_join(folder, "learned_embeds.safetensors")}", '
                "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                f'pipe.load_textual_inversion("{_join(folder, "learned_embeds_2.safetensors")}", '
                "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)")]]


def _join(folder, name):
    return name if folder in ("", ".") else f"{folder}/{name}"


def _sdxl_file_lines(paths):
    """A1111 / Forge and ComfyUI use for SDXL: the run's {clip_l, clip_g} files as they are."""
    stem = os.path.splitext(os.path.basename(paths[0]))[0]
    what = (f"the SDXL file `{paths[0]}` as it is: copy it" if len(paths) == 1 else
            f"the SDXL files {', '.join(f'`{p}`' for p in paths)} as they are: copy each")
    return [f"AUTOMATIC1111 / Forge and ComfyUI read {what} into `embeddings/` (A1111 / Forge) or "
            f"`models/embeddings/` (ComfyUI) and write its name, `{stem}`{' for the first' if len(paths) > 1 else ''}, "
            f"in the prompt (ComfyUI: `embedding:{stem}`).", ""]


def _concepts_card(config, history, files, validation_grid, learned):
    """The card's lines for a --concepts run: a table of concepts, then how to load each."""
    out, model, sdxl = config.output_dir, config.pretrained_model_name_or_path, _is_sdxl(files)
    losses = [r["loss"] for r in history]
    step = history[-1]["step"] if history else 0
    final = lambda key: f"{history[-1][key]:.4f}" if history and key in history[-1] else "n/a"  # noqa: E731
    rel = lambda path: os.path.relpath(path, out)  # noqa: E731
    lines = _header(config, ", ".join(c.tokens[0] for c in learned)) + [
        f"{len(learned)} textual-inversion embeddings for `{model}`, trained together with ti_flax (JAX/Flax).",
        "",
        "| concept | vectors | initialized from | property | images | weight | last loss | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[f"| `{c.tokens[0]}` | {len(c.tokens)} | {c.concept.initial_embeddings or repr(c.concept.initializer_token)} "
          f"| {c.concept.learnable_property} | `{c.concept.train_data_dir}` | {c.concept.weight:g} "
          f"| {final('loss/' + c.tokens[0])} | `{rel(os.path.join(c.out_dir, 'learned_embeds.safetensors'))}` |"
          for c in learned],
        "",
        f"Steps {step}, learning rate {config.learning_rate:g} ({config.lr_scheduler}), batch "
        f"{config.train_batch_size} per device, resolution {config.resolution}, final loss "
        f"{f'{losses[-1]:.4f}' if losses else 'n/a'} (all concepts).",
        "",
        f"![loss curve]({LOSS_CURVE})",
        "",
    ]
    if validation_grid:
        lines += [f"Validation images at step {step} for *{config.validation_prompt}*:", "",
                  f"![validation]({rel(validation_grid)})", ""]
    lines += [
        "## Files",
        "",
        *[f"- `{rel(path)}` ({kind})" for kind, path in files.items() if str(path).startswith(out) and os.path.isfile(path)],
        "",
        "## Use them",
        "",
        "PyTorch diffusers (each concept's folder holds its own embedding):",
        "",
        "```python",
        *_diffusers_lines(model, [rel(c.out_dir) for c in learned], sdxl),
        f'image = pipe("a photo of {learned[0].tokens[0]}").images[0]',
        "```",
        "",
    ]
    if sdxl:
        lines += _sdxl_file_lines([rel(path) for kind, path in files.items() if kind.split()[0] == "sdxl"])
    else:
        lines += [
            "AUTOMATIC1111 / Forge and ComfyUI: convert each concept's folder once, for example",
            "",
            "```bash",
            *[f"python -m ti_flax.export {c.out_dir} --format a1111 --output {c.tokens[0].strip('<>') or 'embedding'}.pt"
              for c in learned],
            "```",
            "",
        ]
    lines += [
        "JAX/Flax:",
        "",
        "```bash",
        f"python -m ti_flax.generate --pretrained_model_name_or_path {model} \\",
        "  --embeddings " + " ".join(os.path.join(c.out_dir, "learned_embeds.safetensors") for c in learned)
        + f' --prompt "a photo of {learned[0].tokens[0]}"',
        "```",
        "",
    ]
    return lines


def _single_card(config, tokens, history, files, validation_grid):
    """The card's lines for a run of one concept."""
    out = config.output_dir
    losses = [r["loss"] for r in history]
    token = tokens[0]
    name = token.strip("<>") or "embedding"
    step = history[-1]["step"] if history else 0
    final = f"{losses[-1]:.4f}" if losses else "n/a"
    rel = lambda path: os.path.relpath(path, out)  # noqa: E731
    lines = _header(config, token) + [
        f"A textual-inversion embedding for `{config.pretrained_model_name_or_path}`, trained with ti_flax (JAX/Flax).",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| placeholder token(s) | {', '.join(f'`{t}`' for t in tokens)} |",
        f"| num_vectors | {len(tokens)} |",
        f"| initialized from | {config.initial_embeddings or repr(config.initializer_token)} |",
        f"| learnable property | {config.learnable_property} |",
        *([f"| captions | `{config.caption_extension}` files beside the images"
           f"{' (the token put in front where missing)' if config.caption_prefix_token else ''} |"]
          if config.caption_extension else []),
        f"| steps | {step} |",
        f"| learning rate | {config.learning_rate:g} ({config.lr_scheduler}{', scaled' if config.scale_lr else ''}) |",
        f"| batch | {config.train_batch_size} per device |",
        f"| resolution | {config.resolution} |",
        f"| final loss | {final} |",
        "",
        f"![loss curve]({LOSS_CURVE})",
        "",
    ]
    if validation_grid:
        lines += [f"Validation images at step {step} for *{config.validation_prompt}*:", "", f"![validation]({rel(validation_grid)})", ""]
    lines += [
        "## Files",
        "",
        *[f"- `{rel(path)}` ({kind})" for kind, path in files.items() if str(path).startswith(out) and os.path.isfile(path)],
        "",
        "## Use it",
        "",
        "PyTorch diffusers:",
        "",
        "```python",
        *_diffusers_lines(config.pretrained_model_name_or_path, ["."], _is_sdxl(files)),
        f'image = pipe("a photo of {token}").images[0]',
        "```",
        "",
    ]
    if _is_sdxl(files):
        lines += _sdxl_file_lines([rel(files["sdxl"])])
    else:
        lines += [
            "AUTOMATIC1111 / Forge: convert once, copy into `embeddings/`, and write its name in the prompt:",
            "",
            "```bash",
            f"python -m ti_flax.export {out} --format a1111 --output {name}.pt",
            "```",
            "",
            f"ComfyUI: `python -m ti_flax.export {out} --format comfyui --output {name}.safetensors`, copy it into "
            f"`models/embeddings/`, and write `embedding:{name}` in the prompt.",
            "",
        ]
    lines += [
        "JAX/Flax:",
        "",
        "```bash",
        f'python -m ti_flax.generate --pretrained_model_name_or_path {config.pretrained_model_name_or_path} \\',
        f'  --embeddings {os.path.join(out, "learned_embeds.safetensors")} --prompt "a photo of {token}"',
        "```",
        "",
    ]
    return lines
