"""The train loop and its periodic actions, with a fake engine: no model, nothing compiled.

The loop's contract: a step's metrics are read one update later, except where an action is due
or the run stops, where the step is logged (and a NaN/Inf stops the run) before anything is
saved; every process votes on stopping after each update; a stop checkpoints, then raises
Preempted; a failed intermediate save warns and training goes on.
"""

import numpy as np
import pytest

from ti_flax.training import actions
from ti_flax import families, files
from ti_flax.commands import train as training
from ti_flax.training.actions import (
    Checkpoint, LogStep, SaveRows, StopVote, TrainingDiverged, Validate, ValidationLoss,
)
from ti_flax.training.preemption import Preempted


def micro_metrics(loss=0.5, finite=True, devices=2):
    """One micro-step's metrics as the pmapped step returns them: a leading device axis."""
    return {
        "loss": np.full((devices,), loss, np.float32),
        "grad_norm": np.full((devices,), 2.0, np.float32),
        "row_norms": np.ones((devices, 3), np.float32),
        "finite": np.full((devices,), finite),
    }


class FakeEngine:
    """Counts updates into `events`; `nan_at` makes that update's loss NaN; `stop_at` raises a
    stop signal (in `stop`) during that update, as a SIGTERM arriving mid-step would."""

    def __init__(self, events, nan_at=(), stop_at=None, stop=None, accumulation=1):
        self.events, self.nan_at, self.stop_at, self.stop = events, set(nan_at), stop_at, stop
        self.accumulation, self.updates = accumulation, 0
        self.state = "state"

    def update(self):
        self.updates += 1
        self.events.append(("update", self.updates))
        if self.updates == self.stop_at:
            self.stop.requested = 15
        nan = self.updates in self.nan_at
        return [micro_metrics(float("nan") if nan else 0.5, finite=not nan) for _ in range(self.accumulation)]

    def rows(self):
        return np.zeros((3, 4), np.float32)

    def lora(self):  # a run without --lora_rank
        return None

    def lora_pair(self):
        return None


class Recorded:
    """A periodic action that records when it runs; due every `every` updates."""

    def __init__(self, name, events, every, on_stop=False):
        self.name, self.events, self.every, self.on_stop = name, events, every, on_stop
        self.path = f"out/{name}"

    def due(self, done, stopping=False):
        return (self.on_stop and stopping) or done % self.every == 0

    def __call__(self, done, stopping=False):
        self.events.append((self.name, done))


class Bar:
    def __init__(self):
        self.updates = 0

    def set_postfix(self, **kwargs):
        self.postfix = kwargs

    def update(self, n):
        self.updates += n


class Logger:
    def __init__(self):
        self.steps, self.images = [], []

    def log(self, step, values, prefix="train/"):
        self.steps.append((step, values) if prefix == "train/" else (step, values, prefix))

    def log_image(self, step, name, image):
        self.images.append((step, name, image.shape))


class Stop:
    requested = 0


def make_log(events, callbacks=()):
    log = LogStep(lambda step: 1e-3 * (step + 1), Logger(), list(callbacks), Bar())
    recording = lambda rec: events.append(("log", rec["step"]))  # noqa: E731
    log.callbacks.append(recording)
    return log


def run_loop(steps, events, engine, actions_, stop=None, start=0, checkpoint=None):
    log = make_log(events)
    checkpoint = checkpoint or Recorded("checkpoint", events, every=10**9, on_stop=True)
    training.loop(engine, range(start, steps), log, StopVote(stop, devices=(None,)), list(actions_) + [checkpoint],
               checkpoint)
    return log


def test_metrics_are_read_one_update_later():
    events = []
    log = run_loop(4, events, FakeEngine(events), [])
    assert events == [("update", 1), ("update", 2), ("log", 1), ("update", 3), ("log", 2), ("update", 4),
                      ("log", 3), ("log", 4)]
    assert [r["step"] for r in log.history] == [1, 2, 3, 4]


