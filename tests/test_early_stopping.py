"""--early_stopping dvar: DVAR's criterion, its fixed examples, its flags, and the loop it ends.

The criterion is the paper's code's (yandex-research/DVAR, early_stopping.py: VarEarlyStopper):
stop at the first evaluation where the population variance of the last `window` deterministic
losses is below `threshold` times that of every loss so far. These tests need no model; the
end-to-end runs (resume, device counts, the files written) are in test_early_stopping_run.py.
"""

import json

import numpy as np
import pytest

from test_engine import FakeEngine, Logger, Recorded, make_log
from ti_flax import TrainConfig
from ti_flax.commands import train as training
from ti_flax.config import checks, cli
from ti_flax.errors import UserError
from ti_flax.training import checkpoint, early_stopping, validation_loss
from ti_flax.training.actions import Checkpoint, EarlyStop, End, StopVote, ValidationLoss
from ti_flax.training.early_stopping import DVAR

WINDOW, THRESHOLD = 200, 0.15  # the paper's code: VarEarlyStopper(eps=0.15, window=200)


def learning_curve(steps, plateau=150, seed=0):
    """A deterministic loss as a run gives it: falls by 0.02 over about `plateau` updates, then
    wobbles by 1e-4 (the rows jitter around what they learned)."""
    t = np.arange(steps)
    wobble = 1e-4 * np.random.default_rng(seed).standard_normal(steps)
    return 0.20 + 0.02 * np.exp(-t / (plateau / 4)) + wobble


def papers_stop(losses, window=WINDOW, threshold=THRESHOLD):
    """The paper's rule written out: after appending loss i (the loss after i updates), once at
    least `window` are in, ratio = var(last window) / var(all); stop where ratio < threshold."""
    for i in range(len(losses)):
        history = np.asarray(losses[: i + 1])
        if len(history) >= window and np.var(history[-window:]) / np.var(history) < threshold:
            return i
    return None


def first_stop(criterion, losses, every=1):
    for step in range(0, len(losses), every):
        criterion.add(step, losses[step])
        if criterion.stop is not None:
            return criterion.stop
    return None


def test_the_criterion_is_the_papers():
    # Fails if the window is counted otherwise (one more or less evaluation), the variances are
    # sample variances (ddof=1), or the ratio is taken the other way up.
    losses = learning_curve(1000)
    want = papers_stop(losses)
    assert want is not None and WINDOW < want < 500  # the curve settles: the paper's rule stops it
    stop = first_stop(DVAR(WINDOW, THRESHOLD), losses)
    assert stop.step == want
    history = np.asarray(losses[: want + 1])
    assert stop.ratio == pytest.approx(np.var(history[-WINDOW:]) / np.var(history), rel=1e-12)
    assert (stop.first_step, stop.first_loss, stop.last_loss) == (0, losses[0], losses[want])


def test_a_flat_loss_never_stops_and_a_steady_drift_stops_after_about_two_and_a_half_windows():
    # A flat loss (every evaluation equal: nothing moves the loss) has no variance to compare
    # with: no stop, as NaN < threshold is false in the paper's code. A straight line's ratio is
    # about (window / span)^2, below 0.15 past 2.58 windows: a loss that only drifts (rows moved by
    # weight decay alone) does stop, and the stop's numbers show how little it fell.
    flat = DVAR(20, THRESHOLD)
    assert first_stop(flat, np.full(200, 0.25)) is None and flat.ratio() is None
    drift = first_stop(DVAR(20, THRESHOLD), 0.25 - 1e-7 * np.arange(200))
    assert 20 * 2.5 < drift.step < 20 * 2.7
    assert (drift.first_loss - drift.last_loss) / drift.first_loss < 1e-4
    assert "0.00% lower" in drift.reason()


def test_every_k_updates_the_window_still_counts_updates():
    # With the loss every 5 updates, a window of 200 updates holds 40 evaluations; the first
    # check is once the history reaches 200 updates past its start.
    losses = learning_curve(1000)
    criterion = DVAR(WINDOW, THRESHOLD)
    for step in range(0, 200, 5):
        assert criterion.add(step, losses[step]) is None
    ratio = criterion.add(200, losses[200])
    thinned = losses[0:201:5]
    assert ratio == pytest.approx(np.var(thinned[-40:]) / np.var(thinned), rel=1e-12)


