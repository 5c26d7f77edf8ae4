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


def write_model_card(config, tokens, history, files, validation_grid=None):
    """Write output_dir/README.md (and the loss curve PNG); returns the card's path.

    Args:
      config: the run's TrainConfig. tokens: the placeholder tokens.
      history: per-step records (step, loss). files: {kind: path} written so far.
      validation_grid: path of the newest validation grid, if any.
    """
    out = config.output_dir
    losses = [r["loss"] for r in history]
    curve = os.path.join(out, LOSS_CURVE)
    atomic_write(curve, png_bytes(Image.fromarray(loss_curve(losses))))
    token = tokens[0]
    name = token.strip("<>") or "embedding"
    step = history[-1]["step"] if history else 0
    final = f"{losses[-1]:.4f}" if losses else "n/a"
    rel = lambda path: os.path.relpath(path, out)  # noqa: E731
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {config.pretrained_model_name_or_path}",
        "tags: [stable-diffusion, textual-inversion, ti_flax, jax, flax]",
        "---",
        "",
        f"# Textual inversion: {token}",
        "",
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
    return atomic_write(os.path.join(out, "README.md"), "\n".join(lines).encode("utf-8"))
