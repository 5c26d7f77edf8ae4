"""What a run writes and prints: final embedding, model card, full pipeline, Hub upload; banner and summary."""

import dataclasses
import os

import jax
import numpy as np

from .. import families, files
from ..formats import lora as lora_files
from ..models import lora as lora_lib
from ..tokens import split_rows
from ..models import schedulers
from . import checkpoint as ckpt, logs, losses, model_card
from .validation_loss import fixed_timesteps


def save_outputs(run, rows, history, grid=None, validation_losses=(), early=None, lora=None):
    """Write the final embedding, model card (and pipeline, and Hub upload) for a finished run.

    `validation_losses`: the --validation_loss_steps records, for the model card's loss plot.
    `early`: --early_stopping's actions.EarlyStop (its losses and where it ended the run), or None.
    `lora`: --lora_rank's factors (Engine.lora()), written beside the embedding (save_lora).

    A failed write is `files.WriteFailed` naming, besides the file, what was already saved
    (files of this call, the newest checkpoint): those stay intact.
    """
    config = run.config
    written = {}
    try:
        widths = run.model.spec.text_widths
        for learned in run.learned:  # each concept's files in its folder (a single concept: output_dir)
            suffix = "" if config.concepts is None else f" {learned.tokens[0]}"
            saved = run.family.save_embedding(learned.out_dir, learned.tokens[0], rows[learned.rows], widths,
                                              bin=config.no_safe_serialization)
            written.update({kind + suffix: path for kind, path in saved.items()})
        if lora is not None:
            written.update(save_lora(run, rows, lora, history[-1]["step"] if history else run.total_steps))
        if config.save_as_full_pipeline:
            written["pipeline"] = save_pipeline(run, rows, lora)
        written["model_card"] = model_card.write_model_card(config, run.tokens, history, written, run.family, grid,
                                                               run.learned, validation_losses,
                                                               model_card.Stopping.of(early, run.total_steps))
    except files.WriteFailed as err:
        saved = list(written.values())
        checkpoints = ckpt.list_checkpoints(config.output_dir)
        if checkpoints:
            saved.append(checkpoints[-1][1])
        raise err.with_saved(saved) from None
    if config.push_to_hub:
        written["hub"] = push_to_hub(config)
    return written


def save_lora(run, rows, factors, steps, suffix=""):
    """Write pivotal tuning's LoRA to output_dir: diffusers' `pytorch_lora_weights.safetensors`,
    and kohya's `<token>_lora.safetensors` with every concept's embedding bundled (`suffix` before
    the extension: --save_steps' "-steps-N"). Returns {"lora_diffusers": path, "lora_kohya": path}."""
    spec, lora = run.model.spec, run.opt_spec.lora
    out = run.config.output_dir
    names = run.family.kohya_lora_names(spec, factors)
    tensors = lora_files.kohya_tensors(factors, lora.alpha, names)
    for learned in run.learned:
        tensors.update(lora_files.bundle(learned.tokens[0], split_rows(rows[learned.rows], spec.text_widths)))
    token = run.learned[0].tokens[0]
    resolution = run.config.resolution or run.family.default_resolution(spec)
    metadata = lora_files.kohya_metadata(lora.rank, lora.alpha, run.family.kohya_base_model, resolution, steps,
                                         os.path.splitext(lora_files.kohya_file(token))[0])
    named = lambda name: os.path.join(out, name.replace(".safetensors", f"{suffix}.safetensors"))  # noqa: E731
    return {
        "lora_diffusers": lora_files.save(named(lora_files.DIFFUSERS_FILE),
                                          lora_files.diffusers_tensors(factors, lora.scale)),
        "lora_kohya": lora_files.save(named(lora_files.kohya_file(token)), tensors, metadata),
    }


def save_pipeline(run, rows, lora=None):
    """Save the whole model, with the new tokens (and --lora_rank's `lora` factors merged into the
    UNet's weights), as a diffusers folder in output_dir (staged, then moved in)."""
    out = run.config.output_dir
    model = run.model
    if lora is not None:
        merged = lora_lib.merge(model.params["unet"], lora, run.opt_spec.lora.scale)
        model = dataclasses.replace(model, params={**model.params, "unet": merged})
    # output_dir holds the run's other files: each component is moved in beside them.
    with files.staged_folder(out, f".pipeline-{os.getpid()}", merge=True, what="the full pipeline into") as tmp:
        run.family.save_pipeline(model, rows, tmp)
    return out


def push_to_hub(config):
    from huggingface_hub import create_repo, upload_folder

    token = config.hub_token or (True if config.use_auth_token else None)
    repo_id = config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir))
    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=config.output_dir,
        token=token,
        commit_message="Upload textual inversion embedding trained with ti_flax",
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".*"],
    )
    return repo_id


# --------------------------------------------------------------------------------------------
# What a run prints: the banner before the first step, the summary after the last


