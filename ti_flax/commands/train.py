"""The training loop: an engine stepping, and the periodic actions around it.

The math lives in step.py, the setup in run.py and engine.py, the actions in actions.py. Run it as
`python -m ti_flax.train --help` (train.py, the command line's entry), or from Python:

    >>> from ti_flax import TrainConfig, train
    >>> result = train(TrainConfig(...))  # doctest: +SKIP
    >>> result.files["diffusers"]  # doctest: +SKIP
"""

import dataclasses
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from .. import files
from ..config.cli import parse_config
from ..errors import run_cli
from ..sampling.validation import Validator
from ..training import compile_cache, distribution as distributed, engine as engine_lib, logs
from ..training.actions import Checkpoint, EarlyStop, End, LogStep, SaveRows, StopVote, Validate, ValidationLoss
from ..training.logs import MetricsLogger
from ..training.outputs import print_banner, print_summary, save_outputs
from ..training.preemption import StopOnSignal
from ..training.run import initial_state, prepare


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
        backend does not report it (CPU); with --validation_loss_steps also "validation_loss_s"
        and "validation_loss_first_s": seconds evaluating it in all, and the first time (its compile
        included)}.
      validation_losses: with --validation_loss_steps, one {"kind": "validation_loss", "step",
        "loss"} per evaluation (with several concepts also "loss/<token>").
      early_stopping: with --early_stopping dvar, one {"kind": "early_stopping", "step", "loss"}
        per evaluation of the deterministic loss in this run (with "ratio", DVAR's variance ratio,
        once the history reaches past the window).
      stopped_early: where --early_stopping ended the run, early_stopping.Stop.record(): {"step",
        "ratio", "threshold", "window", "first_step", "first_loss", "last_loss"}; None where the
        run took every step.
      lora: with --lora_rank, the LoRA's final factors {module: {"lora_A", "lora_B"}} (float32
        numpy, lora_B unscaled: the update is alpha / rank times B A); None without.
    """

    output_dir: str
    files: dict
    tokens: list
    rows: np.ndarray
    final_loss: float
    history: list
    timings: dict = dataclasses.field(default_factory=dict)
    validation_losses: list = dataclasses.field(default_factory=list)
    early_stopping: list = dataclasses.field(default_factory=list)
    stopped_early: Optional[dict] = None
    lora: Optional[dict] = None


def train(config, callbacks: Sequence[Callable[[dict], None]] = (), devices=None):
    """Train placeholder-token embeddings and write them to `config.output_dir`.

    Args:
      config: a TrainConfig.
      callbacks: functions called with a dict after every step, {"kind": "step", "step", "loss",
        "lr", "grad_norm", "row_norms", "steps_per_sec"}, after every validation,
        {"kind": "validation", "step", "images": PNG paths, "grid": PNG path}, and after every
        validation loss, {"kind": "validation_loss", "step", "loss"}, and after every evaluation of
        --early_stopping's deterministic loss, {"kind": "early_stopping", "step", "loss"[, "ratio"]}.
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
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id, config.distributed_timeout)
    # JAX writes its cache from process 0 only: in a multi-process run process 0 would load its
    # programs while the others compile theirs, so the first step comes no sooner, and on CPU the
    # wait at the first collective can outlast Gloo's fixed 30 s rendezvous.
    compile_cache.configure(enabled=not config.no_compilation_cache and jax.process_count() == 1)
    run = prepare(config, devices)
    state, start_step, stopping_history = initial_state(run)
    writer = jax.process_index() == 0
    if writer:
        print_banner(run)
    # The step compiles, and is checked against the devices' memory, before anything is written.
    engine = engine_lib.build(run, state, start_step, keep_vae=validates_here(config, run.layout, writer))
    if writer:
        with files.writing(config.output_dir):  # a read-only or full disk: one line, nothing trained
            os.makedirs(config.output_dir, exist_ok=True)
    logger = MetricsLogger(config.output_dir, config.logging_dir, config.resolved_report_to, enabled=writer)
    try:
        with StopOnSignal() as stop:
            looped = train_loop(run, engine, logger, callbacks, writer, start_step, stop, stopping_history)
    finally:
        logger.close()
    rows, history, grid, evaluations, early = looped
    timings = {"load_model_s": run.load_seconds, "compile_step_s": engine.compile_seconds,
               "peak_device_bytes": logs.peak_device_bytes(run.devices), "estimated_device_bytes": engine.estimated_bytes}
    losses = evaluations.records if evaluations else []
    if evaluations:
        timings.update(validation_loss_s=evaluations.seconds, validation_loss_first_s=evaluations.first_seconds)
    stopped = early.end.stop if early else None
    factors = engine.lora()
    outputs = save_outputs(run, rows, history, grid, losses, early, factors) if writer else {}
    if writer:
        print_summary(run, outputs, history, timings, losses, stopped)
    final_loss = history[-1]["loss"] if history else float("nan")
    return TrainResult(config.output_dir, outputs, run.tokens, rows, final_loss, history, timings, losses,
                       early.records if early else [], stopped.record() if stopped else None, factors)


