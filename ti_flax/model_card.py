"""The run's README.md: what was trained, how it went, and how to use the result elsewhere."""

import os
import shlex

import numpy as np
from PIL import Image, ImageDraw

from .files import atomic_write, png_bytes
from .formats import sdxl_file_name
from .losses import describe as recipe_text

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


def write_model_card(config, tokens, history, files, validation_grid=None, learned=(), sdxl=False):
    """Write output_dir/README.md (and the loss curve PNG); returns the card's path.

    Args:
      config: the run's TrainConfig. tokens: the placeholder tokens (every concept's).
      history: per-step records (step, loss). files: {kind: path} written so far.
      validation_grid: path of the newest validation grid, if any.
      learned: with --concepts, the run's run.Learned, one per concept: the card lists each.
      sdxl: the model is SDXL: the card says how each tool loads SDXL's files (diffusers' pair,
        one file per text encoder, and the {clip_l, clip_g} file named by formats.sdxl_file_name).
    """
    if config.concepts is not None:
        return _write(config, _concepts_card(config, history, files, validation_grid, learned, sdxl), history)
    return _write(config, _single_card(config, tokens, history, files, validation_grid, sdxl), history)


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


def _concepts_card(config, history, files, validation_grid, learned, sdxl=False):
    """The card's lines for a --concepts run: a table of concepts, then how to load each."""
    out, model = config.output_dir, config.pretrained_model_name_or_path
    losses = [r["loss"] for r in history]
    recipe = recipe_text(config)  # "" with every loss-recipe flag off
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
          f"| {final('loss/' + c.tokens[0])} | `{rel(os.path.join(c.out_dir, _main_file(c.tokens[0], sdxl)))}` |"
          for c in learned],
        "",
        f"Steps {step}, learning rate {config.learning_rate:g} ({config.lr_scheduler}), batch "
        f"{config.train_batch_size} per device, resolution {config.resolution}, "
        f"{f'loss recipe: {recipe}, ' if recipe else ''}final loss "
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
    ]
    if sdxl:
        return lines + ["## Use them", "", *_sdxl_use(model, [(c.tokens[0], rel(c.out_dir)) for c in learned])]
    lines += [
        "## Use them",
        "",
        "PyTorch diffusers (each concept's folder holds its own embedding):",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        f'pipe = StableDiffusionPipeline.from_pretrained("{model}")',
        *[f'pipe.load_textual_inversion("{rel(c.out_dir)}/learned_embeds.safetensors")' for c in learned],
        f'image = pipe("a photo of {learned[0].tokens[0]}").images[0]',
        "```",
        "",
        "AUTOMATIC1111 / Forge and ComfyUI: convert each concept's folder once, for example",
        "",
        "```bash",
        *[f"python -m ti_flax.export {c.out_dir} --format a1111 --output {c.tokens[0].strip('<>') or 'embedding'}.pt"
          for c in learned],
        "```",
        "",
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


def _single_card(config, tokens, history, files, validation_grid, sdxl=False):
    """The card's lines for a run of one concept."""
    out = config.output_dir
    losses = [r["loss"] for r in history]
    recipe = recipe_text(config)  # "" with every loss-recipe flag off
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
        *([f"| loss recipe | {recipe} |"] if recipe else []),
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
    ]
    if sdxl:
        return lines + ["## Use it", "", *_sdxl_use(config.pretrained_model_name_or_path, [(token, "")])]
    lines += [
        "## Use it",
        "",
        "PyTorch diffusers:",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        f'pipe = StableDiffusionPipeline.from_pretrained("{config.pretrained_model_name_or_path}")',
        'pipe.load_textual_inversion("learned_embeds.safetensors")',
        f'image = pipe("a photo of {token}").images[0]',
        "```",
        "",
        "AUTOMATIC1111 / Forge: convert once, copy into `embeddings/`, and write its name in the prompt:",
        "",
        "```bash",
        f"python -m ti_flax.export {out} --format a1111 --output {name}.pt",
        "```",
        "",
        f"ComfyUI: `python -m ti_flax.export {out} --format comfyui --output {name}.safetensors`, copy it into "
        f"`models/embeddings/`, and write `embedding:{name}` in the prompt.",
        "",
        "JAX/Flax:",
        "",
        "```bash",
        f'python -m ti_flax.generate --pretrained_model_name_or_path {config.pretrained_model_name_or_path} \\',
        f'  --embeddings {os.path.join(out, "learned_embeds.safetensors")} --prompt "a photo of {token}"',
        "```",
        "",
    ]
    return lines


def _main_file(token, sdxl):
    """The file a concept's row in the card's table names: diffusers' file, or for SDXL the
    {clip_l, clip_g} file (diffusers' pair is two files)."""
    return sdxl_file_name(token) if sdxl else "learned_embeds.safetensors"


def _sdxl_use(model, embeddings):
    """The card's lines on loading SDXL embeddings in each tool.

    `embeddings`: (token, folder relative to the card, "" for the card's own) per embedding.
    diffusers loads its pair with two `load_textual_inversion` calls, one per text encoder;
    A1111 / Forge, ComfyUI and kohya read the one {clip_l, clip_g} file and call the embedding
    by its file name."""
    where = lambda folder, name: f"{folder}/{name}" if folder else name  # noqa: E731
    sdxl_files = [(token, where(folder, sdxl_file_name(token)), os.path.splitext(sdxl_file_name(token))[0])
             for token, folder in embeddings]
    names = ", ".join(f"`{name}`" for _, _, name in sdxl_files)
    several = len(sdxl_files) > 1
    lines = [
        f"PyTorch diffusers: two `load_textual_inversion` calls{' per concept' if several else ''}, "
        "`learned_embeds.safetensors` into the first text encoder and `learned_embeds_2.safetensors` into the second:",
        "",
        "```python",
        "from diffusers import StableDiffusionXLPipeline",
        f'pipe = StableDiffusionXLPipeline.from_pretrained("{model}")',
    ]
    for _, folder in embeddings:
        lines += [
            f'pipe.load_textual_inversion("{where(folder, "learned_embeds.safetensors")}", '
            "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
            f'pipe.load_textual_inversion("{where(folder, "learned_embeds_2.safetensors")}", '
            "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
        ]
    lines += [
        f'image = pipe("a photo of {embeddings[0][0]}").images[0]',
        "```",
        "",
        f"AUTOMATIC1111 / Forge: copy {', '.join(f'`{path}`' for _, path, _ in sdxl_files)} (SDXL's "
        f"`{{clip_l, clip_g}}` layout) into `embeddings/` and write the file name without extension ({names}) "
        "in the prompt.",
        "",
        f"ComfyUI: copy the same file{'s' if several else ''} into `models/embeddings/` and write "
        f"{', '.join(f'`embedding:{name}`' for _, _, name in sdxl_files)} in the prompt.",
        "",
        f"kohya sd-scripts: `sdxl_gen_img.py --textual_inversion_embeddings "
        f"{' '.join(shlex.quote(path) for _, path, _ in sdxl_files)}`, with {names} in the prompt.",
        "",
    ]
    return lines