def attention_summary(run):
    """--attention as the banner shows it: "dense", or "auto (chunked for self-attention)"."""
    asked = run.config.attention
    return run.attention if run.attention == asked else f"{asked} ({run.attention} for self-attention)"


def print_banner(run):
    config = run.config
    n_rows = len(run.tokens)
    print(
        f"{_what_line(run)}"
        f"  model      {config.pretrained_model_name_or_path} ({_model_kind(run.model)}), "
        f"loaded in {run.load_seconds:.1f} s\n"
        f"  devices    {len(run.devices) * jax.process_count()} ({len(run.devices)} local x "
        f"{jax.process_count()} process(es), {jax.default_backend()}){_sharding_text(run)}\n"
        f"  batch      {config.train_batch_size} per device x {len(run.devices) * jax.process_count()} devices = "
        f"{run.data.global_batch_size} global; {run.data.steps_per_epoch} steps per epoch\n"
        f"  steps      {run.total_steps}, lr {run.opt_spec.peak_lr:g} ({config.lr_scheduler})"
        f"{f', {config.gradient_accumulation_steps} micro-batches per update' if config.gradient_accumulation_steps > 1 else ''}\n"
        f"{_loss_line(run)}"
        f"  speed      mixed precision {config.mixed_precision}, cache latents {'on' if config.cache_latents else 'off'}, "
        f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}, "
        f"attention {attention_summary(run)}\n"
        f"{_captions_line(run)}"
        f"{_buckets_line(run)}"
        f"{_rows_line(run)}"
        f"{_validation_loss_line(run)}"
        f"{_stopping_line(run)}"
        f"{_trainable_line(run, n_rows)}"
        f"{_lora_line(run)}"
        f"  output     {config.output_dir}",
        flush=True,
    )


def _sharding_text(run):
    """The banner's note on the frozen weights' layout: "" when each device holds a copy."""
    if run.sharded is None:
        return ""
    return f"; frozen weights split over them ({run.sharded})"


def _model_kind(model):
    """The banner's description of the model, e.g. "SD 1.x, epsilon, hidden 768" or "SDXL, epsilon, hidden 768 + 1280";
    with zero terminal SNR and what a single file's marker keys chose, e.g. "SDXL, v_prediction, zero
    terminal SNR, hidden 768 + 1280; v_prediction from the file's v_pred key, ...". """
    spec = model.spec
    widths = " + ".join(map(str, spec.text_widths))
    ztsnr = ", zero terminal SNR" if schedulers.zero_terminal_snr(model.scheduler_config) else ""
    notes = "".join(f"; {note}" for note in model.notes)
    return f"{families.of(spec).title}, {spec.prediction_type}{ztsnr}, hidden {widths}{notes}"


def _what_line(run):
    """The banner's first line(s): the tokens and where they start; a line per concept with --concepts."""
    config, ids = run.config, f"ids {run.token_ids[0]}..{run.token_ids[-1]}"
    if config.concepts is None:
        return (f"ti_flax: textual inversion of {' '.join(run.tokens)} ({ids}) "
                f"from {config.initial_embeddings or repr(config.initializer_token)}\n")
    parts = getattr(run.data, "parts", (run.data,))
    n = len(run.learned)
    lines = [f"ti_flax: textual inversion of {n} concept{'s' if n > 1 else ''} ({ids})"]
    for learned, part in zip(run.learned, parts):
        c = learned.concept
        captions = f", {part.num_captioned} captioned" if c.caption_extension else ""
        lines.append(f"  concept    {c.placeholder_token}: {c.num_vectors} vector(s) from "
                     f"{c.initial_embeddings or repr(c.initializer_token)}, {len(part.images)} images{captions} "
                     f"({c.learnable_property}), weight {c.weight:g}")
    return "\n".join(lines) + "\n"


def _loss_line(run):
    """The banner's loss-recipe line ("" when every knob is off: the plain mean squared error)."""
    recipe = losses.describe(run.config, run.model.spec.num_train_timesteps)
    return f"  loss       {recipe}\n" if recipe else ""


def _captions_line(run):
    """The banner's captions line ("" without --caption_extension)."""
    if not run.config.caption_extension:
        return ""
    n, k = len(run.data.images), run.data.num_captioned
    rest = f"; {n - k} on the {run.config.learnable_property} templates" if k < n else ""
    return f"  captions   {k} of {n} images ({run.config.caption_extension} files){rest}\n"


def _buckets_line(run):
    """The banner's buckets line ("" without --enable_bucket): each bucket used, height x width, and
    its image count; each is one compiled step."""
    if not run.config.enable_bucket:
        return ""
    images = run.data.images
    listed = ", ".join(f"{h}x{w}: {n}" for (h, w), n in zip(images.shapes, images.counts()))
    return f"  buckets    {len(images.shapes)} used, one compiled step each (height x width: images): {listed}\n"


