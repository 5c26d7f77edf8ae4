"""The checks of `TrainConfig.validate()`: each flag's value, alone and with the others.

Each check names the flag it is about in one line (`UserError`); the model's own limits (a
resolution its UNet divides, a timestep range its schedule has) are checked once it is loaded
(training/run.py).
"""

import dataclasses
import math
import os

from ..errors import UserError
from . import concepts as concepts_lib
from .choices import (
    ATTENTION, EARLY_STOPPING, EMBEDDING_NORMS, HUBER_SCHEDULES, INTERPOLATIONS, LEARNABLE_PROPERTIES, LOSS_TYPES,
    LORA_TARGETS, LR_SCHEDULERS, MASK_SUFFIX, MIXED_PRECISION, PREDICTION_TYPES, REPORT_TO, TIMESTEP_SAMPLINGS, one_of,
)

# The fields that --concepts sets per concept: with a concepts file they must be left empty.
PER_CONCEPT = ("placeholder_token", "train_data_dir", "initializer_token", "initial_embeddings")
# kohya's defaults of --huber_c and --huber_schedule: with --loss_type l2 they must stay at these.
HUBER_C, HUBER_SCHEDULE = 0.1, "snr"
# The flags that only act with --enable_bucket.
BUCKET_FLAGS = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
# The flags that only act with --early_stopping dvar.
STOPPING_FLAGS = ("early_stopping_window", "early_stopping_threshold", "early_stopping_every",
                  "early_stopping_min_steps")


