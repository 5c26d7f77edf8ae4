"""The training loop: load, step, log, save. The math lives in step.py, the parts elsewhere.

Run it as `python -m ti_flax.train --help`, or from Python:

    >>> from ti_flax import TrainConfig, train
    >>> result = train(TrainConfig(...))  # doctest: +SKIP
    >>> result.files["diffusers"]  # doctest: +SKIP
"""

import dataclasses
import os
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import jax
import numpy as np

from . import captions as captions_lib
from . import checkpoint as ckpt
from . import data as data_lib
from . import compile_cache, distributed, files, formats, logs, model_card
from . import latents, models, parallel, step as step_lib, tokens as tokens_lib
from .config import TrainConfig
from .errors import UserError, run_cli
from .logs import MetricsLogger
from .optim import OptimizerSpec
from .preempt import Preempted, StopOnSignal
from .validation import Validator
from .validation import grid as grid_image


class TrainingDiverged(UserError):
    """The loss or gradients became NaN or Inf."""


@dataclasses.dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
      output_dir: the run's folder.
      files: {"diffusers": learned_embeds.safetensors path, ...} of the files written.
      tokens: the placeholder tokens, e.g. ["<cat-toy>", "<cat-toy>_1"].
      rows: float32 [num_vectors, hidden], the learned embedding.
      final_loss: loss of the last step.
      history: one dict per step (step, loss, lr, grad_norm, row_norms).
      timings: {"load_model_s", "compile_step_s": seconds (None if a multi-process run, which
        compiles on its first step, took none), "peak_device_bytes": int, or None where the
        backend does not report it (CPU)}.
    """

    output_dir: str
    files: dict
    tokens: list
    rows: np.ndarray
    final_loss: float
    history: list
    timings: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Run:
    """Everything a run needs, prepared and checked before anything is written."""

    config: TrainConfig
    model: models.LoadedModel
    tokens: list
    token_ids: list
    init_rows: np.ndarray
    data: data_lib.TrainData
    opt_spec: OptimizerSpec
    total_steps: int
    devices: tuple
    meta: dict  # what checkpoints record about this run
    load_seconds: float = 0.0  # reading and converting the model's weights


def prepare(config, devices=None):
    """Load the model and data and check the run can go ahead. Raises UserError; writes nothing.

    `devices` are the local devices to train on (default: all of them).
    """
    config.validate()
    start = time.perf_counter()
    model = models.load_model(config.pretrained_model_name_or_path, config.revision, config.tokenizer_name,
                              config.prediction_type, config.allow_pickle)
    load_seconds = time.perf_counter() - start
    check_resolution(config.resolution, model.spec)
    _attention_summary(config, model.spec)  # an explicit --attention that cannot run here: one line
    tokens = tokens_lib.placeholder_tokens(config.placeholder_token, config.num_vectors)
    if config.initial_embeddings:
        start = formats.read_embedding(config.initial_embeddings, allow_pickle=config.allow_pickle)
        init_rows = formats.check_embedding_fits(start, config.num_vectors, model.spec.hidden_size)
    else:
        init_id = tokens_lib.initializer_id(model.tokenizer, config.initializer_token)
        init_rows = tokens_lib.initial_rows(models.token_table(model.params["text_encoder"]), init_id, len(tokens))
    token_ids = tokens_lib.add_placeholder_tokens(model.tokenizer, tokens)
    images, names = data_lib.load_images(
        config.train_data_dir, config.resolution, config.center_crop, config.interpolation, config.caption_extension
    )
    # Every prompt is tokenized and checked here: one that does not fit is an error, never cut.
    template_ids = data_lib.tokenize_templates(
        model.tokenizer, data_lib.templates_for(config.learnable_property), tokens_lib.placeholder_text(tokens)
    )
    caption_ids = None
    if config.caption_extension:
        caption_ids = captions_lib.tokenize_captions(
            model.tokenizer, captions_lib.read_captions(config.train_data_dir, names, config.caption_extension),
            tokens, config.caption_prefix_token,
        )
    if config.validation_prompt:
        captions_lib.encode_prompt(model.tokenizer, config.validation_prompt, tokens, "--validation_prompt")
    devices = tuple(devices or jax.local_devices())
    num_devices = len(devices) * jax.process_count()
    global_batch = config.train_batch_size * num_devices
    data = data_lib.TrainData(images, template_ids, config.repeats, config.flip_p, config.seed, global_batch, caption_ids)
    # Steps count optimizer updates; each consumes --gradient_accumulation_steps batches.
    epochs_batches = config.num_train_epochs * data.steps_per_epoch
    total_steps = config.max_train_steps or max(1, epochs_batches // config.gradient_accumulation_steps)
    opt_spec = OptimizerSpec.from_config(config, num_devices, total_steps)
    if config.push_to_hub:
        check_hub_token(config)
    fingerprint = ckpt.model_fingerprint(model.spec, models.token_table(model.params["text_encoder"]))
    meta = ckpt.run_meta(config, tokens, token_ids, fingerprint, global_batch, len(images), caption_ids)
    return Run(config, model, tokens, token_ids, init_rows, data, opt_spec, total_steps, devices, meta, load_seconds)


def check_resolution(resolution, spec):
    if resolution % spec.pixel_multiple:
        raise UserError(f"--resolution {resolution}: this model needs a multiple of {spec.pixel_multiple}")


def check_hub_token(config):
    from huggingface_hub import get_token

    if not (config.hub_token or get_token()):
        raise UserError("--push_to_hub needs a token: pass --hub_token or run `huggingface-cli login` first")


def train(config, callbacks: Sequence[Callable[[dict], None]] = (), devices=None):
    """Train placeholder-token embeddings and write them to `config.output_dir`.

    Args:
      config: a TrainConfig.
      callbacks: functions called with a dict after every step, {"kind": "step", "step", "loss",
        "lr", "grad_norm", "row_norms", "steps_per_sec"}, and after every validation,
        {"kind": "validation", "step", "images": PNG paths, "grid": PNG path}.
      devices: local devices to train on (default: all).
    Returns:
      TrainResult with the files written and the per-step history.
    Raises:
      UserError on bad input (before anything is written) and TrainingDiverged on NaN/Inf.

    Example:
        >>> from ti_flax import TrainConfig, train
        >>> config = TrainConfig(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5",
        ...                      train_data_dir="cat_toy", placeholder_token="<cat-toy>",
        ...                      initializer_token="toy", output_dir="out", max_train_steps=3000)
        >>> def show(record):
        ...     if record["kind"] == "step":
        ...         print(record["step"], record["loss"])
        >>> result = train(config, callbacks=[show])  # doctest: +SKIP
        >>> result.files["diffusers"], result.final_loss  # doctest: +SKIP
        ('out/learned_embeds.safetensors', 0.1234)
    """
    config.validate()
    compile_cache.configure(enabled=not config.no_compilation_cache)
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id, config.distributed_timeout)
    run = prepare(config, devices)
    state, start_step = initial_state(run)
    writer = jax.process_index() == 0
    if writer:
        with files.writing(config.output_dir):  # a read-only or full disk: one line, nothing trained
            os.makedirs(config.output_dir, exist_ok=True)
        print_banner(run)
    logger = MetricsLogger(config.output_dir, config.logging_dir, config.resolved_report_to, enabled=writer)
    try:
        with StopOnSignal() as stop:
            rows, history, grid, compile_seconds = train_loop(run, logger, callbacks, writer, state, start_step, stop)
    finally:
        logger.close()
    timings = {"load_model_s": run.load_seconds, "compile_step_s": compile_seconds,
               "peak_device_bytes": logs.peak_device_bytes(run.devices)}
    outputs = save_outputs(run, rows, history, grid) if writer else {}
    if writer:
        print_summary(run, outputs, history, timings)
    final_loss = history[-1]["loss"] if history else float("nan")
    return TrainResult(config.output_dir, outputs, run.tokens, rows, final_loss, history, timings)


def initial_state(run):
    """(host TrainState, first step): fresh, or restored from --resume_from_checkpoint.

    Process 0 reads the checkpoint (other hosts need not see its disk) and every process
    receives the same state through a broadcast. Raises UserError before anything is written.
    """
    fresh = step_lib.init_state(run.init_rows, run.opt_spec)
    state, error = fresh, None
    if jax.process_index() == 0:
        try:
            path = ckpt.resolve_resume(run.config)
            if path:
                ckpt.check_compatible(ckpt.read_meta(path), run.meta, path)
                state, meta = ckpt.load_checkpoint(path, fresh)
                print(f"resuming from {path} (step {meta['step']})", flush=True)
        except UserError as err:
            error = err
    if jax.process_count() > 1:
        ok = distributed.broadcast_from_first(np.int32(error is None))
        if error is None and not ok:
            raise UserError("process 0 could not resume from its checkpoint; see its output")
        if error is None:
            state = distributed.broadcast_from_first(jax.tree_util.tree_map(np.asarray, state))
    if error is not None:
        raise error
    return state, int(state.step)


def train_loop(run, logger, callbacks, writer, state, start_step, stop=None):
    """Step from `start_step` to `run.total_steps`.

    Checkpoints every --checkpointing_steps, and on a stop signal (then raises Preempted).
    Returns:
      (final rows, per-step records, last validation grid or None, seconds compiling the step).
    """
    from tqdm.auto import tqdm

    config, devices = run.config, run.devices
    spec = dataclasses.replace(
        run.model.spec, dtype=config.compute_dtype, remat=config.gradient_checkpointing, attention=config.attention,
    )
    # The frozen weights are cast once on the host; run.model keeps float32 for the outputs.
    frozen_params = {**models.cast_params(run.model.params, spec.dtype), "alphas_cumprod": run.model.alphas_cumprod}
    # The step compiles from shapes in the background while the weights are copied to the
    # devices and the latents are cached; the first step then runs the finished program.
    compiling = compile_in_background(run, spec, state, frozen_params, start_step)
    frozen = parallel.replicate(frozen_params, devices)
    del frozen_params
    # Built before --cache_latents takes the VAE out of the step's weights: sampling decodes.
    validator = Validator(config, spec, run.model, run.tokens, dict(frozen), devices) if (
        writer and config.validation_prompt) else None
    last_grid = None
    data, accum = run.data, config.gradient_accumulation_steps
    if config.cache_latents:  # encode every view now; the step then never sees the VAE
        data = latents.cached_data(spec, frozen.pop("vae"), run.data, devices)
    state = parallel.replicate(state, devices)
    keys = parallel.replicate(jax.random.PRNGKey(config.seed), devices)
    p_step, compile_seconds = compiling.result()
    schedule = run.opt_spec.schedule()
    batches = parallel.prefetch_to_devices(
        data.batches(start_step * accum, jax.process_index(), jax.process_count(), len(devices)), devices
    )
    history = []
    bar = tqdm(total=run.total_steps, initial=start_step, disable=not writer, dynamic_ncols=True, desc="train")
    t_last = time.perf_counter()

    def record(done_step, metrics, vote):
        """Log a finished step; returns whether any process asked to stop by then."""
        nonlocal t_last
        metrics = step_lib.mean_metrics(parallel.unreplicate(metrics))
        if not bool(metrics["finite"]):
            raise TrainingDiverged(
                f"step {done_step}: loss or gradients became NaN/Inf (loss={float(metrics['loss'])}); "
                "no embedding was written for it. Lower --learning_rate or set --max_grad_norm"
            )
        now = time.perf_counter()
        rec = {
            "kind": "step",
            "step": done_step,
            "loss": float(metrics["loss"]),
            "lr": float(schedule(done_step - 1)),
            "grad_norm": float(metrics["grad_norm"]),
            "row_norms": [float(x) for x in metrics["row_norms"]],
            "steps_per_sec": 1.0 / max(now - t_last, 1e-9),
        }
        t_last = now
        history.append(rec)
        logger.log(done_step, {k: v for k, v in rec.items() if k not in ("step", "kind")})
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
        bar.update(1)
        for callback in callbacks:
            callback(rec)
        return parallel.vote_result(vote)

    def validate(done_step):
        nonlocal last_grid
        try:
            paths, grid_path, images = validator(parallel.unreplicate(state.rows), done_step)
            last_grid = grid_path
            logger.log_image(done_step, "validation", grid_image(images))
            model_card.write_model_card(config, run.tokens, history, {}, last_grid)
        except files.WriteFailed as err:
            save_failed(done_step, "the validation images", err)
            return
        for callback in callbacks:
            callback({"kind": "validation", "step": done_step, "images": paths, "grid": last_grid})

    pending, stopping = None, False
    try:
        for step in range(start_step, run.total_steps):
            metrics = []
            for _ in range(accum):  # micro-batches of one optimizer update
                batch, start = next(batches), time.perf_counter()
                state, micro = p_step(state, frozen, batch, keys)
                if compile_seconds is None:  # compiled by this first call (multi-process); it runs asynchronously
                    compile_seconds = time.perf_counter() - start
                metrics.append(micro)
            # Every process votes on stopping after each step; all read the votes at the same
            # steps, so a signal on any host makes every host checkpoint the same step.
            vote = parallel.stop_vote(stop.requested if stop is not None else 0, devices)
            # Read the previous step's metrics only now, so the host never waits on the
            # step it just dispatched; a NaN still stops the run one step later at most.
            if pending is not None:
                stopping = record(*pending)
            pending = (step + 1, metrics, vote)
            done = step + 1
            save_rows = writer and config.save_steps and done % config.save_steps == 0
            save_state = config.checkpointing_steps and done % config.checkpointing_steps == 0
            validating = validator is not None and (done % config.validation_steps == 0 or done == run.total_steps)
            if save_rows or save_state or stopping or validating:
                stopping = record(*pending) or stopping  # a NaN step raises here, before anything is saved
                pending = None
                if save_rows:
                    try:
                        save_intermediate(run, parallel.unreplicate(state.rows), done)
                    except files.WriteFailed as err:  # training goes on; the final save may still fit
                        save_failed(done, f"learned_embeds-steps-{done}.safetensors", err)
                if validating:
                    validate(done)
                if save_state or stopping:
                    try:
                        path = save_checkpoint(run, state) if writer else None
                    except files.WriteFailed as err:
                        if stopping:  # the checkpoint a stop promises is this run's final save
                            raise
                        save_failed(done, f"checkpoint-{done}", err)
                if stopping:
                    raise Preempted(
                        f"stopped by signal at step {done}; checkpoint saved in {path}. Continue with the same "
                        f"command plus --resume_from_checkpoint latest",
                        (stop.requested if stop is not None else 0) or 15,
                    )
        if pending is not None:
            record(*pending)
    finally:
        bar.close()
    return parallel.unreplicate(state.rows), history, last_grid, compile_seconds


def step_shapes(run, spec, state, frozen_params, start_step):
    """The train step's arguments (state, frozen, batch, key) as jax.ShapeDtypeStruct trees laid
    out as the loop will pass them, from host trees: nothing needs to be on the devices.

    `frozen_params` is the host tree the loop replicates (cast, with "alphas_cumprod").
    """
    devices = run.devices
    frozen = parallel.shapes(frozen_params, devices)
    batch = run.data.local_batch(start_step * run.config.gradient_accumulation_steps, jax.process_index(),
                                 jax.process_count(), len(devices))
    if run.config.cache_latents:
        frozen.pop("vae")
        batch = latents.cached_batch_shapes(spec, parallel.shapes(frozen_params["vae"]), batch)
    key = parallel.shapes(jax.random.PRNGKey(run.config.seed), devices)
    return parallel.shapes(state, devices), frozen, parallel.shapes(batch), key


def compile_in_background(run, spec, state, frozen_params, start_step):
    """Start compiling the train step on a thread; returns a future of (step, seconds).

    Its `result()` re-raises whatever the compile raised. In a multi-process run the step
    compiles on its first call instead (see step.compile_train_step): (step, None) at once.
    """
    args = step_shapes(run, spec, state, frozen_params, start_step)
    if jax.process_count() > 1:
        done = Future()
        done.set_result((step_lib.compile_train_step(spec, run.opt_spec, run.devices, *args), None))
        return done

    def compile_step():
        start = time.perf_counter()
        fn = step_lib.compile_train_step(spec, run.opt_spec, run.devices, *args)
        return fn, time.perf_counter() - start

    pool = ThreadPoolExecutor(1, thread_name_prefix="ti_flax-compile")
    try:
        return pool.submit(compile_step)
    finally:
        pool.shutdown(wait=False)  # the thread ends when the compile does


def save_failed(step, what, err):
    """One warning line for a failed intermediate save; training continues."""
    warnings.warn(f"step {step}: {what} not saved, training continues: {err}", stacklevel=2)


def save_checkpoint(run, state):
    host_state = parallel.unreplicate(state)
    if not np.all(np.isfinite(host_state.rows)):
        raise TrainingDiverged(f"step {int(host_state.step)}: learned rows are NaN/Inf; no checkpoint written")
    return ckpt.save_checkpoint(run.config.output_dir, host_state, run.meta, run.config.checkpoints_total_limit)


def save_intermediate(run, rows, step):
    path = os.path.join(run.config.output_dir, f"learned_embeds-steps-{step}.safetensors")
    formats.save_diffusers(path, run.tokens[0], rows)


def save_outputs(run, rows, history, grid=None):
    """Write the final embedding, model card (and pipeline, and Hub upload) for a finished run.

    A failed write is `files.WriteFailed` naming, besides the file, what was already saved
    (files of this call, the newest checkpoint): those stay intact.
    """
    config = run.config
    written = {}
    try:
        written["diffusers"] = formats.save_diffusers(
            os.path.join(config.output_dir, formats.DIFFUSERS_FILE), run.tokens[0], rows)
        if config.no_safe_serialization:
            written["diffusers_bin"] = formats.save_diffusers_bin(
                os.path.join(config.output_dir, formats.DIFFUSERS_BIN), run.tokens[0], rows
            )
        if config.save_as_full_pipeline:
            written["pipeline"] = save_pipeline(run, rows)
        written["model_card"] = model_card.write_model_card(config, run.tokens, history, written, grid)
    except files.WriteFailed as err:
        saved = list(written.values())
        checkpoints = ckpt.list_checkpoints(config.output_dir)
        if checkpoints:
            saved.append(checkpoints[-1][1])
        raise err.with_saved(saved) from None
    if config.push_to_hub:
        written["hub"] = push_to_hub(config)
    return written


def save_pipeline(run, rows):
    """Save the full Flax pipeline into output_dir, via a temporary folder renamed into place."""
    import shutil
    import tempfile

    out = run.config.output_dir
    tmp = None
    try:
        with files.writing(out, what="the full pipeline into"):
            tmp = tempfile.mkdtemp(prefix=".pipeline-", dir=out)
            models.save_pipeline(run.model, run.model.tokenizer, rows, tmp)
            for name in os.listdir(tmp):
                _swap_in(os.path.join(tmp, name), os.path.join(out, name), os.path.join(tmp, ".old-" + name))
    except files.WriteFailed as err:
        # Name the pipeline file under its final name, not the hidden temporary folder.
        if tmp and err.path.startswith(tmp):
            raise files.WriteFailed(out + err.path[len(tmp):], err.err) from None
        raise
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _swap_in(new, target, aside):
    """Move `new` to `target`. A folder already at `target` is moved to `aside` first and put
    back if the move fails, so `target` is always whole: the old one or the new one."""
    if not os.path.isdir(target):
        os.replace(new, target)  # a file (or nothing) at target: one atomic rename
        return
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise


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


def _attention_summary(config, spec):
    """--attention as the banner shows it: "dense", or "auto (chunked for self-attention)"."""
    spec = dataclasses.replace(spec, dtype=config.compute_dtype)
    chosen = models.resolve_attention(config.attention, spec, config.resolution)
    return chosen if chosen == config.attention else f"{config.attention} ({chosen} for self-attention)"


def print_banner(run):
    config, spec = run.config, run.model.spec
    n_rows = len(run.tokens)
    print(
        f"ti_flax: textual inversion of {' '.join(run.tokens)} (ids {run.token_ids[0]}..{run.token_ids[-1]}) "
        f"from {config.initial_embeddings or repr(config.initializer_token)}\n"
        f"  model      {config.pretrained_model_name_or_path} ({spec.prediction_type}, hidden {spec.hidden_size}), "
        f"loaded in {run.load_seconds:.1f} s\n"
        f"  devices    {len(run.devices) * jax.process_count()} ({len(run.devices)} local x "
        f"{jax.process_count()} process(es), {jax.default_backend()})\n"
        f"  batch      {config.train_batch_size} per device x {len(run.devices) * jax.process_count()} devices = "
        f"{run.data.global_batch_size} global; {run.data.steps_per_epoch} steps per epoch\n"
        f"  steps      {run.total_steps}, lr {run.opt_spec.peak_lr:g} ({config.lr_scheduler})"
        f"{f', {config.gradient_accumulation_steps} micro-batches per update' if config.gradient_accumulation_steps > 1 else ''}\n"
        f"  speed      mixed precision {config.mixed_precision}, cache latents {'on' if config.cache_latents else 'off'}, "
        f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}, "
        f"attention {_attention_summary(config, spec)}\n"
        f"{_captions_line(run)}"
        f"  trainable  {n_rows * spec.hidden_size} parameters ({n_rows} x {spec.hidden_size})\n"
        f"  output     {config.output_dir}",
        flush=True,
    )


def _captions_line(run):
    """The banner's captions line ("" without --caption_extension)."""
    if not run.config.caption_extension:
        return ""
    n, k = len(run.data.images), run.data.num_captioned
    rest = f"; {n - k} on the {run.config.learnable_property} templates" if k < n else ""
    return f"  captions   {k} of {n} images ({run.config.caption_extension} files){rest}\n"


def print_summary(run, files, history, timings):
    loss = f"{history[-1]['loss']:.4f}" if history else "n/a"
    print(f"done: step {run.total_steps} ({len(history)} steps in this run), final loss {loss}", flush=True)
    print(f"  {'startup':13s} {logs.startup_text(timings)}", flush=True)
    for kind, path in files.items():
        print(f"  {kind:13s} {path}", flush=True)


def main(argv=None):
    from .cli import parse_config

    return run_cli(lambda: train(parse_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
else:
    from ._entry import make_callable

    make_callable(__name__, "train")