def test_the_floor_holds_the_stop_back():
    losses = learning_curve(1000)
    free = first_stop(DVAR(WINDOW, THRESHOLD), losses)
    floored = first_stop(DVAR(WINDOW, THRESHOLD, min_steps=free.step + 50), losses)
    assert floored.step >= free.step + 50


def test_the_history_goes_through_a_checkpoint_exactly_and_a_resumed_criterion_stops_where_the_whole_one_did():
    # Fails if the checkpoint rounds the losses (float32, or fewer digits in JSON): the resumed
    # criterion's variances would differ in the last bits and a ratio near the threshold flip.
    losses = learning_curve(1000)
    whole = first_stop(DVAR(WINDOW, THRESHOLD), losses)
    half = DVAR(WINDOW, THRESHOLD)
    for step in range(150):
        half.add(step, losses[step])
    saved = json.loads(json.dumps(half.state()))
    resumed = DVAR(WINDOW, THRESHOLD, history=saved)
    assert resumed.losses == half.losses and resumed.stop is None
    for step in range(150, 1000):
        resumed.add(step, losses[step])
        if resumed.stop is not None:
            break
    assert resumed.stop == whole
    # A checkpoint written at the stopping update: restored, the run has already ended there.
    assert DVAR(WINDOW, THRESHOLD, history=json.loads(json.dumps(resumed.state()))).stop == whole


@pytest.mark.parametrize("counts, want", [
    # One concept of 10 images: images 0-3, each at its own timestep; ids as the validation loss's.
    ([10], ([0, 1, 2, 3], [0, 1, 2, 3], [0, 5, 10, 15])),
    # Two images: each at two timesteps.
    ([2], ([0, 1, 0, 1], [0, 1, 2, 3], [0, 5, 2, 7])),
    # Two concepts of 6 and 3 images: 4 + 3 images passed; ids over all 9 training images.
    ([6, 3], ([0, 1, 2, 3, 4, 5, 6, 4], [0, 1, 2, 3, 0, 1, 2, 3], [0, 5, 10, 15, 24, 29, 34, 27])),
])
def test_the_examples_are_the_validation_losses_at_one_timestep_each(counts, want):
    # Fails if an example's id is not the one the validation loss gives that (image, timestep):
    # its noises would then be other draws than the validation loss's.
    rows, timesteps, ids = early_stopping.examples(counts)
    assert (rows.tolist(), timesteps.tolist(), ids.tolist()) == tuple(want)
    everything = validation_loss.examples(sum(counts), np.arange(4))
    image_of_id = dict(zip(everything[2].tolist(), everything[0].tolist()))
    offsets = np.cumsum([0, *counts[:-1]])
    used = np.cumsum([0, *[early_stopping.images_used(n) for n in counts[:-1]]])
    for row, t, i in zip(rows, timesteps, ids):
        concept = np.searchsorted(used, row, side="right") - 1
        assert image_of_id[int(i)] == offsets[concept] + row - used[concept] and i % 4 == t


# ---- the flags ---------------------------------------------------------------------------------


def config(**changes):
    return TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", placeholder_token="<t>",
                       initializer_token="toy", **{"max_train_steps": 1000, **changes})