def tensorboard_available():
    """Whether --report_to tensorboard can write: tensorboardX is installed."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


def check(config):
    """Every check of `TrainConfig.validate()`: the run's concepts (concepts.from_config), or UserError
    naming the first bad flag."""
    if config.concepts is None:
        for name in ("pretrained_model_name_or_path", "train_data_dir", "placeholder_token"):
            if not getattr(config, name):
                raise UserError(f"--{name} is required")
        if bool(config.initializer_token) == bool(config.initial_embeddings):
            raise UserError(
                "pass exactly one of --initializer_token (a word whose row starts the training) and "
                "--initial_embeddings (an embedding file to continue from)"
            )
        if config.caption_prefix_token and not config.caption_extension:
            raise UserError(
                "--caption_prefix_token needs --caption_extension (e.g. .txt): it changes caption files, and "
                "without --caption_extension none are read"
            )
    else:
        if not config.pretrained_model_name_or_path:
            raise UserError("--pretrained_model_name_or_path is required")
        for name in PER_CONCEPT:
            if getattr(config, name):
                raise UserError(f"--{name} is set per concept in --concepts FILE; remove it")
    if config.caption_extension is not None and not concepts_lib.is_file_extension(config.caption_extension):
        raise UserError(
            f"--caption_extension must be a file extension starting with a dot, like .txt or .caption, "
            f"got {config.caption_extension!r}"
        )
    if config.mixed_precision == "fp16":
        raise UserError(
            "--mixed_precision fp16 is not supported: float16 gives TPUs no speed-up and risks overflow "
            "without loss scaling; use --mixed_precision bf16"
        )
    checks = [
        one_of("--mixed_precision", config.mixed_precision, tuple(MIXED_PRECISION)),
        one_of("--prediction_type", config.prediction_type, PREDICTION_TYPES, allow_none=True),
        one_of("--attention", config.attention, ATTENTION),
        (config.zero_terminal_snr in (None, True, False),
         f"--zero_terminal_snr must be true, false or unset, got {config.zero_terminal_snr!r}"),
        (config.gradient_accumulation_steps >= 1,
         f"--gradient_accumulation_steps must be at least 1, got {config.gradient_accumulation_steps}"),
        (config.num_vectors >= 1, f"--num_vectors must be at least 1, got {config.num_vectors}"),
        one_of("--learnable_property", config.learnable_property, LEARNABLE_PROPERTIES),
        (config.repeats >= 1, f"--repeats must be at least 1, got {config.repeats}"),
        (config.resolution is None or (config.resolution > 0 and config.resolution % 8 == 0),
         f"--resolution must be a positive multiple of 8, got {config.resolution}"),
        one_of("--interpolation", config.interpolation, tuple(INTERPOLATIONS)),
        (0.0 <= config.flip_p <= 1.0, f"--flip_p must be between 0 and 1, got {config.flip_p}"),
        (0 <= config.seed < 2**32, f"--seed must be in [0, 2**32), got {config.seed}"),
        (config.train_batch_size >= 1, f"--train_batch_size must be at least 1, got {config.train_batch_size}"),
        (config.num_train_epochs >= 1, f"--num_train_epochs must be at least 1, got {config.num_train_epochs}"),
        (config.max_train_steps is None or config.max_train_steps >= 1,
         f"--max_train_steps must be at least 1, got {config.max_train_steps}"),
        (config.learning_rate > 0 and math.isfinite(config.learning_rate),
         f"--learning_rate must be a positive number, got {config.learning_rate}"),
        one_of("--lr_scheduler", config.lr_scheduler, LR_SCHEDULERS),
        (config.lr_warmup_steps >= 0, f"--lr_warmup_steps must be >= 0, got {config.lr_warmup_steps}"),
        (0.0 <= config.adam_beta1 < 1.0 and 0.0 <= config.adam_beta2 < 1.0, "--adam_beta1/--adam_beta2 must be in [0, 1)"),
        (config.adam_weight_decay >= 0, f"--adam_weight_decay must be >= 0, got {config.adam_weight_decay}"),
        (config.adam_epsilon > 0, f"--adam_epsilon must be > 0, got {config.adam_epsilon}"),
        (config.max_grad_norm is None or config.max_grad_norm > 0,
         f"--max_grad_norm must be > 0, got {config.max_grad_norm}"),
        *loss_checks(config),
        *mask_checks(config),
        (config.save_steps >= 0, f"--save_steps must be >= 0 (0 turns it off), got {config.save_steps}"),
        (config.checkpointing_steps >= 0,
         f"--checkpointing_steps must be >= 0 (0 turns it off), got {config.checkpointing_steps}"),
        (config.checkpoints_total_limit is None or config.checkpoints_total_limit >= 1,
         f"--checkpoints_total_limit must be at least 1, got {config.checkpoints_total_limit}"),
        (bool(config.output_dir), "--output_dir must not be empty"),
        (config.num_validation_images >= 1,
         f"--num_validation_images must be at least 1, got {config.num_validation_images}"),
        (config.validation_steps >= 1, f"--validation_steps must be at least 1, got {config.validation_steps}"),
        (config.validation_num_inference_steps >= 1,
         f"--validation_num_inference_steps must be at least 1, got {config.validation_num_inference_steps}"),
        (config.validation_resolution is None or (config.validation_resolution > 0
                                                  and config.validation_resolution % 8 == 0),
         f"--validation_resolution must be a positive multiple of 8, got {config.validation_resolution}"),
        (config.validation_seed is None or 0 <= config.validation_seed < 2**32,
         f"--validation_seed must be in [0, 2**32), got {config.validation_seed}"),
        (config.validation_loss_steps >= 0,
         f"--validation_loss_steps must be >= 0 (0 turns it off), got {config.validation_loss_steps}"),
        (0.0 <= config.validation_split < 1.0,
         f"--validation_split must be a fraction in [0, 1) of the images to hold out, got {config.validation_split}"),
        (not config.validation_split or config.validation_loss_steps,
         "--validation_split holds images out for the validation loss only: set --validation_loss_steps N too"),
        (config.distributed_timeout > 0, f"--distributed_timeout must be > 0, got {config.distributed_timeout}"),
        one_of("--report_to", config.report_to, REPORT_TO),
        *row_checks(config),
        *lora_checks(config),
        *bucket_checks(config),
        *stopping_checks(config),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    listed = concepts_lib.from_config(config)
    if config.concepts is not None:
        concepts_checks(config, listed)
    if config.report_to == "tensorboard" and not tensorboard_available():
        raise UserError("--report_to tensorboard needs tensorboardX: `pip install tensorboardX`")
    return listed


def loss_checks(config):
    """(ok, message) for the loss recipe's flags; --max_timestep's upper bound is the model's
    number of training timesteps, checked once it is loaded (losses.LossSpec.from_config)."""
    def positive(x):
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    return [
        (config.snr_gamma is None or positive(config.snr_gamma),
         f"--snr_gamma must be a positive number (diffusers recommends 5.0), got {config.snr_gamma}"),
        (config.noise_offset == 0 or positive(config.noise_offset),
         f"--noise_offset must be >= 0 (0 turns it off; about 0.1 is usual), got {config.noise_offset}"),
        one_of("--loss_type", config.loss_type, LOSS_TYPES),
        one_of("--huber_schedule", config.huber_schedule, HUBER_SCHEDULES),
        (positive(config.huber_c), f"--huber_c must be a positive number, got {config.huber_c}"),
        (config.loss_type != "l2" or (config.huber_c, config.huber_schedule) == (HUBER_C, HUBER_SCHEDULE),
         "--huber_c and --huber_schedule apply only with --loss_type huber or smooth_l1; "
         "pass one of those or leave them out"),
        (config.min_timestep >= 0, f"--min_timestep must be >= 0, got {config.min_timestep}"),
        (config.max_timestep is None or config.max_timestep > config.min_timestep,
         f"--max_timestep must be greater than --min_timestep (timesteps are drawn from [min, max)), "
         f"got {config.min_timestep} and {config.max_timestep}"),
        one_of("--timestep_sampling", config.timestep_sampling, TIMESTEP_SAMPLINGS),
        (positive(config.discrete_flow_shift),
         f"--discrete_flow_shift must be a positive number (kohya's default 3.0), got {config.discrete_flow_shift}"),
        (positive(config.sigmoid_scale), f"--sigmoid_scale must be a positive number, got {config.sigmoid_scale}"),
        (isinstance(config.guidance_scale, (int, float)) and math.isfinite(config.guidance_scale)
         and config.guidance_scale >= 0, f"--guidance_scale must be a number >= 0, got {config.guidance_scale}"),
    ]


def mask_checks(config):
    """(ok, message) for the masked loss's flags; the masks themselves are checked as they are read."""
    suffix, weight = config.mask_suffix, config.unmasked_weight
    named = isinstance(suffix, str) and "/" not in suffix and "\\" not in suffix and os.path.splitext("x" + suffix)[0] != "x"
    return [
        (named, f"--mask_suffix must be the end of a file name after the image's stem, like {MASK_SUFFIX} or "
         f"_mask.png (dog.jpg -> dog_mask.png), got {suffix!r}"),
        (config.masked or suffix == MASK_SUFFIX, "--mask_suffix names the mask files of --masked_loss: pass "
         "--masked_loss too, or leave it out"),
        (not config.alpha_mask or suffix == MASK_SUFFIX,
         "--mask_suffix names mask files, but --alpha_mask takes the masks from the images' alpha channels: "
         "pass one of them"),
        (isinstance(weight, (int, float)) and 0.0 <= weight <= 1.0,
         f"--unmasked_weight must be between 0 and 1 (the background's weight; 0: not learned), got {weight}"),
        (config.masked or not weight, "--unmasked_weight weighs the background of --masked_loss / --alpha_mask: "
         "pass one of those too, or leave it out"),
    ]


