"""--early_stopping dvar: end the run when the concept stops changing the training objective.

DVAR (Voronov, Khoroshikh, Babenko and Ryabinin, "Is This Loss Informative? Faster Text-to-Image
Customization by Tracking Objective Dynamics", NeurIPS 2023; code: yandex-research/DVAR,
`early_stopping.py: VarEarlyStopper`, `textual_inversion.py`): the training loss of a step says
little, since each step draws its own images, noises and timesteps. With those inputs fixed for
the whole run, the loss changes only because the learned rows do; once the concept is learned it
stops changing. DVAR evaluates that deterministic loss every step and stops at the first
evaluation where

    var(the losses of the last `window` evaluations) < threshold x var(every loss so far),

both population variances (numpy's `var`), once the history holds more than the window. The
paper's code stops with window 200 and threshold 0.15 (`VarEarlyStopper(eps=0.15, window=200)`,
`--early_stop_patience 200 --early_stop_eps 0.15 --early_stop_freq 1`), on one batch of 4
training examples (`--eval_batch_size 4`), the first loss being the starting rows'.

Here, as there, the loss is of EXAMPLES fixed training examples (`examples`): training image
k mod n at the k-th of the validation loss's timesteps (200, 400, 600, 800), with the validation
loss's draws for that (image, timestep) (validation_loss.Evaluator), so it is the same on any
number of devices or processes and after a resume. The window is counted in optimizer updates
(`--early_stopping_window`, a multiple of `--early_stopping_every`): with the loss computed every
k updates it holds window / k evaluations. The first evaluation is at the step early stopping
starts from (0, or the step a run that turns it on resumes at).

A flat loss (every evaluation equal, so its variance since the start is 0) stops nothing: the
ratio 0 / 0 is undefined, as numpy's NaN < threshold is false in the paper's code. A loss that
only drifts steadily (rows moved by weight decay alone) does stop, after about 2.6 windows (the
ratio of a straight line's variances is (window / span)^2): the stop says the loss settled, not
that the concept was learned, so the report gives how far it fell.
"""

import dataclasses

import numpy as np

from .validation_loss import TIMESTEP_COUNT

EXAMPLES = 4  # the paper's --eval_batch_size: the deterministic loss's examples per concept


def images_used(count):
    """How many of a concept's first `count` training images the deterministic loss uses."""
    return min(EXAMPLES, count)


def examples(counts):
    """The deterministic loss's examples for concepts of `counts` training images each.

    The images passed to the Evaluator are each concept's first `images_used(n)` training images,
    concept after concept. Returns (index into those images, timestep index, example id), each
    int64 [EXAMPLES x len(counts)]: for each concept, example k is its image k mod n at
    timestep index k mod 4, and its id is the one validation_loss.examples gives that (image,
    timestep) over all concepts' training images in one list, so its noises are the validation
    loss's.
    """
    rows, timestep, ids, used, offset = [], [], [], 0, 0
    for n in counts:
        k = np.arange(EXAMPLES)
        rows.append(used + k % n)
        timestep.append(k % TIMESTEP_COUNT)
        ids.append((offset + k % n) * TIMESTEP_COUNT + k % TIMESTEP_COUNT)
        used, offset = used + images_used(n), offset + n
    return tuple(np.concatenate(x).astype(np.int64) for x in (rows, timestep, ids))


@dataclasses.dataclass(frozen=True)
class Stop:
    """Where and why DVAR ended a run: at update `step`, the variance of the last `window`
    updates' losses was `ratio` times the variance since `first_step` (below `threshold`); the
    loss went from `first_loss` there to `last_loss`."""

    step: int
    ratio: float
    threshold: float
    window: int
    first_step: int
    first_loss: float
    last_loss: float

    def reason(self):
        """One line: the criterion and how far the loss fell."""
        change = (self.last_loss - self.first_loss) / self.first_loss if self.first_loss else 0.0
        direction = "lower" if change <= 0 else "higher"
        return (f"DVAR: the deterministic loss's variance over the last {self.window} updates is {self.ratio:.3g} "
                f"of its variance since step {self.first_step} (threshold {self.threshold:g}); it went from "
                f"{self.first_loss:.5g} to {self.last_loss:.5g} ({abs(change):.2%} {direction})")

    def record(self):
        return dataclasses.asdict(self)


class DVAR:
    """The criterion's state: the deterministic loss of each evaluation, and whether it says stop.

    Args:
      window: updates in the window (a multiple of the evaluation interval).
      threshold: stop when the window's variance is below this fraction of the whole history's.
      min_steps: never stop before this update.
      history: a checkpoint's `state()` (or None: none yet).
    Attributes:
      steps, losses: each evaluation's update and loss (Python ints and floats), oldest first.
      stop: the Stop once the criterion holds, else None.
    """

    def __init__(self, window, threshold, min_steps=0, history=None):
        self.window, self.threshold, self.min_steps = window, threshold, min_steps
        history = history or {}
        self.steps = [int(s) for s in history.get("steps", ())]
        self.losses = [float(x) for x in history.get("losses", ())]
        self.stop = None
        if self.steps:  # a checkpoint written at the step the criterion held: the run had ended
            self.stop = self._check()

    def ratio(self):
        """var(last window) / var(every loss) at the newest evaluation, or None where the history
        does not yet reach past the window or every loss is equal (no variance to compare with)."""
        if not self.steps or self.steps[-1] - self.steps[0] < self.window:
            return None
        losses = np.asarray(self.losses, np.float64)
        whole = float(np.var(losses))
        if whole == 0.0:
            return None
        recent = losses[np.asarray(self.steps) > self.steps[-1] - self.window]
        return float(np.var(recent)) / whole

    def add(self, step, loss):
        """Record the loss of update `step`; returns the ratio (see `ratio`) and sets `stop` when
        it is below the threshold at or after --early_stopping_min_steps."""
        self.steps.append(int(step))
        self.losses.append(float(loss))
        self.stop = self._check()
        return self.ratio()

    def _check(self):
        ratio = self.ratio()
        if ratio is None or ratio >= self.threshold or self.steps[-1] < self.min_steps:
            return None
        return Stop(self.steps[-1], ratio, self.threshold, self.window, self.steps[0], self.losses[0], self.losses[-1])

    def state(self):
        """What a checkpoint keeps (JSON: Python floats round-trip exactly), for `DVAR(history=...)`."""
        return {"steps": list(self.steps), "losses": list(self.losses)}