def test_a_step_with_a_save_is_logged_before_it_is_saved():
    events = []
    run_loop(4, events, FakeEngine(events), [Recorded("save", events, every=2)])
    assert events == [("update", 1), ("update", 2), ("log", 1), ("log", 2), ("save", 2), ("update", 3),
                      ("update", 4), ("log", 3), ("log", 4), ("save", 4)]


def test_actions_due_together_run_in_order():
    events = []
    acts = [Recorded("rows", events, every=2), Recorded("images", events, every=3)]
    run_loop(6, events, FakeEngine(events), acts, checkpoint=Recorded("checkpoint", events, every=2, on_stop=True))
    at_6 = events[events.index(("log", 6)):]
    assert at_6 == [("log", 6), ("rows", 6), ("images", 6), ("checkpoint", 6)]


def test_a_resumed_loop_counts_from_its_start():
    events = []
    log = run_loop(5, events, FakeEngine(events), [Recorded("save", events, every=2)], start=2)
    assert [r["step"] for r in log.history] == [3, 4, 5]
    assert ("save", 4) in events and ("save", 2) not in events


def test_nan_stops_the_run_before_a_save():
    events = []
    with pytest.raises(TrainingDiverged, match=r"step 2: loss or gradients became NaN/Inf"):
        run_loop(4, events, FakeEngine(events, nan_at={2}), [Recorded("save", events, every=2)])
    assert ("save", 2) not in events and events[-1] == ("log", 1)


def test_nan_without_a_save_stops_one_update_later():
    events = []
    with pytest.raises(TrainingDiverged, match="step 2"):
        run_loop(4, events, FakeEngine(events, nan_at={2}), [])
    assert events[-1] == ("update", 3)  # dispatched before step 2's metrics were read


def test_a_nan_in_any_micro_step_stops_the_run():
    metrics = [micro_metrics(), micro_metrics(float("nan"), finite=False)]
    with pytest.raises(TrainingDiverged):
        make_log([])(1, metrics)


def test_a_stop_vote_checkpoints_then_raises_preempted():
    events, stop = [], Stop()
    with pytest.raises(Preempted, match="stopped by signal at step 3; checkpoint saved in out/checkpoint") as err:
        run_loop(10, events, FakeEngine(events, stop_at=2, stop=stop), [], stop=stop)
    # Update 2's vote is read with its metrics, at update 3; update 3 is logged and checkpointed.
    assert events[-4:] == [("update", 3), ("log", 2), ("log", 3), ("checkpoint", 3)]
    assert err.value.exit_code == 128 + 15


def test_a_stop_at_a_save_step_saves_everything_and_checkpoints_once():
    events, stop = [], Stop()
    checkpoint = Recorded("checkpoint", events, every=3, on_stop=True)
    with pytest.raises(Preempted, match="step 3"):
        run_loop(10, events, FakeEngine(events, stop_at=3, stop=stop), [Recorded("save", events, every=3)],
                 stop=stop, checkpoint=checkpoint)
    # The stop is read with update 3's own metrics, since the save made the loop read them.
    assert events[-3:] == [("log", 3), ("save", 3), ("checkpoint", 3)]


def test_preempted_names_the_checkpoint_and_the_signal():
    stop = Stop()
    stop.requested = 2
    err = StopVote(stop, (None,)).preempted(7, "out/checkpoint-7")
    assert "step 7" in str(err) and "out/checkpoint-7" in str(err) and "--resume_from_checkpoint latest" in str(err)
    assert err.exit_code == 128 + 2
    assert StopVote(None, (None,)).preempted(1, "p").exit_code == 128 + 15  # no signal: SIGTERM's code
    assert StopVote(None, (None,)).result(StopVote(None, (None,)).cast()) is False


# ---- the actions alone ----------------------------------------------------------------------


