"""What the train loop does besides stepping: log a step, check early stopping, save rows, compute
the validation loss, validate, checkpoint, stop.

Each periodic action answers `due(done, stopping)` for the optimizer update `done` just
dispatched (and whether the run is stopping there) and does its work when called as
`action(done, stopping)`. The loop in training.py decides when metrics are read; the actions only
act, so each can be tested alone with a fake engine. Where the run ends is an `End`, which
--early_stopping may move earlier; the actions that run "after the last update" ask it.
"""

import time
import warnings

import numpy as np

from .. import files, parallel
from ..errors import UserError
from ..sampling.validation import grid as grid_image
from . import checkpoint as ckpt, model_card, step as step_lib
from .early_stopping import DVAR
from .outputs import save_lora
from .preemption import Preempted


class TrainingDiverged(UserError):
    """The loss or gradients became NaN or Inf."""


def save_failed(step, what, err):
    """One warning line for a failed intermediate save; training continues."""
    warnings.warn(f"step {step}: {what} not saved, training continues: {err}", stacklevel=2)


class LogStep:
    """Reads a finished update's metrics: stops a NaN/Inf run, else records the step everywhere.

    Args:
      schedule: the learning-rate schedule (optim.OptimizerSpec.schedule()).
      logger: logs.MetricsLogger. callbacks: functions called with each step record.
      bar: a tqdm progress bar (or anything with set_postfix, update and close).
      concepts: in a run of several concepts, each one's name (its first token).
    Attributes:
      history: one dict per logged step (kind, step, loss, lr, grad_norm, row_norms, steps_per_sec;
        with several concepts also "loss/<token>": the mean loss of that concept's examples of
        the update, for each concept that had any).
    """

    def __init__(self, schedule, logger, callbacks, bar, concepts=()):
        self.schedule, self.logger, self.callbacks, self.bar = schedule, logger, callbacks, bar
        self.concepts = tuple(concepts)  # with several concepts, their names: a loss each is logged
        self.history = []
        self.t_last = time.perf_counter()

    def __call__(self, done_step, metrics):
        """Log update `done_step` from its micro-steps' replicated metrics; TrainingDiverged on NaN/Inf."""
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
            "lr": float(self.schedule(done_step - 1)),
            "grad_norm": float(metrics["grad_norm"]),
            "row_norms": [float(x) for x in metrics["row_norms"]],
            "steps_per_sec": 1.0 / max(now - self.t_last, 1e-9),
            **concept_losses(self.concepts, metrics),
        }
        self.t_last = now
        self.history.append(rec)
        self.logger.log(done_step, {k: v for k, v in rec.items() if k not in ("step", "kind")})
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
        self.bar.update(1)
        for callback in self.callbacks:
            callback(rec)
        return rec


def concept_losses(names, metrics):
    """{"loss/<name>": mean loss of the concept's examples} for concepts with examples in the update."""
    if not names or "concept_loss_sum" not in metrics:
        return {}
    sums, counts = metrics["concept_loss_sum"], metrics["concept_count"]
    return {f"loss/{name}": float(sums[i] / counts[i]) for i, name in enumerate(names) if counts[i] > 0}


class StopVote:
    """Every process votes after each update on whether to stop (a signal on any host stops all).

    `stop` is a preempt.StopOnSignal (or None: never stop); `devices` the local devices.
    """

    def __init__(self, stop, devices):
        self.stop, self.devices = stop, devices

    @property
    def signal(self):
        return self.stop.requested if self.stop is not None else 0

    def cast(self):
        """This process's vote; read it later with `result` (it may be a device array)."""
        return parallel.stop_vote(self.signal, self.devices)

    @staticmethod
    def result(vote):
        return parallel.vote_result(vote)

    def preempted(self, done, path):
        """The Preempted error a stop at update `done`, checkpointed in `path`, ends with."""
        return Preempted(
            f"stopped by signal at step {done}; checkpoint saved in {path}. Continue with the same "
            f"command plus --resume_from_checkpoint latest",
            self.signal or 15,
        )


class End:
    """The run's last optimizer update: `last` (run.total_steps) unless early stopping ends the run
    sooner, and then `stop`, the early_stopping.Stop saying where and why (else None)."""

    def __init__(self, last):
        self.last, self.stop = last, None

    def is_last(self, done):
        return done == self.last


