"""The run's README.md: what was trained, how it went, and how to use the result elsewhere."""

import io
import os
from typing import NamedTuple, Optional

from ..files import atomic_write
from .losses import describe as recipe_text

LOSS_PLOT = "loss.png"
PLOT_INCHES, PLOT_DPI = (8, 4), 100  # loss.png is 800 x 400 pixels


class Stopping(NamedTuple):
    """What the card shows of --early_stopping: the deterministic loss of each evaluation
    ({"step", "loss"[, "ratio"]} records), the early_stopping.Stop that ended the run (or None),
    and the run's planned steps."""

    records: tuple
    stop: Optional[object]
    total_steps: int

    @classmethod
    def of(cls, early, total_steps):
        """From the run's actions.EarlyStop (None without --early_stopping: None)."""
        return None if early is None else cls(tuple(early.records), early.end.stop, total_steps)

    def sentence(self):
        """One sentence: where and why the run stopped, or that it took every step."""
        if self.stop is not None:
            return (f"Stopped early at step {self.stop.step} of {self.total_steps} (`--early_stopping dvar`): "
                    f"{self.stop.reason()}.")
        ratios = [r["ratio"] for r in self.records if "ratio" in r]
        last = f" (last variance ratio {ratios[-1]:.3g})" if ratios else ""
        return f"`--early_stopping dvar` did not stop the run: it took all {self.total_steps} steps{last}."


def smoothed(values, span):
    """An exponential moving average of `values` with alpha = 2 / (span + 1), debiased as
    TensorBoard's smoothing is: the first averages are divided by 1 - (1 - alpha)^k, so the line
    starts at the first value instead of rising from 0."""
    alpha, average, out = 2.0 / (span + 1), 0.0, []
    for k, value in enumerate(values, 1):
        average = (1 - alpha) * average + alpha * value
        out.append(average / (1 - (1 - alpha) ** k))
    return out


def loss_plot(history, validation_losses=(), save_steps=0, stopping=None):
    """loss.png's bytes: the training loss of each optimizer update (faint), its smoothed line (`smoothed`
    over a twentieth of the steps), the validation loss of each evaluation and, with
    --save_steps, a dotted line at each step whose embedding was saved; with --early_stopping the
    deterministic loss and a dashed line where it stopped the run.

    Args:
      history: per-step records (step, loss). validation_losses: {"step", "loss", ...} records
        (with several concepts, "loss/<token>" too). save_steps: the run's --save_steps.
      stopping: a Stopping, or None.
    """
    # Imported here: only drawing needs matplotlib; its Agg canvas leaves pyplot's backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps, losses = [r["step"] for r in history], [r["loss"] for r in history]
    if steps:
        span = max(1, len(steps) // 20)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="training loss")
        ax.plot(steps, smoothed(losses, span), color="tab:blue", linewidth=2,
                label=f"training loss, moving average (span {span})")
        for i, step in enumerate(s for s in steps if save_steps and s % save_steps == 0):
            ax.axvline(step, color="grey", linestyle=":", linewidth=1, label="embedding saved" if i == 0 else None)
    if validation_losses:
        ax.plot([r["step"] for r in validation_losses], [r["loss"] for r in validation_losses], "o-",
                color="tab:orange", label="validation loss")
        for name in sorted({k for r in validation_losses for k in r if k.startswith("loss/")}):
            points = [(r["step"], r[name]) for r in validation_losses if name in r]
            ax.plot(*zip(*points), ".--", linewidth=1, label=f"validation {name}")
    if stopping is not None and stopping.records:
        ax.plot([r["step"] for r in stopping.records], [r["loss"] for r in stopping.records], color="tab:green",
                linewidth=1.2, label="deterministic loss (--early_stopping)")
    if stopping is not None and stopping.stop is not None:
        ax.axvline(stopping.stop.step, color="tab:red", linestyle="--", linewidth=1,
                   label=f"stopped early (step {stopping.stop.step})")
    if not steps and not validation_losses:
        ax.text(0.5, 0.5, "no steps in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer update (step)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_model_card(config, tokens, history, files, family, validation_grid=None, learned=(),
                     validation_losses=(), stopping=None):
    """Write output_dir/README.md and the loss plot it shows (loss.png, see `loss_plot`); returns
    the card's path.

    Args:
      config: the run's TrainConfig. tokens: the placeholder tokens (every concept's).
      history: per-step records (step, loss). files: {kind: path} written so far.
      family: the model's families.ModelFamily: the card says how each tool loads its files
        (`ModelFamily.usage_lines`).
      validation_grid: path of the newest validation grid, if any.
      learned: with --concepts, the run's run.Learned, one per concept: the card lists each.
      validation_losses: the --validation_loss_steps records ({"step", "loss", ...}), if any.
      stopping: with --early_stopping, a Stopping: the card says where and why the run stopped.
    """
    if config.concepts is not None:
        lines = _concepts_card(config, history, files, validation_grid, learned, family, validation_losses, stopping)
    else:
        lines = _single_card(config, tokens, history, files, validation_grid, family, validation_losses, stopping)
    out = config.output_dir
    atomic_write(os.path.join(out, LOSS_PLOT), loss_plot(history, validation_losses, config.save_steps, stopping))
    return atomic_write(os.path.join(out, "README.md"), "\n".join(lines).encode("utf-8"))


def _loss_figure(config, validation_losses, stopping=None):
    """The card's lines showing loss.png, and what it shows."""
    what = "Training loss per optimizer update (faint) and its moving average"
    if validation_losses:
        last = validation_losses[-1]
        what += (f"; the validation loss of fixed examples every {config.validation_loss_steps} updates "
                 f"(last {last['loss']:.4f}, at step {last['step']})")
    if stopping is not None:
        what += f"; the deterministic loss of `--early_stopping` every {config.early_stopping_every} update(s)"
    if config.save_steps:
        what += f"; dotted lines: the embeddings saved every {config.save_steps} updates"
    stopped = [] if stopping is None else [stopping.sentence(), ""]
    return [*stopped, f"![loss per optimizer update]({LOSS_PLOT})", "", what + ".", ""]


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


def _concepts_card(config, history, files, validation_grid, learned, family, validation_losses=(), stopping=None):
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
          f"| {final('loss/' + c.tokens[0])} | `{rel(os.path.join(c.out_dir, family.embedding_file(c.tokens[0])))}` |"
          for c in learned],
        "",
        f"Steps {step}, learning rate {config.learning_rate:g} ({config.lr_scheduler}), batch "
        f"{config.train_batch_size} per device, resolution {config.resolution}{_buckets_note(config)}, "
        f"{f'loss recipe: {recipe}, ' if recipe else ''}final loss "
        f"{f'{losses[-1]:.4f}' if losses else 'n/a'} (all concepts).",
        "",
        *[line for note in rows_notes(config) for line in (note[0].upper() + note[1:] + ".", "")],
        *_loss_figure(config, validation_losses, stopping),
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
    embeddings = [(c.tokens[0], c.out_dir, rel(c.out_dir)) for c in learned]
    return lines + ["## Use them", "", *_lora_lines(config, files), *family.usage_lines(model, embeddings)]