def test_log_step_records_everywhere():
    seen = []
    log = LogStep(lambda step: 0.1 * step, Logger(), [seen.append], Bar())
    rec = log(3, [micro_metrics(0.25), micro_metrics(0.75)])
    assert rec["kind"] == "step" and rec["step"] == 3 and rec["loss"] == pytest.approx(0.5)
    assert rec["lr"] == pytest.approx(0.2)  # the rate the update used: schedule(step - 1)
    assert rec["grad_norm"] == pytest.approx(2.0) and rec["row_norms"] == [1.0, 1.0, 1.0]
    assert log.history == [rec] and seen == [rec] and log.bar.updates == 1
    assert log.logger.steps == [(3, {k: v for k, v in rec.items() if k not in ("step", "kind")})]


class FakeRun:
    def __init__(self, output_dir, total_steps=10, validation_steps=4, validation_loss_steps=0):
        from ti_flax import TrainConfig

        self.config = TrainConfig(output_dir=str(output_dir), validation_steps=validation_steps,
                                  validation_loss_steps=validation_loss_steps)
        self.tokens, self.total_steps, self.meta, self.learned = ["<t>"], total_steps, {}, ()
        self.family = families.get("sd1")


def write_failed(*args, **kwargs):
    raise files.WriteFailed("out/x", OSError(28, "No space left on device"))


def test_save_rows_warns_and_training_continues(monkeypatch, tmp_path):
    save = SaveRows(FakeRun(tmp_path), FakeEngine([]), every=2)
    assert [save.due(d) for d in (1, 2, 3, 4)] == [False, True, False, True]
    assert not SaveRows(None, None, every=0).due(2)
    monkeypatch.setattr(actions, "save_intermediate", write_failed)
    with pytest.warns(UserWarning, match="step 2: learned_embeds-steps-2.safetensors not saved, training continues"):
        save(2)


def test_a_failed_intermediate_save_does_not_stop_the_loop(monkeypatch, tmp_path):
    events = []
    monkeypatch.setattr(actions, "save_intermediate", write_failed)
    engine = FakeEngine(events)
    with pytest.warns(UserWarning, match="not saved, training continues"):
        log = run_loop(4, events, engine, [SaveRows(FakeRun(tmp_path), engine, every=1)])
    assert [r["step"] for r in log.history] == [1, 2, 3, 4]


def test_checkpoint_failure_warns_unless_it_is_the_stop_checkpoint(monkeypatch, tmp_path):
    checkpoint = Checkpoint(FakeRun(tmp_path), FakeEngine([]), every=5, writer=True)
    assert [checkpoint.due(d) for d in (4, 5)] == [False, True] and checkpoint.due(4, stopping=True)
    assert not Checkpoint(None, None, every=0, writer=True).due(5)
    monkeypatch.setattr(actions, "save_checkpoint", write_failed)
    with pytest.warns(UserWarning, match="step 5: checkpoint-5 not saved, training continues"):
        checkpoint(5)
    with pytest.raises(files.WriteFailed):
        checkpoint(6, stopping=True)


def test_only_the_writer_writes_checkpoints(monkeypatch, tmp_path):
    monkeypatch.setattr(actions, "save_checkpoint", lambda run, state: "out/checkpoint-5")
    reader = Checkpoint(FakeRun(tmp_path), FakeEngine([]), every=5, writer=False)
    reader(5)
    assert reader.path is None
    writer = Checkpoint(FakeRun(tmp_path), FakeEngine([]), every=5, writer=True)
    writer(5)
    assert writer.path == "out/checkpoint-5"


def test_a_stop_checkpoint_failure_raises_from_the_loop(monkeypatch, tmp_path):
    events, stop = [], Stop()
    monkeypatch.setattr(actions, "save_checkpoint", write_failed)
    engine = FakeEngine(events, stop_at=1, stop=stop)
    with pytest.raises(files.WriteFailed):
        run_loop(10, events, engine, [], stop=stop, checkpoint=Checkpoint(FakeRun(tmp_path), engine, 0, True))


