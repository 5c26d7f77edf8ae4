"""Learning-rate schedules, the optimizer for the learned rows (and pivotal tuning's LoRA), and
what follows each update: the rows' norm control and their exponential moving average (pure
functions)."""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from .. import tokens
from ..models import lora as lora_lib
from ..config.flags import MATCH, MAY_CHANGE
from ..errors import UserError


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


def scale_norms(vectors, target, rate, eps=1e-12):
    """`vectors` [..., D] with each one's L2 norm moved `rate` of the way to `target`, its
    direction kept: norm <- norm + rate * (target - norm), computed as (1 - rate) * norm +
    rate * target so that rate 1 gives the target itself. A zero vector stays zero."""
    norm = jnp.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors * (((1.0 - rate) * norm + rate * target) / jnp.maximum(norm, eps))


@dataclasses.dataclass(frozen=True)
class NormControl:
    """--embedding_norm preserve (rate 1) or --embedding_norm_decay R (rate R), after each update.

    As OneTrainer's "preserve embedding norm" (each trained vector rescaled to the median norm
    of the token table) and, with a rate below 1, a soft pull toward it, as cloneofsimo/lora's
    `clip_ti_decay` (whose rate is min(1, 100 x lr) and whose target is 0.4; here both are set).
    An SDXL row's CLIP-L and bigG parts (tokens.split_rows) are each scaled toward their own
    encoder's target.

    Attributes:
      rate: in (0, 1]. targets: one norm per text encoder (None: that encoder's part is not
        trained, --text_encoders, and keeps its rows). widths: the text encoders' widths.
    """

    rate: float
    targets: tuple
    widths: tuple

    def __call__(self, rows):
        parts = tokens.split_rows(rows, self.widths)
        return tokens.join_rows([p if t is None else scale_norms(p, t, self.rate) for p, t in zip(parts, self.targets)])


@dataclasses.dataclass(frozen=True)
class EncoderMask:
    """--text_encoders: the text encoders whose part of each row is trained; the others' parts
    keep their initial rows (no gradient reaches the clipping or Adam's moments, and no update,
    weight decay included, reaches the rows).

    Attributes:
      trained: one bool per text encoder, in the model's order. widths: their widths.
    """

    trained: tuple
    widths: tuple

    def __call__(self, updates):
        """`updates` [..., sum(widths)] with the untrained encoders' columns zero."""
        parts = tokens.split_rows(updates, self.widths)
        return tokens.join_rows([p if keep else jnp.zeros_like(p) for p, keep in zip(parts, self.trained)])

    def transform(self):
        """The mask as an optax transformation (stateless)."""
        return optax.stateless(lambda updates, params=None: self(updates))


def trained_encoders(names, keys):
    """One bool per text encoder (`keys`: their rows' keys, e.g. ("clip_l", "t5xxl")) from
    --text_encoders `names` ("clip_l,t5xxl"); None when every one is trained (the default: the
    same step as without the flag). Raises UserError for an unknown or missing name, or a model
    with one text encoder."""
    if names is None:
        return None
    if len(keys) < 2:
        raise UserError(f"--text_encoders {names}: this model has one text encoder, which is always trained; drop "
                        "the flag")
    chosen = [name.strip() for name in str(names).split(",") if name.strip()]
    unknown = [name for name in chosen if name not in keys]
    if unknown or not chosen:
        raise UserError(f"--text_encoders {names}: this model's text encoders are {', '.join(keys)}; name one or "
                        f"more, comma-separated (e.g. --text_encoders {keys[0]})")
    trained = tuple(key in chosen for key in keys)
    return None if all(trained) else trained


@dataclasses.dataclass(frozen=True)
class Ema:
    """--use_ema: an exponential moving average of the learned rows, as diffusers' EMAModel
    (its defaults; no `use_ema_warmup`, `min_decay` 0). It starts as the initial rows; optimizer
    update k (1 the first) then moves it by (1 - d_k) of the way to the rows after the update,
    ema <- ema - (1 - d_k) * (ema - rows), with d_k = EMAModel.get_decay(k):
    0 for k <= update_after_step + 1, else min((1 + s) / (10 + s), decay), s = k - update_after_step - 1.
    """

    decay: float = 0.9999
    update_after_step: int = 0

    def one_minus_decay(self, step):
        """1 - d_k for update `step` (an int, traced or not), float32. Computed as 9 / (10 + s) and
        1 - decay, so each is rounded once, as diffusers' float64 value handed to a float32 tensor."""
        s = jnp.maximum(jnp.asarray(step, jnp.int32) - self.update_after_step - 1, 0).astype(jnp.float32)
        return jnp.where(s > 0, jnp.maximum(9.0 / (10.0 + s), jnp.float32(1.0 - self.decay)), 1.0)

    def update(self, ema, rows, step):
        """The average after update `step`, whose rows are `rows`."""
        return ema - self.one_minus_decay(step) * (ema - rows)