def bucket_checks(config):
    """(ok, message) for --enable_bucket and its flags (the model's own needs: run.check_buckets)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    changed = [name for name in BUCKET_FLAGS if getattr(config, name) != defaults[name]]
    low, high, steps = config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps
    if not config.enable_bucket:
        return [(not changed, f"--{changed[0] if changed else ''} needs --enable_bucket: alone it does nothing")]
    return [
        (steps >= 1, f"--bucket_reso_steps must be at least 1, got {steps}"),
        (0 < low <= high, f"--min_bucket_reso ({low}) must be positive and at most --max_bucket_reso ({high})"),
        (steps < 1 or (low % steps == 0 and high % steps == 0),
         f"--min_bucket_reso ({low}) and --max_bucket_reso ({high}) must be multiples of --bucket_reso_steps "
         f"({steps})"),
        (config.resolution is None or low <= config.resolution <= high,
         f"--resolution {config.resolution} must be between --min_bucket_reso ({low}) and --max_bucket_reso "
         f"({high})"),
        (not config.center_crop, "--center_crop does nothing with --enable_bucket, which always center-crops each "
         "image to its bucket; pass one of them"),
        (not config.validation_loss_steps, "--validation_loss_steps evaluates square images and cannot be combined "
         "with --enable_bucket yet; pass one of them"),
    ]


def stopping_checks(config):
    """(ok, message) for --early_stopping and its flags; the window and the floor against the run's
    length where --max_train_steps gives it (`stopping_fits` checks it again once the run knows)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    changed = [name for name in STOPPING_FLAGS if getattr(config, name) != defaults[name]]
    if config.early_stopping != "dvar":
        return [one_of("--early_stopping", config.early_stopping, EARLY_STOPPING),
                (not changed, f"--{changed[0] if changed else ''} needs --early_stopping dvar: alone it does nothing")]
    window, every, threshold = config.early_stopping_window, config.early_stopping_every, config.early_stopping_threshold
    checks = [
        (every >= 1, f"--early_stopping_every must be at least 1, got {every}"),
        (every < 1 or (window >= 2 * every and window % every == 0),
         f"--early_stopping_window must be a multiple of --early_stopping_every ({every}) that holds at least 2 of "
         f"its evaluations, got {window}"),
        (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0,
         f"--early_stopping_threshold must be between 0 and 1 (both excluded; the paper's is 0.15), got {threshold}"),
        (config.early_stopping_min_steps >= 0,
         f"--early_stopping_min_steps must be >= 0, got {config.early_stopping_min_steps}"),
        (not config.enable_bucket, "--early_stopping has no images to evaluate with --enable_bucket (its fixed "
         "examples are square training images); pass one of them"),
    ]
    if config.max_train_steps is not None:
        checks += stopping_fits(config, config.max_train_steps)
    return checks