def test_validate_saves_images_logs_the_grid_and_tells_the_callbacks(monkeypatch, tmp_path):
    seen, cards = [], []
    monkeypatch.setattr(actions.model_card, "write_model_card", lambda *args: cards.append(args))

    def validator(rows, step, lora=None):
        return [("", [f"img-{step}.png"], f"grid-{step}.png", np.zeros((2, 8, 8, 3), np.uint8))]

    logger = Logger()
    validate = Validate(FakeRun(tmp_path, total_steps=10, validation_steps=4), FakeEngine([]), validator, logger,
                        [], [seen.append])
    assert [d for d in range(1, 11) if validate.due(d)] == [4, 8, 10]  # and after the last update
    validate(4)
    assert validate.last_grid == "grid-4.png" and logger.images == [(4, "validation", (8, 16, 3))]
    assert seen == [{"kind": "validation", "step": 4, "images": ["img-4.png"], "grid": "grid-4.png"}]
    assert len(cards) == 1

    def failing(rows, step, lora=None):
        raise files.WriteFailed("out/validation", OSError(28, "No space left on device"))

    validate.validator = failing
    with pytest.warns(UserWarning, match="step 8: the validation images not saved"):
        validate(8)
    assert validate.last_grid == "grid-4.png" and len(seen) == 1


def test_validate_with_several_concepts_logs_and_reports_each(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(actions.model_card, "write_model_card", lambda *args: None)

    def validator(rows, step, lora=None):
        return [(name, [f"{name}/img-{step}.png"], f"{name}/grid-{step}.png", np.zeros((1, 8, 8, 3), np.uint8))
                for name in ("<a>", "<b>")]

    logger = Logger()
    validate = Validate(FakeRun(tmp_path), FakeEngine([]), validator, logger, [], [seen.append])
    validate(4)
    assert [name for _, name, _ in logger.images] == ["validation/<a>", "validation/<b>"]
    assert [(r["concept"], r["grid"]) for r in seen] == [("<a>", "<a>/grid-4.png"), ("<b>", "<b>/grid-4.png")]


def test_log_step_records_each_concepts_loss():
    log = LogStep(lambda step: 0.1, Logger(), [], Bar(), concepts=("<a>", "<b>", "<c>"))
    micro = {"loss": np.float32(1.0), "grad_norm": np.float32(1.0), "row_norms": np.ones(2), "finite": True}
    # Two micro-steps: the sums and counts add up; <c> had no example in this update.
    metrics = [{**micro, "concept_loss_sum": np.array([0.5, 3.0, 0.0]), "concept_count": np.array([1.0, 2.0, 0.0])},
               {**micro, "concept_loss_sum": np.array([1.0, 0.0, 0.0]), "concept_count": np.array([1.0, 0.0, 0.0])}]
    rec = log(1, [{k: np.asarray(v)[None] for k, v in m.items()} for m in metrics])
    assert rec["loss/<a>"] == pytest.approx(0.75) and rec["loss/<b>"] == pytest.approx(1.5)
    assert "loss/<c>" not in rec


def test_validation_loss_runs_when_due_and_reports_everywhere(tmp_path):
    seen, logger, engine = [], Logger(), FakeEngine([])
    engine.validation_loss = lambda: {"loss": 0.25, "loss/<a>": 0.5}
    action = ValidationLoss(FakeRun(tmp_path, total_steps=10, validation_loss_steps=4), engine, logger, [seen.append])
    assert [d for d in range(1, 11) if action.due(d)] == [4, 8, 10]  # and after the last update
    action(4)
    record = {"kind": "validation_loss", "step": 4, "loss": 0.25, "loss/<a>": 0.5}
    assert action.records == seen == [record]
    assert logger.steps == [(4, {"validation_loss": 0.25, "validation_loss/<a>": 0.5}, "")]
    assert action.seconds >= action.first_seconds >= 0