class EarlyStop:
    """--early_stopping dvar: the deterministic loss every --early_stopping_every updates, and the
    end of the run where DVAR holds (early_stopping.py).

    Every process evaluates (each its share of the examples) and reads the same losses, so every
    process stops at the same update without a vote. Due before the other actions of its update,
    so those that run after the last update see the end it sets.

    Args:
      run: its config's --early_stopping_* flags. engine: its `deterministic_loss()` evaluates.
      end: the run's End, moved to the stopping update. logger, callbacks: get each evaluation.
      history: the criterion's state from the checkpoint resumed (DVAR.state()), or None.
    Attributes:
      criterion: the DVAR. records: one {"kind": "early_stopping", "step", "loss"[, "ratio"]} per
        evaluation of this run.
    """

    def __init__(self, run, engine, end, logger, callbacks, history=None):
        config = run.config
        self.engine, self.end, self.logger, self.callbacks = engine, end, logger, callbacks
        self.every = config.early_stopping_every
        self.criterion = DVAR(config.early_stopping_window, config.early_stopping_threshold,
                              config.early_stopping_min_steps, history)
        self.records = []

    def start(self, step):
        """Evaluate the rows the run starts from at update `step`, unless the history has it (the
        first loss is the starting rows', as in the paper's code). A history whose last
        evaluation already stops the run (a checkpoint written where it stopped) ends it at
        `step`: nothing is left to train."""
        if self.criterion.stop is not None:
            self.end.last, self.end.stop = step, self.criterion.stop
        elif not self.criterion.steps:
            self(step)

    def due(self, done, stopping=False):
        return done % self.every == 0

    def __call__(self, done, stopping=False):
        loss = self.engine.deterministic_loss()
        ratio = self.criterion.add(done, loss)
        record = {"kind": "early_stopping", "step": done, "loss": loss, **({} if ratio is None else {"ratio": ratio})}
        self.records.append(record)
        self.logger.log(done, {f"early_stopping_{k}": record[k] for k in ("loss", "ratio") if k in record}, prefix="")
        for callback in self.callbacks:
            callback(record)
        if self.criterion.stop is not None and done < self.end.last:
            self.end.last, self.end.stop = done, self.criterion.stop


class SaveRows:
    """--save_steps: learned_embeds-steps-N.safetensors (each concept's, in its folder) every
    `every` updates (0: never); with --lora_rank, the LoRA's two files with the same suffix.

    A failed write warns and training continues; the final save may still fit.
    """

    def __init__(self, run, engine, every):
        self.run, self.engine, self.every = run, engine, every

    def due(self, done, stopping=False):
        return bool(self.every) and done % self.every == 0

    def __call__(self, done, stopping=False):
        try:
            rows = self.engine.rows()
            save_intermediate(self.run, rows, done)
            factors = self.engine.lora()
            if factors is not None:  # pivotal tuning: the LoRA of the same update beside them
                save_lora(self.run, rows, factors, done, suffix=f"-steps-{done}")
        except files.WriteFailed as err:
            save_failed(done, f"learned_embeds-steps-{done}.safetensors", err)


class ValidationLoss:
    """--validation_loss_steps: the validation loss every N updates and after the last one.

    Every process takes part (each evaluates its share of the examples); the logger and the
    callbacks get a "validation_loss" record.

    Args:
      engine: its `validation_loss()` evaluates. logger: logs.MetricsLogger. callbacks: functions.
    Attributes:
      records: one {"kind": "validation_loss", "step", "loss"} per evaluation, with several
        concepts also "loss/<token>": the mean over that concept's examples.
      seconds: seconds spent evaluating, the first evaluation's compile included; first_seconds:
        the first evaluation's (None before it).
    """

    def __init__(self, run, engine, logger, callbacks, end=None):
        self.run, self.engine, self.logger, self.callbacks = run, engine, logger, callbacks
        self.end = end or End(run.total_steps)
        self.records, self.seconds, self.first_seconds = [], 0.0, None

    def due(self, done, stopping=False):
        return done % self.run.config.validation_loss_steps == 0 or self.end.is_last(done)

    def __call__(self, done, stopping=False):
        start = time.perf_counter()
        losses = self.engine.validation_loss()
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.first_seconds = elapsed if self.first_seconds is None else self.first_seconds
        record = {"kind": "validation_loss", "step": done, **losses}
        self.records.append(record)
        self.logger.log(done, {f"validation_{name}": value for name, value in losses.items()}, prefix="")
        for callback in self.callbacks:
            callback(record)