def stopping_fits(config, total_steps):
    """(ok, message) for --early_stopping dvar in a run of `total_steps` updates: a window, or a
    floor, that is not shorter than the run could never let it stop."""
    if config.early_stopping != "dvar":
        return []
    window, floor = config.early_stopping_window, config.early_stopping_min_steps
    return [
        (window < total_steps, f"--early_stopping_window {window} is not shorter than the run ({total_steps} updates): "
         "it could never stop early; lower it or raise --max_train_steps"),
        (floor < total_steps, f"--early_stopping_min_steps {floor} is not below the run's {total_steps} updates: it "
         "could never stop early; lower it or raise --max_train_steps"),
    ]


def row_checks(config):
    """(ok, message) for the flags that act on the rows after each update."""
    targets = config.norm_targets
    decay = config.embedding_norm_decay
    controls = config.embedding_norm == "preserve" or (isinstance(decay, (int, float)) and decay > 0)
    return [
        one_of("--embedding_norm", config.embedding_norm, EMBEDDING_NORMS),
        (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0,
         f"--embedding_norm_decay must be between 0 and 1 (0 turns it off), got {decay}"),
        (not (config.embedding_norm == "preserve" and decay),
         "--embedding_norm_decay does nothing with --embedding_norm preserve, which sets each norm to the target "
         "after every update; pass one of them"),
        (targets is None or controls,
         "--embedding_norm_target needs --embedding_norm preserve or --embedding_norm_decay: alone it does nothing"),
        (targets is None or (len(targets) in (1, 2) and all(math.isfinite(t) and t > 0 for t in targets)),
         f"--embedding_norm_target must be one positive number (SDXL: two, CLIP-L's and bigG's), got "
         f"{config.embedding_norm_target}"),
        (isinstance(config.ema_decay, (int, float)) and 0.0 < config.ema_decay < 1.0,
         f"--ema_decay must be between 0 and 1 (both excluded), got {config.ema_decay}"),
        (config.ema_update_after_step >= 0, f"--ema_update_after_step must be >= 0, got {config.ema_update_after_step}"),
        (config.use_ema or (config.ema_decay == type(config).ema_decay and config.ema_update_after_step == 0),
         "--ema_decay and --ema_update_after_step need --use_ema: without it they do nothing"),
    ]


def lora_checks(config):
    """(ok, message) for pivotal tuning's flags (the rank against each layer's width is checked
    with the model, in training/run.py)."""
    rank, alpha, frac, rate = config.lora_rank, config.lora_alpha, config.train_text_encoder_ti_frac, \
        config.lora_learning_rate
    others = [name for name in ("lora_alpha", "lora_learning_rate", "train_text_encoder_ti_frac")
              if getattr(config, name) is not None]
    others += ["lora_dropout"] if config.lora_dropout else []
    others += ["lora_targets"] if config.lora_targets != type(config).lora_targets else []
    names = str(config.lora_targets).split(",")
    unknown = [t for t in names if t not in LORA_TARGETS]
    return [
        (rank is not None or not others,
         f"--{others[0] if others else ''} needs --lora_rank: without a LoRA it does nothing"),
        (rank is None or (isinstance(rank, int) and rank >= 1), f"--lora_rank must be at least 1, got {rank}"),
        (alpha is None or (math.isfinite(alpha) and alpha > 0), f"--lora_alpha must be a positive number, got {alpha}"),
        (not config.lora_dropout,
         f"--lora_dropout {config.lora_dropout}: only 0 is supported for now (the LoRA has no dropout); leave it out"),
        (not unknown,
         f"--lora_targets {unknown[0] if unknown else ''!r}: choose from {', '.join(LORA_TARGETS)}"),
        (rate is None or (math.isfinite(rate) and rate > 0),
         f"--lora_learning_rate must be a positive number, got {rate}"),
        (frac is None or (isinstance(frac, (int, float)) and 0.0 <= frac <= 1.0),
         f"--train_text_encoder_ti_frac must be in [0, 1] (the share of the updates in which the rows learn), "
         f"got {frac}"),
    ]


def concepts_checks(config, listed):
    """Check --concepts as read (after the flags, which give its entries' defaults)."""
    if config.caption_prefix_token and not any(c.caption_extension for c in listed):
        raise UserError(
            "--caption_prefix_token needs a caption_extension (e.g. .txt), as --caption_extension or on a concept "
            "in --concepts: it changes caption files, and without one none are read"
        )
    if config.validation_prompt and "{}" not in config.validation_prompt:
        raise UserError(
            f"--validation_prompt {config.validation_prompt!r}: with --concepts it needs {{}} where each "
            "concept's token goes, like 'a photo of {} on a beach'"
        )