@pytest.mark.parametrize("changes, expected", [
    ({"early_stopping": "loss"}, "--early_stopping must be one of none, dvar"),
    ({"early_stopping_window": 100}, "--early_stopping_window needs --early_stopping dvar"),
    ({"early_stopping_threshold": 0.2}, "--early_stopping_threshold needs --early_stopping dvar"),
    ({"early_stopping_every": 5}, "--early_stopping_every needs --early_stopping dvar"),
    ({"early_stopping_min_steps": 10}, "--early_stopping_min_steps needs --early_stopping dvar"),
    ({"early_stopping": "dvar", "early_stopping_window": 1000},
     "--early_stopping_window 1000 is not shorter than the run (1000"),
    ({"early_stopping": "dvar", "early_stopping_min_steps": 1000},
     "--early_stopping_min_steps 1000 is not below the run's 1000"),
    ({"early_stopping": "dvar", "early_stopping_threshold": 0.0}, "--early_stopping_threshold must be between 0 and 1"),
    ({"early_stopping": "dvar", "early_stopping_threshold": 1.0}, "--early_stopping_threshold must be between 0 and 1"),
    ({"early_stopping": "dvar", "early_stopping_every": 0}, "--early_stopping_every must be at least 1"),
    ({"early_stopping": "dvar", "early_stopping_every": 3},
     "--early_stopping_window must be a multiple of --early_stopping_every (3)"),
    ({"early_stopping": "dvar", "early_stopping_window": 1}, "--early_stopping_window must be a multiple"),
    ({"early_stopping": "dvar", "early_stopping_min_steps": -1}, "--early_stopping_min_steps must be >= 0"),
    ({"early_stopping": "dvar", "enable_bucket": True},
     "--early_stopping has no images to evaluate with --enable_bucket"),
])
def test_bad_values_are_one_line_naming_the_flag(changes, expected):
    with pytest.raises(UserError) as err:
        config(**changes).validate()
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_window_longer_than_a_run_of_epochs_is_refused_once_its_length_is_known():
    # --num_train_epochs runs learn their length from the data: run.prepare checks it then.
    epochs = config(max_train_steps=None, early_stopping="dvar")
    epochs.validate()  # nothing to check yet
    assert [message for ok, message in checks.stopping_fits(epochs, 150) if not ok] == [
        "--early_stopping_window 200 is not shorter than the run (150 updates): it could never stop early; lower it "
        "or raise --max_train_steps"]


def test_the_flags_parse_default_off_and_may_change_on_resume():
    required = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--placeholder_token", "<t>",
                "--initializer_token", "toy"]
    parsed = cli.parse_config(required)
    assert (parsed.early_stopping, parsed.early_stopping_window, parsed.early_stopping_threshold,
            parsed.early_stopping_every, parsed.early_stopping_min_steps) == ("none", 200, 0.15, 1, 0)
    parsed = cli.parse_config(required + ["--early_stopping", "dvar", "--early_stopping_window", "50",
                                          "--early_stopping_threshold", "0.1", "--early_stopping_every", "5",
                                          "--early_stopping_min_steps", "300"])
    assert (parsed.early_stopping, parsed.early_stopping_window, parsed.early_stopping_threshold,
            parsed.early_stopping_every, parsed.early_stopping_min_steps) == ("dvar", 50, 0.1, 5, 300)
    # None changes the rows' path, only where it ends: a resume may turn it on or off, or retune it.
    assert not any(name.startswith("early_stopping") for name in checkpoint.MUST_MATCH)