class Validate:
    """--validation_prompt: images every --validation_steps updates and after the last one.

    Args:
      validator: validation.Validator. logger: logs.MetricsLogger (gets the grid).
      history: LogStep.history (for the model card). callbacks: get a "validation" record.
      validation_losses: ValidationLoss.records, for the model card's loss plot.
      end: the run's End (default: its last update).
      writer: whether this process writes; another one (with --shard_weights in a multi-process
        run) only takes part in sampling, which spans every process's devices.
    Attributes:
      last_grid: the newest grid image's path, or None.
    """

    def __init__(self, run, engine, validator, logger, history, callbacks, validation_losses=(), end=None,
                 writer=True):
        self.run, self.engine, self.validator, self.logger = run, engine, validator, logger
        self.history, self.callbacks, self.validation_losses = history, callbacks, validation_losses
        self.end, self.writer = end or End(run.total_steps), writer
        self.last_grid = None

    def due(self, done, stopping=False):
        return done % self.run.config.validation_steps == 0 or self.end.is_last(done)

    def __call__(self, done, stopping=False):
        """Render the validation images (each concept's, with --concepts); a "validation" record
        per prompt goes to the callbacks."""
        config = self.run.config
        if not self.writer:
            self.validator.sample(self.engine.rows(), self.engine.lora_pair())
            return
        try:
            results = self.validator(self.engine.rows(), done, self.engine.lora_pair())
            for name, _, grid_path, images in results:
                self.logger.log_image(done, f"validation/{name}" if name else "validation", grid_image(images))
            self.last_grid = results[0][2]
            model_card.write_model_card(config, self.run.tokens, self.history, {}, self.run.family, self.last_grid,
                                        self.run.learned, self.validation_losses)
        except files.WriteFailed as err:
            save_failed(done, "the validation images", err)
            return
        for name, paths, grid_path, _ in results:
            record = {"kind": "validation", "step": done, "images": paths, "grid": grid_path}
            for callback in self.callbacks:
                callback({**record, "concept": name} if name else record)


class Checkpoint:
    """--checkpointing_steps (0: never), and the checkpoint a stop promises.

    Process 0 writes; every process takes part. A failed periodic checkpoint warns and training
    continues; a failed stop checkpoint raises, since it is the run's final save. With
    `criterion` (--early_stopping's early_stopping.DVAR) its history goes into the checkpoint's
    meta.json, so a resumed run stops where an uninterrupted one does.
    Attributes: path: the last checkpoint written, or None.
    """

    def __init__(self, run, engine, every, writer, criterion=None):
        self.run, self.engine, self.every, self.writer = run, engine, every, writer
        self.criterion = criterion
        self.path = None

    def due(self, done, stopping=False):
        return stopping or (bool(self.every) and done % self.every == 0)

    def __call__(self, done, stopping=False):
        try:
            extra = () if self.criterion is None else ({ckpt.EARLY_STOPPING: self.criterion.state()},)
            self.path = save_checkpoint(self.run, self.engine.state, *extra) if self.writer else None
        except files.WriteFailed as err:
            if stopping:
                raise
            save_failed(done, f"checkpoint-{done}", err)


def save_checkpoint(run, state, extra=None):
    """Write replicated `state` as a checkpoint of `run` (`extra`: more meta.json entries);
    TrainingDiverged if its rows are not finite."""
    host_state = parallel.unreplicate(state)
    if not np.all(np.isfinite(host_state.rows)):
        raise TrainingDiverged(f"step {int(host_state.step)}: learned rows are NaN/Inf; no checkpoint written")
    return ckpt.save_checkpoint(run.config.output_dir, host_state, {**run.meta, **(extra or {})}, run.family,
                                run.config.checkpoints_total_limit)


def save_intermediate(run, rows, step):
    for learned in run.learned:
        run.family.save_embedding(learned.out_dir, learned.tokens[0], rows[learned.rows],
                                  run.model.spec.text_widths, step=step)