def train_loop(run, engine, logger, callbacks, writer, start_step, stop=None, stopping_history=None):
    """Step `engine` (engine.build of `run`) from `start_step` to `run.total_steps`, or to where
    --early_stopping ends the run (`stopping_history`: its criterion's state from the checkpoint
    resumed, or None).

    Checkpoints every --checkpointing_steps, and on a stop signal (then raises Preempted).
    Returns:
      (final rows, per-step records, last validation grid or None, the actions.ValidationLoss of
      --validation_loss_steps or None, the actions.EarlyStop of --early_stopping or None).
    """
    from tqdm.auto import tqdm

    config = run.config
    validating = validates_here(config, engine.layout, writer)
    bar = tqdm(total=run.total_steps, initial=start_step, disable=not writer, dynamic_ncols=True, desc="train")
    log = LogStep(run.opt_spec.schedule(), logger, callbacks, bar, run.concept_names)
    end = End(run.total_steps)
    early = None
    if engine.deterministic is not None:
        early = EarlyStop(run, engine, end, logger, callbacks, stopping_history)
        early.start(start_step)
    checkpoint = Checkpoint(run, engine, config.checkpointing_steps, writer, early.criterion if early else None)
    evaluate = ValidationLoss(run, engine, logger, callbacks, end) if engine.evaluator is not None else None
    validate = None
    if validating:  # samples with the engine's weights: no second copy on the devices
        validator = Validator(config, run.model.spec, engine.compute, run.model, run.learned, engine.weights, run.devices,
                              engine.layout)
        validate = Validate(run, engine, validator, logger, log.history, callbacks,
                            evaluate.records if evaluate else (), end, writer)
    # In this order at a step where several are due: early stopping (which may make it the last),
    # rows, validation loss, images, then the checkpoint.
    actions = [early, SaveRows(run, engine, config.save_steps if writer else 0), evaluate, validate, checkpoint]
    try:
        loop(engine, range(start_step, max(start_step, end.last)), log, StopVote(stop, run.devices),
             [a for a in actions if a is not None], checkpoint, end)
    finally:
        bar.close()
    if writer and end.stop is not None:
        print(f"early stop at step {end.stop.step} of {run.total_steps}: {end.stop.reason()}", flush=True)
    return engine.rows(), log.history, validate.last_grid if validate else None, evaluate, early


def validates_here(config, layout, writer):
    """Whether this process renders --validation_prompt's images: the writer (process 0) samples
    alone with replicated weights; with weights split over every process's devices
    (parallel.Sharded) every process takes part in the program, and only the writer saves."""
    return bool(config.validation_prompt) and (writer or layout.sharded)


def loop(engine, steps, log, vote, actions, checkpoint, end=None):
    """Run `engine.update()` for each of `steps`, logging each update and calling the actions due.

    A step's metrics are read one update later, so the host never waits on the update it just
    dispatched; where an action is due (or the run stops) the step is logged first, so a NaN/Inf
    update raises before anything is saved. Every process votes on stopping after each update;
    a stop checkpoints (`checkpoint.path`) and raises Preempted. With `end` (actions.End), the
    loop ends after the actions of its last update, which an action may have moved earlier
    (--early_stopping); a signal at that update changes nothing then: the run is complete.
    """
    pending, stopping = None, False
    for step in steps:
        metrics = engine.update()
        # All processes read the votes at the same steps, so a signal on any host makes every
        # host checkpoint the same step.
        ballot = vote.cast()
        if pending is not None:
            stopping = settle(log, vote, *pending)
        done = step + 1
        pending = (done, metrics, ballot)
        if stopping or any(action.due(done) for action in actions):
            stopping = settle(log, vote, *pending) or stopping
            pending = None
            for action in actions:
                if action.due(done, stopping):
                    action(done, stopping)
            if end is not None and end.stop is not None and end.is_last(done):
                return
            if stopping:
                raise vote.preempted(done, checkpoint.path)
    if pending is not None:
        settle(log, vote, *pending)


def settle(log, vote, done, metrics, ballot):
    """Log update `done`; returns whether any process asked to stop by then."""
    log(done, metrics)
    return vote.result(ballot)


def main(argv=None):
    """`python -m ti_flax.train` and `ti-flax-train`: parse the flags, train; returns the exit status."""
    return run_cli(lambda: train(parse_config(argv)))