def test_bad_input_on_the_command_line_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    code = training.main(["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--train_data_dir", "d",
                          "--placeholder_token", "<t>", "--initializer_token", "toy", "--output_dir", str(out),
                          "--max_train_steps", "100", "--early_stopping", "dvar"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--early_stopping_window 200 is not shorter than the run (100 updates)" in err
    assert len(err.splitlines()) == 1 and not out.exists()


# ---- the loop: where the run ends, and what happens there -------------------------------------


class FakeRun:
    def __init__(self, total_steps, window=4, every=1, min_steps=0):
        self.config = TrainConfig(early_stopping="dvar", early_stopping_window=window, early_stopping_every=every,
                                  early_stopping_min_steps=min_steps, max_train_steps=total_steps,
                                  validation_loss_steps=100)
        self.total_steps = total_steps


class Losses:
    """An engine whose deterministic loss after each update is the next of `losses`."""

    def __init__(self, events, losses):
        self.inner, self.losses = FakeEngine(events), list(losses)
        self.events = events

    def update(self):
        return self.inner.update()

    def deterministic_loss(self):
        loss = self.losses[self.inner.updates]
        self.events.append(("deterministic", self.inner.updates))
        return loss

    def rows(self):
        return self.inner.rows()


def run_early(total, losses, events, window=4, history=None, stop=None, checkpoint=None, start=0):
    run = FakeRun(total, window)
    engine = Losses(events, losses)
    engine.inner.updates = start
    end = End(total)
    early = EarlyStop(run, engine, end, Logger(), [], history)
    early.start(start)
    log = make_log(events)
    checkpoint = checkpoint or Recorded("checkpoint", events, every=10**9, on_stop=True)
    last = Recorded("last", events, every=10**9)
    last.due = lambda done, stopping=False: end.is_last(done)  # an action run after the last update
    training.loop(engine, range(start, max(start, end.last)), log, StopVote(stop, devices=(None,)),
                  [early, last, checkpoint], checkpoint, end)
    return early, end, log


# The deterministic loss after 0, 1, 2, ... updates. With a window of 4 DVAR holds at update 5: the
# variance of the losses after updates 2-5 is 0.022 of that of all six (at 4 it is 0.18).
SETTLING = [1.0, 0.5, 0.3, 0.2, 0.2, 0.2001, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
STOP = 5


def test_the_run_ends_after_the_actions_of_the_update_dvar_stops_at():
    # Fails if the loop runs past the stop, or ends before the actions due "after the last update"
    # (the validation loss and images) have run at it.
    events = []
    early, end, log = run_early(12, SETTLING, events)
    assert end.stop is not None and end.last == end.stop.step == STOP
    assert [r["step"] for r in log.history] == list(range(1, STOP + 1))
    # Logged before the loss is read (a NaN update raises first); the last update's actions run.
    assert events[-4:] == [("update", STOP), ("log", STOP), ("deterministic", STOP), ("last", STOP)]
    assert [r["step"] for r in early.records] == list(range(STOP + 1))  # the starting rows' loss first


def test_the_actions_of_the_last_update_see_where_early_stopping_put_it(tmp_path):
    run = FakeRun(12)
    evaluate = ValidationLoss(run, None, Logger(), [], End(12))
    assert [d for d in range(1, 13) if evaluate.due(d)] == [12]  # every 100 updates, and after the last
    end = End(12)
    end.last = STOP
    assert [d for d in range(1, 13) if ValidationLoss(run, None, Logger(), [], end).due(d)] == [STOP]


def test_a_signal_at_the_stopping_update_ends_the_run_without_preempting_it():
    events, stop = [], type("Stop", (), {"requested": 0})()
    engine_stop_at = STOP

    class Signalled(Losses):
        def update(self):
            metrics = super().update()
            if self.inner.updates == engine_stop_at:
                stop.requested = 15
            return metrics

    run = FakeRun(12)
    engine = Signalled(events, SETTLING)
    end = End(12)
    early = EarlyStop(run, engine, end, Logger(), [])
    early.start(0)
    checkpoint = Recorded("checkpoint", events, every=10**9, on_stop=True)
    training.loop(engine, range(0, 12), make_log(events), StopVote(stop, devices=(None,)), [early, checkpoint],
                  checkpoint, end)  # no Preempted: the run is complete at STOP
    assert end.last == STOP and ("checkpoint", STOP) in events


def test_a_run_resumed_at_its_stopping_update_takes_no_step():
    events = []
    whole, _, _ = run_early(12, SETTLING, events)
    events = []
    _, end, log = run_early(12, SETTLING, events, history=json.loads(json.dumps(whole.criterion.state())),
                            start=STOP)
    assert end.last == STOP and log.history == [] and not [e for e in events if e[0] == "update"]


def test_the_checkpoint_keeps_the_history(monkeypatch):
    from ti_flax.training import actions

    saved = []

    monkeypatch.setattr(actions, "save_checkpoint", lambda run, state, *extra: saved.append(extra) or "out/c")
    criterion = DVAR(4, 0.15)
    criterion.add(0, 0.5)
    Checkpoint(FakeRun(12), FakeEngine([]), 1, True, criterion)(1)
    Checkpoint(FakeRun(12), FakeEngine([]), 1, True)(1)
    assert saved == [({checkpoint.EARLY_STOPPING: {"steps": [0], "losses": [0.5]}},), ()]