def _trainable_line(run, n_rows):
    """The banner's count of trained parameters: every encoder's part of each row, or with
    --text_encoders the ones named (the others' kept at the initializer's rows)."""
    widths, encoders = run.model.spec.text_widths, run.family.encoders
    mask = run.opt_spec.encoders
    if mask is None:
        return f"  trainable  {n_rows * sum(widths)} parameters ({n_rows} x {' + '.join(map(str, widths))})\n"
    trained = [(w, e.title) for w, e, keep in zip(widths, encoders, mask.trained) if keep]
    kept = ", ".join(e.title for e, keep in zip(encoders, mask.trained) if not keep)
    return (f"  trainable  {n_rows * sum(w for w, _ in trained)} parameters ({n_rows} x "
            f"{' + '.join(f'{w} ({t})' for w, t in trained)}); {kept} kept at the initializer's rows "
            "(--text_encoders)\n")


def _lora_line(run):
    """The banner's pivotal-tuning line ("" without --lora_rank): the LoRA's size, rate and pivot."""
    opt = run.opt_spec
    if opt.lora is None:
        return ""
    lora, size = opt.lora, 0
    for _, shape in lora.shapes:
        a_shape, b_shape = lora_lib.factor_shapes(shape, lora.rank)
        size += int(np.prod(a_shape)) + int(np.prod(b_shape))
    return (f"  lora       rank {lora.rank}, alpha {lora.alpha:g} over {len(lora.shapes)} UNet modules "
            f"({run.config.lora_targets}): {size} parameters, lr {opt.lora_lr:g}; the rows learn for the first "
            f"{opt.pivot} of {run.total_steps} updates (--train_text_encoder_ti_frac)\n")


def _rows_line(run):
    """The banner's line on what follows each update: the norm control with its target(s), the
    EMA ("" with both off)."""
    opt, parts = run.opt_spec, []
    if opt.norm is not None:
        several = len(opt.norm.targets) > 1
        names = [e.title if several else "" for e in run.family.encoders]
        targets = " and ".join(f"{t:.4g}{f' ({n})' if n else ''}" for t, n in zip(opt.norm.targets, names)
                               if t is not None)
        source = "--embedding_norm_target" if run.config.embedding_norm_target is not None else "median of the token table"
        how = "set to" if opt.norm.rate == 1 else f"pulled {opt.norm.rate:g} of the way to"
        parts.append(f"each vector's norm {how} {targets} ({source})")
    if opt.ema is not None:
        after = f", from update {opt.ema.update_after_step + 2}" if opt.ema.update_after_step else ""
        parts.append(f"EMA decay {opt.ema.decay:g}{after}: the embeddings written are the EMA")
    return f"  rows       after each update: {'; '.join(parts)}\n" if parts else ""


def _stopping_line(run):
    """The banner's early-stopping line ("" without --early_stopping)."""
    config = run.config
    if run.stopping_images is None:
        return ""
    return (f"  stopping   DVAR: the loss of {len(run.stopping_examples[0])} fixed training examples every "
            f"{config.early_stopping_every} update(s); ends the run when its variance over the last "
            f"{config.early_stopping_window} updates is below {config.early_stopping_threshold:g} x its variance since "
            f"the start{f', from step {config.early_stopping_min_steps}' if config.early_stopping_min_steps else ''}\n")


def _validation_loss_line(run):
    """The banner's validation-loss line ("" without --validation_loss_steps)."""
    config, images = run.config, run.validation_images
    if images is None:
        return ""
    which = (f"{len(images.images)} held-out images (--validation_split {config.validation_split:g})"
             if config.validation_split else f"the {len(images.images)} training images")
    return (f"  val. loss  every {config.validation_loss_steps} updates: {which} x "
            f"{len(fixed_timesteps(run.model.spec.num_train_timesteps))} timesteps\n")


def print_summary(run, files, history, timings, validation_losses=(), stopped=None):
    """The run's last lines; `stopped`: the early_stopping.Stop that ended it, or None."""
    loss = f"{history[-1]['loss']:.4f}" if history else "n/a"
    step = f"step {stopped.step} of {run.total_steps}, stopped early" if stopped else f"step {run.total_steps}"
    print(f"done: {step} ({len(history)} steps in this run), final loss {loss}", flush=True)
    if stopped:
        print(f"  {'early stop':13s} {stopped.reason()}", flush=True)
    print(f"  {'startup':13s} {logs.startup_text(timings)}", flush=True)
    if validation_losses:
        last = validation_losses[-1]
        print(f"  {'val. loss':13s} {last['loss']:.4f} at step {last['step']}; {len(validation_losses)} evaluations "
              f"in {timings['validation_loss_s']:.1f} s (the first, with its compile, "
              f"{timings['validation_loss_first_s']:.1f} s)", flush=True)
    for kind, path in files.items():
        print(f"  {kind:13s} {path}", flush=True)