DEFAULT_LORA_LR = 1e-4  # --lora_learning_rate's default: diffusers' LoRA scripts' --learning_rate
DEFAULT_PIVOT = 0.5  # --train_text_encoder_ti_frac's default: diffusers' advanced scripts'


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Pivotal tuning's LoRA (--lora_rank): what its state holds and means, which a resumed run
    keeps (hashable, a field of OptimizerSpec; its rate and pivot are OptimizerSpec's own).

    Attributes:
      rank, alpha: the factors' rank and alpha (the update is scaled by alpha / rank).
      shapes: ((module, weight shape), ...) of the adapted modules (the family's lora_targets).
      seed: the factors' initial draw comes from fold_in(PRNGKey(seed), LORA_DRAW).
    """

    rank: int
    alpha: float
    shapes: tuple
    seed: int

    @property
    def scale(self):
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, config, shapes):
        """The spec of a run with --lora_rank; `shapes` {module: weight shape} (the family's targets)."""
        return cls(rank=config.lora_rank, alpha=float(config.lora_alpha or config.lora_rank),
                   shapes=tuple((m, tuple(shape)) for m, shape in shapes.items()), seed=config.seed)

    def init(self):
        """Fresh factors (models.lora.init): A uniform, B zero, so update 0 sees the base UNet."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), LORA_DRAW)
        return lora_lib.init(key, dict(self.shapes), self.rank)


def lora_rate_and_pivot(config, num_devices, total_steps):
    """(the LoRA's peak rate, the updates during which the rows learn) of a run with --lora_rank:
    --lora_learning_rate (default 1e-4) scaled as the rows' by --scale_lr, and
    --train_text_encoder_ti_frac (default 0.5) of the run's updates."""
    rate = config.lora_learning_rate or DEFAULT_LORA_LR
    if config.scale_lr:
        rate *= config.train_batch_size * num_devices * config.gradient_accumulation_steps
    frac = DEFAULT_PIVOT if config.train_text_encoder_ti_frac is None else config.train_text_encoder_ti_frac
    return rate, int(round(frac * total_steps))


# The LoRA's initial draw: fold_in(PRNGKey(seed), LORA_DRAW), apart from every other use of the seed.
LORA_DRAW = 0x10AA


# Which of OptimizerSpec's fields a resumed run must keep (checkpoint.MUST_MATCH holds the flags
# they come from): what the state holds and means. The rates may change on resume.
_KEEP = {"resume": MATCH}
_MAY_CHANGE = {"resume": MAY_CHANGE}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer's hyperparameters: hashable, so a compiled step can be cached by them.

    Each field states in its metadata whether a resumed run must keep it (config.flags.MATCH) or
    may change it; `rules_from_config` makes the ones it must keep."""

    lr_scheduler: str = dataclasses.field(metadata=_MAY_CHANGE)
    peak_lr: float = dataclasses.field(metadata=_MAY_CHANGE)
    warmup_steps: int = dataclasses.field(metadata=_MAY_CHANGE)
    total_steps: int = dataclasses.field(metadata=_MAY_CHANGE)
    beta1: float = dataclasses.field(metadata=_MAY_CHANGE)
    beta2: float = dataclasses.field(metadata=_MAY_CHANGE)
    epsilon: float = dataclasses.field(metadata=_MAY_CHANGE)
    weight_decay: float = dataclasses.field(metadata=_MAY_CHANGE)
    max_grad_norm: Optional[float] = dataclasses.field(metadata=_MAY_CHANGE)
    # micro-batches per optimizer update (optax.MultiSteps when > 1): the data position and the state
    accumulation_steps: int = dataclasses.field(default=1, metadata=_KEEP)
    norm: Optional[NormControl] = dataclasses.field(default=None, metadata=_KEEP)  # the rows' norm control (off: None)
    ema: Optional[Ema] = dataclasses.field(default=None, metadata=_KEEP)  # the rows' moving average (off: None)
    # the text encoders whose parts are trained (--text_encoders; None: all)
    encoders: Optional[EncoderMask] = dataclasses.field(default=None, metadata=_KEEP)
    # pivotal tuning's LoRA (--lora_rank; None: rows only, and the step is what it always was)
    lora: Optional[LoraSpec] = dataclasses.field(default=None, metadata=_KEEP)
    lora_lr: Optional[float] = dataclasses.field(default=None, metadata=_MAY_CHANGE)  # its peak rate
    # the updates during which the rows learn (--train_text_encoder_ti_frac); from this one on, only the LoRA
    pivot: Optional[int] = dataclasses.field(default=None, metadata=_MAY_CHANGE)

    @classmethod
    def from_config(cls, config, num_devices, total_steps, norm_targets=(), text_widths=(), encoder_keys=(),
                    lora_shapes=None):
        """The spec of a run. `norm_targets` (one norm per text encoder, see run.norm_targets)
        and `text_widths` (ModelSpec.text_widths) are needed when the config controls the norms,
        and with `encoder_keys` (each encoder's rows key) when it chooses --text_encoders;
        `lora_shapes` ({module: weight shape}, the family's LoRA targets) with --lora_rank."""
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
            **cls.rules_from_config(config, norm_targets, text_widths, encoder_keys, lora_shapes),
            **({} if config.lora_rank is None else
               dict(zip(("lora_lr", "pivot"), lora_rate_and_pivot(config, num_devices, total_steps)))),
        )

    @staticmethod
    def rules_from_config(config, norm_targets=(), text_widths=(), encoder_keys=(), lora_shapes=None):
        """{field: value} of the fields a resumed run must keep (metadata resume MATCH): the
        accumulation, the encoders trained, what follows each update, and the LoRA's shape."""
        rate = config.norm_rate
        if rate and (not norm_targets or len(norm_targets) != len(text_widths)):
            raise ValueError(f"norm control needs a target per text encoder, got {norm_targets} for {text_widths}")
        trained = trained_encoders(config.text_encoders, tuple(encoder_keys))
        targets = tuple(float(t) if trained is None or trained[i] else None for i, t in enumerate(norm_targets))
        return dict(
            accumulation_steps=config.gradient_accumulation_steps,
            norm=NormControl(rate, targets, tuple(text_widths)) if rate else None,
            ema=Ema(config.ema_decay, config.ema_update_after_step) if config.use_ema else None,
            encoders=None if trained is None else EncoderMask(trained, tuple(text_widths)),
            lora=None if config.lora_rank is None else LoraSpec.from_config(config, lora_shapes),
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
        mask = [] if self.encoders is None else [self.encoders.transform()]
        parts = list(mask)  # --text_encoders: the others' gradients never count, their updates never land
        if self.max_grad_norm is not None:
            parts.append(optax.clip_by_global_norm(self.max_grad_norm))
        parts.append(
            optax.adamw(self.schedule(), b1=self.beta1, b2=self.beta2, eps=self.epsilon, weight_decay=self.weight_decay)
        )
        parts += mask
        tx = optax.chain(*parts)
        if self.accumulation_steps > 1:
            tx = optax.MultiSteps(tx, every_k_schedule=self.accumulation_steps)
        return tx

    def build_lora(self):
        """The LoRA factors' own optimizer: AdamW with the rows' betas, epsilon and weight decay at
        the LoRA's rate on the same schedule, after clipping its own gradient norm (--max_grad_norm),
        wrapped in MultiSteps like the rows' with accumulation, so both update on the same calls."""
        parts = [] if self.max_grad_norm is None else [optax.clip_by_global_norm(self.max_grad_norm)]
        schedule = lr_schedule(self.lr_scheduler, self.lora_lr, self.warmup_steps, self.total_steps)
        parts.append(optax.adamw(schedule, b1=self.beta1, b2=self.beta2, eps=self.epsilon,
                                 weight_decay=self.weight_decay))
        tx = optax.chain(*parts)
        if self.accumulation_steps > 1:
            tx = optax.MultiSteps(tx, every_k_schedule=self.accumulation_steps)
        return tx

    def updated(self, opt_state):
        """Whether the update that produced `opt_state` changed the rows (always, without accumulation)."""
        if self.accumulation_steps == 1:
            return True
        return opt_state.mini_step == 0  # MultiSteps wraps its micro-step counter when it applies

    def after_update(self, rows, ema, step, updated=True):
        """(rows, ema) after an optimizer update: the norm control, then the EMA of the rows it
        leaves, each when on (off, both come back as they are, and the step computes nothing more).

        Args:
          rows: the rows optax just updated. ema: the average before it (None without --use_ema).
          step: the number of updates done, this one included. updated: whether this call was an
            update (`updated(opt_state)`); with gradient accumulation a traced bool, and on the
            other micro-steps both come back unchanged: they act once per update.
        """
        new_rows = rows if self.norm is None else self.norm(rows)
        new_ema = ema if self.ema is None else self.ema.update(ema, new_rows, step)
        if updated is True or (self.norm is None and self.ema is None):
            return new_rows, new_ema
        keep = lambda new, old: None if old is None else jnp.where(updated, new, old)  # noqa: E731
        return keep(new_rows, rows), keep(new_ema, ema)