def rows_notes(config):
    """What the card says about the rows after each update: a sentence each for the norm
    control and the EMA that are on (none with both off)."""
    notes = []
    target = ("the median row norm of the text encoder's token table" if config.norm_targets is None
              else f"{' / '.join(f'{t:g}' for t in config.norm_targets)}")
    if config.embedding_norm == "preserve":
        notes.append(f"each vector rescaled to norm {target} after every update (`--embedding_norm preserve`)")
    elif config.embedding_norm_decay:
        notes.append(f"each vector's norm pulled {config.embedding_norm_decay:g} of the way to {target} after every "
                     "update (`--embedding_norm_decay`)")
    if config.use_ema:
        notes.append(f"the embeddings are the exponential moving average of the learned rows (`--use_ema`, decay "
                     f"{config.ema_decay:g}), and so are the validation images")
    return notes


def _single_card(config, tokens, history, files, validation_grid, family, validation_losses=(), stopping=None):
    """The card's lines for a run of one concept."""
    out = config.output_dir
    losses = [r["loss"] for r in history]
    recipe = recipe_text(config)  # "" with every loss-recipe flag off
    token = tokens[0]
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
        f"| resolution | {config.resolution}{_buckets_note(config)} |",
        *[f"| learned rows | {note} |" for note in rows_notes(config)],
        *([f"| loss recipe | {recipe} |"] if recipe else []),
        f"| final loss | {final} |",
        "",
        *_loss_figure(config, validation_losses, stopping),
    ]
    if validation_grid:
        lines += [f"Validation images at step {step} for *{config.validation_prompt}*:", "", f"![validation]({rel(validation_grid)})", ""]
    lines += [
        "## Files",
        "",
        *[f"- `{rel(path)}` ({kind})" for kind, path in files.items() if str(path).startswith(out) and os.path.isfile(path)],
        "",
    ]
    embeddings = [(token, out, "")]
    return lines + ["## Use it", "", *_lora_lines(config, files),
                    *family.usage_lines(config.pretrained_model_name_or_path, embeddings)]


def _lora_lines(config, files):
    """With --lora_rank, how each tool loads the LoRA beside the embedding (docs/pivotal-tuning.md)."""
    if "lora_diffusers" not in files:
        return []
    kohya = os.path.basename(files["lora_kohya"])
    return [
        "Pivotal tuning: the concept is the embedding and a LoRA of the UNet together; load both.",
        "",
        f"- diffusers: `pipe.load_lora_weights(\"{config.output_dir}\", weight_name=\"{os.path.basename(files['lora_diffusers'])}\")`, "
        "then `pipe.load_textual_inversion(...)` as below.",
        f"- A1111 / Forge: copy `{kohya}` into `models/Lora` and write `<lora:{os.path.splitext(kohya)[0]}:1>` with the "
        "token: the embedding is bundled in it.",
        f"- ComfyUI: load `{kohya}` with a LoRA loader and the embedding as below (ComfyUI ignores a bundled one).",
        f"- ti_flax.generate: `--lora {files['lora_diffusers']}` with `--embeddings` as below.",
        "",
    ]


def _buckets_note(config):
    """What the card adds to the resolution with --enable_bucket ("" without)."""
    if not config.enable_bucket:
        return ""
    sides = f"sides {config.min_bucket_reso}-{config.max_bucket_reso} in steps of {config.bucket_reso_steps}"
    area = f"{config.resolution}x{config.resolution}"
    return f" (aspect-ratio buckets of about {area} pixels, {sides}{', never upscaled' if config.bucket_no_upscale else ''})"
