"""Every closed list of values a flag takes, defined once.

argparse's `choices`, `TrainConfig.validate()`, the modules that act on a value and the
"Choices" table of docs/flags.md all read these lists, so a new value is added in one place. This
module imports nothing of ti_flax and nothing heavy, so `--help` stays fast. `markdown_table()`
prints the table's rows; the exporter's `--format` row comes from the formats registry
(`commands.export.FORMAT_CHOICE`), and tests/test_choices.py keeps the page equal to both.
"""

from typing import NamedTuple

ATTENTION = ("auto", "dense", "chunked", "cudnn", "flash")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LEARNABLE_PROPERTIES = ("object", "style")
# Resize filters, as the names of PIL's Image.Resampling members.
INTERPOLATIONS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS", "nearest": "NEAREST"}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "polynomial")
MIXED_PRECISION = {"no": "float32", "bf16": "bfloat16"}  # --mixed_precision -> the frozen models' dtype
REPORT_TO = ("auto", "tensorboard", "none")
SAMPLERS = ("pndm", "ddim", "euler", "dpm")  # generate's --scheduler and the validation sampler
PLAN_TARGETS = ("v4", "v5e", "v5p", "v6e", "local")  # ti_flax.plan's --target: a TPU generation, or this machine
EMBEDDING_NORMS = ("none", "preserve")  # --embedding_norm: after each update, leave the norms or set them to the target
LOSS_TYPES = ("l2", "huber", "smooth_l1")  # kohya's --loss_type (its l1 is not offered)
# kohya's --timestep_sampling for rectified-flow models (FLUX.1): how each example's noise level is drawn.
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
# --lora_targets: module names of diffusers' UNet (their last parts), or a group of them; "attn" is
# the default, as diffusers' and PEFT's LoRA scripts.
LORA_TARGET_GROUPS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "ff": ("ff.net.0.proj", "ff.net.2"),
    "proj": ("proj_in", "proj_out"),
}
LORA_TARGETS = (*LORA_TARGET_GROUPS, *(name for group in LORA_TARGET_GROUPS.values() for name in group))
EARLY_STOPPING = ("none", "dvar")  # --early_stopping: run every step, or end when the deterministic loss settles
# kohya's --huber_schedule. Not a row of TABLE: it applies only with --loss_type huber or smooth_l1,
# so its values are not each valid alone; the flag reference (docs/flags.md) lists them.
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# OneTrainer's mask file name, --mask_suffix's default: the mask of dog.jpg is dog-masklabel.png.
MASK_SUFFIX = "-masklabel.png"


class Choice(NamedTuple):
    flags: str  # the flag, with the command that takes it where not `ti_flax.train`
    values: tuple
    default: str


# The docs' table, in the order it lists them.
TABLE = (
    Choice("--learnable_property", tuple(LEARNABLE_PROPERTIES), "object"),
    Choice("--prediction_type", PREDICTION_TYPES, "the model's scheduler config"),
    Choice("--interpolation", tuple(INTERPOLATIONS), "bicubic"),
    Choice("--lr_scheduler", LR_SCHEDULERS, "constant"),
    Choice("--loss_type", LOSS_TYPES, "l2"),
    Choice("--timestep_sampling", TIMESTEP_SAMPLINGS, "sigma"),
    Choice("--mixed_precision", tuple(MIXED_PRECISION), "no"),
    Choice("--embedding_norm", EMBEDDING_NORMS, "none"),
    Choice("--attention", ATTENTION, "auto"),
    Choice("--early_stopping", EARLY_STOPPING, "none"),
    Choice("--report_to", REPORT_TO, "auto"),
    Choice("--scheduler (ti_flax.generate)", SAMPLERS, "pndm; SDXL: the model's own"),
    Choice("--target (ti_flax.plan)", PLAN_TARGETS, "local"),
)


def one_of(flag, value, values, allow_none=False):
    """(ok, message) for `TrainConfig.validate()`'s checks: is `value` one of `values`?"""
    ok = value in values or (allow_none and value is None)
    return ok, f"{flag} must be one of {', '.join(values)}, got {value!r}"


def markdown_table(rows=TABLE):
    """A Markdown table of `rows` (Choice tuples): docs/flags.md's "Choices" table is TABLE's rows,
    then the exporter's `--format` row (tests/test_choices.py puts them together)."""
    lines = ["| flag | values | default |", "| --- | --- | --- |"]
    for choice in rows:
        flag, _, command = choice.flags.partition(" ")
        values = ", ".join(f"`{v}`" for v in choice.values)
        lines.append(f"| `{flag}`{' ' + command if command else ''} | {values} | {choice.default} |")
    return "\n".join(lines) + "\n"

