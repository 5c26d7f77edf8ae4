"""Learning-rate schedules and the optimizer for the learned rows (pure functions)."""

import dataclasses
from typing import Optional

import optax


def learning_rate(config, num_devices):
    """The base learning rate; `--scale_lr` multiplies it by the global batch size of one update
    (per-device batch x devices x --gradient_accumulation_steps), as diffusers does."""
    if config.scale_lr:
        return config.learning_rate * config.train_batch_size * num_devices * config.gradient_accumulation_steps
    return config.learning_rate


def lr_schedule(name, peak, warmup_steps, total_steps):
    """An optax schedule with the meaning of diffusers' `get_scheduler(name, ...)`.

    `constant` ignores warmup (as diffusers does); the others warm up linearly from 0 over
    `warmup_steps`, then hold (`constant_with_warmup`) or decay to 0 (`linear`, `cosine`) or to
    1e-7 (`polynomial`, power 1) at `total_steps`.
    """
    if name == "constant":
        return optax.constant_schedule(peak)
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1)) if warmup_steps else None
    decay_steps = max(total_steps - warmup_steps, 1)
    if name == "constant_with_warmup":
        after = optax.constant_schedule(peak)
    elif name == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    elif name == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    elif name == "polynomial":
        after = optax.polynomial_schedule(peak, min(1e-7, peak), 1.0, decay_steps)
    else:
        raise ValueError(f"unknown lr scheduler {name!r}")
    if warmup is None:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer's hyperparameters: hashable, so a compiled step can be cached by them."""

    lr_scheduler: str
    peak_lr: float
    warmup_steps: int
    total_steps: int
    beta1: float
    beta2: float
    epsilon: float
    weight_decay: float
    max_grad_norm: Optional[float]
    accumulation_steps: int = 1  # micro-batches per optimizer update (optax.MultiSteps when > 1)

    @classmethod
    def from_config(cls, config, num_devices, total_steps):
        # Lengths that do not shape the schedule are zeroed, so runs that differ only there
        # share one compiled step.
        constant = config.lr_scheduler == "constant"
        return cls(
            lr_scheduler=config.lr_scheduler,
            peak_lr=learning_rate(config, num_devices),
            warmup_steps=0 if constant else config.lr_warmup_steps,
            total_steps=0 if config.lr_scheduler in ("constant", "constant_with_warmup") else total_steps,
            beta1=config.adam_beta1,
            beta2=config.adam_beta2,
            epsilon=config.adam_epsilon,
            weight_decay=config.adam_weight_decay,
            max_grad_norm=config.max_grad_norm,
            accumulation_steps=config.gradient_accumulation_steps,
        )

    def schedule(self):
        return lr_schedule(self.lr_scheduler, self.peak_lr, self.warmup_steps, self.total_steps)

    def build(self):
        """AdamW over the learned rows only, optionally after global-norm clipping.

        The optimizer only ever sees the [num_vectors, hidden] rows (the frozen table is not
        part of the trainable tree), so its state is two [num_vectors, hidden] moments and a
        count. With `accumulation_steps` K > 1 it is wrapped in `optax.MultiSteps`: each call
        adds one micro-batch's gradient to a running mean (one more [num_vectors, hidden]
        buffer) and every K-th call applies the update; the schedule counts updates.
        """
        parts = []
        if self.max_grad_norm is not None:
            parts.append(optax.clip_by_global_norm(self.max_grad_norm))
        parts.append(
            optax.adamw(self.schedule(), b1=self.beta1, b2=self.beta2, eps=self.epsilon, weight_decay=self.weight_decay)
        )
        tx = optax.chain(*parts)
        if self.accumulation_steps > 1:
            tx = optax.MultiSteps(tx, every_k_schedule=self.accumulation_steps)
        return tx

    def updated(self, opt_state):
        """Whether the update that produced `opt_state` changed the rows (always, without accumulation)."""
        if self.accumulation_steps == 1:
            return True
        return opt_state.mini_step == 0  # MultiSteps wraps its micro-step counter when it applies
