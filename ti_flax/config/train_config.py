"""One frozen dataclass describing a training run: defaults, validation, JSON round trip."""

import dataclasses
import json
import math
import os
from typing import Any, Optional

from . import concepts as concepts_lib
from ..errors import UserError
from .choices import (
    ATTENTION, EMBEDDING_NORMS, HUBER_SCHEDULES, INTERPOLATIONS, LEARNABLE_PROPERTIES, LOSS_TYPES, LR_SCHEDULERS,
    MASK_SUFFIX, MIXED_PRECISION, PREDICTION_TYPES, REPORT_TO, one_of,
)

# The fields that --concepts sets per concept: with a concepts file they must be left empty.
# Where validate() keeps the concepts it read, in the instance's __dict__ (the dataclass is frozen).
_CHECKED = "_checked_concepts"

PER_CONCEPT = ("placeholder_token", "train_data_dir", "initializer_token", "initial_embeddings")
# kohya's defaults of --huber_c and --huber_schedule: with --loss_type l2 they must stay at these.
HUBER_C, HUBER_SCHEDULE = 0.1, "snr"

# The flags that only act with --enable_bucket.
BUCKET_FLAGS = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")


def tensorboard_available():
    """Whether --report_to tensorboard can write: tensorboardX is installed."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A textual-inversion run. Field names and meanings follow diffusers' training scripts.

    Args:
        Every field is the `python -m ti_flax.train` flag of the same name, with the same
        default (`--help` describes each); `TrainConfig.tiny(...)` is a few-step run on a tiny
        test model. Call `validate()` to check the values before a long model load.

    Example:
        >>> from ti_flax import TrainConfig, train
        >>> cfg = TrainConfig(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5",
        ...                   train_data_dir="cat_toy/", placeholder_token="<cat-toy>",
        ...                   initializer_token="toy", output_dir="out", max_train_steps=3000)
        >>> result = train(cfg)  # doctest: +SKIP
    """

    # Model
    pretrained_model_name_or_path: str = ""
    revision: Optional[str] = None
    tokenizer_name: Optional[str] = None
    prediction_type: Optional[str] = None  # None: the model's scheduler config (a single file: epsilon)
    allow_pickle: bool = False  # unpickle a .ckpt model or a .npy --initial_embeddings (can run code)
    pretrained_vae_model_name_or_path: Optional[str] = None  # another VAE: a folder, Hub id or VAE file
    # True: the noise schedule rescaled to zero terminal SNR (diffusers' rescale_betas_zero_snr, with
    # "trailing" sampling timesteps); False: not, even where the model asks; None: as the model's
    # scheduler config, or a single file's ztsnr marker, says (off for every model without one).
    zero_terminal_snr: Optional[bool] = None
    # Concept and data
    # Several concepts at once: the path of a .json/.toml file, or a list of dicts with the keys of
    # concepts.Concept (see concepts.py); None: the one concept of the flags below.
    concepts: Optional[Any] = None
    train_data_dir: str = ""
    placeholder_token: str = ""
    initializer_token: str = ""
    num_vectors: int = 1
    initial_embeddings: Optional[str] = None  # start from an existing embedding file instead
    learnable_property: str = "object"
    caption_extension: Optional[str] = None  # ".txt": an image's prompt is in its caption file beside it
    caption_prefix_token: bool = False  # a caption without the placeholder gets it in front
    repeats: int = 100
    resolution: Optional[int] = None  # None: the model family's (512; an SDXL model's native 1024)
    center_crop: bool = False
    interpolation: str = "bicubic"
    flip_p: float = 0.5
    # Aspect-ratio buckets (kohya sd-scripts' flags and defaults; all need enable_bucket)
    enable_bucket: bool = False  # each image trains in the bucket nearest its aspect ratio, not a square
    min_bucket_reso: int = 256  # the buckets' shortest side
    max_bucket_reso: int = 1024  # the buckets' longest side
    bucket_reso_steps: int = 64  # every bucket side is a multiple of this
    bucket_no_upscale: bool = False  # buckets from each image's own size, never enlarged
    # Optimisation
    seed: int = 42
    train_batch_size: int = 16  # per device
    num_train_epochs: int = 100
    max_train_steps: Optional[int] = 5000  # overrides num_train_epochs when set
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: Optional[float] = None
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer update
    # Loss recipe (diffusers' and kohya's flags, each off by default: see losses.py)
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting
    noise_offset: float = 0.0  # noise + noise_offset * randn(B, C, 1, 1)
    loss_type: str = "l2"
    huber_c: float = HUBER_C  # kohya's defaults; used only with --loss_type huber or smooth_l1
    huber_schedule: str = HUBER_SCHEDULE
    min_timestep: int = 0  # timesteps drawn from [min_timestep, max_timestep)
    max_timestep: Optional[int] = None  # None: the model's num_train_timesteps
    # Masked loss (off by default; kohya's --masked_loss / --alpha_mask, OneTrainer's mask files and
    # unmasked weight): each example's loss is its mask's weighted mean (see losses.py, images.py).
    masked_loss: bool = False  # masks from the files <stem><mask_suffix> beside the images
    alpha_mask: bool = False  # masks from the images' alpha channels (turns masked loss on, as kohya's)
    mask_suffix: str = MASK_SUFFIX  # the mask of dog.jpg is dog-masklabel.png
    unmasked_weight: float = 0.0  # the background's weight: each weight is clamp(mask, this, 1)
    # The learned rows after each update (all off by default)
    embedding_norm: str = "none"  # "preserve": each vector rescaled to the target norm
    embedding_norm_target: Optional[Any] = None  # a norm per text encoder (SDXL: two); None: each table's median
    embedding_norm_decay: float = 0.0  # R: norm <- norm + R * (target - norm); 0: off
    use_ema: bool = False  # the embeddings written are the rows' moving average
    ema_decay: float = 0.9999  # diffusers' EMAModel decay (its warm-up caps at it)
    ema_update_after_step: int = 0  # diffusers' EMAModel update_after_step
    # Speed and memory
    mixed_precision: str = "no"  # "bf16": frozen weights and activations in bfloat16
    cache_latents: bool = False  # VAE-encode each (image, flip) view once, up front
    gradient_checkpointing: bool = False  # rematerialise the UNet's blocks in the backward pass
    attention: str = "auto"  # the UNet's attention: one of ATTENTION; auto picks per call site
    no_compilation_cache: bool = False  # True: no persistent compilation cache (see compile_cache.py)
    # Outputs
    output_dir: str = "text-inversion-model"
    save_steps: int = 500
    checkpointing_steps: int = 500  # 0: no checkpoints
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder, or "latest"
    no_safe_serialization: bool = False
    save_as_full_pipeline: bool = False
    # Validation images (off unless validation_prompt is set)
    validation_prompt: Optional[str] = None
    num_validation_images: int = 4
    validation_steps: int = 100
    validation_num_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    validation_seed: Optional[int] = None  # default: --seed
    # The validation loss (off unless validation_loss_steps is set): the plain diffusion loss of
    # fixed examples every N updates; with validation_split a fraction of each concept's images is
    # held out of training for it (kohya's --validation_split).
    validation_loss_steps: int = 0
    validation_split: float = 0.0
    logging_dir: str = "logs"
    report_to: str = "auto"  # tensorboard when tensorboardX is installed, else none
    push_to_hub: bool = False
    # Multi-process (CPU/GPU clusters; a multi-host TPU slice is detected automatically)
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    distributed_timeout: int = 300
    hub_model_id: Optional[str] = None
    hub_token: Optional[str] = None
    use_auth_token: bool = False

    def validate(self):
        """Check every value; `TrainConfig(...).validate()` is what `train` does first.

        A config is checked once: a later call (`train` after the command line's parse, `prepare`
        after `train`) returns at once, and `concept_list()` hands on the concepts it read, so a
        --concepts file is read once per run.

        Returns:
            self, when the config is usable.
        Raises:
            UserError: naming the first bad flag, e.g. "--learning_rate must be a positive number".
        """
        if _CHECKED not in self.__dict__:
            # Kept beside the fields, not in one: equality, hashing and to_json never see it.
            self.__dict__[_CHECKED] = self._check()
        return self

    def concept_list(self):
        """The run's concepts (`concepts.from_config`), as `validate()` read and checked them."""
        return self.validate().__dict__[_CHECKED]

    def _check(self):
        """Every check of `validate()`; returns the run's concepts."""
        if self.concepts is None:
            for name in ("pretrained_model_name_or_path", "train_data_dir", "placeholder_token"):
                if not getattr(self, name):
                    raise UserError(f"--{name} is required")
            if bool(self.initializer_token) == bool(self.initial_embeddings):
                raise UserError(
                    "pass exactly one of --initializer_token (a word whose row starts the training) and "
                    "--initial_embeddings (an embedding file to continue from)"
                )
            if self.caption_prefix_token and not self.caption_extension:
                raise UserError(
                    "--caption_prefix_token needs --caption_extension (e.g. .txt): it changes caption files, and "
                    "without --caption_extension none are read"
                )
        else:
            if not self.pretrained_model_name_or_path:
                raise UserError("--pretrained_model_name_or_path is required")
            for name in PER_CONCEPT:
                if getattr(self, name):
                    raise UserError(f"--{name} is set per concept in --concepts FILE; remove it")
        if self.caption_extension is not None and not concepts_lib.is_file_extension(self.caption_extension):
            raise UserError(
                f"--caption_extension must be a file extension starting with a dot, like .txt or .caption, "
                f"got {self.caption_extension!r}"
            )
        if self.mixed_precision == "fp16":
            raise UserError(
                "--mixed_precision fp16 is not supported: float16 gives TPUs no speed-up and risks overflow "
                "without loss scaling; use --mixed_precision bf16"
            )
        checks = [
            one_of("--mixed_precision", self.mixed_precision, tuple(MIXED_PRECISION)),
            one_of("--prediction_type", self.prediction_type, PREDICTION_TYPES, allow_none=True),
            one_of("--attention", self.attention, ATTENTION),
            (self.zero_terminal_snr in (None, True, False),
             f"--zero_terminal_snr must be true, false or unset, got {self.zero_terminal_snr!r}"),
            (self.gradient_accumulation_steps >= 1,
             f"--gradient_accumulation_steps must be at least 1, got {self.gradient_accumulation_steps}"),
            (self.num_vectors >= 1, f"--num_vectors must be at least 1, got {self.num_vectors}"),
            one_of("--learnable_property", self.learnable_property, LEARNABLE_PROPERTIES),
            (self.repeats >= 1, f"--repeats must be at least 1, got {self.repeats}"),
            (self.resolution is None or (self.resolution > 0 and self.resolution % 8 == 0),
             f"--resolution must be a positive multiple of 8, got {self.resolution}"),
            one_of("--interpolation", self.interpolation, tuple(INTERPOLATIONS)),
            (0.0 <= self.flip_p <= 1.0, f"--flip_p must be between 0 and 1, got {self.flip_p}"),
            (0 <= self.seed < 2**32, f"--seed must be in [0, 2**32), got {self.seed}"),
            (self.train_batch_size >= 1, f"--train_batch_size must be at least 1, got {self.train_batch_size}"),
            (self.num_train_epochs >= 1, f"--num_train_epochs must be at least 1, got {self.num_train_epochs}"),
            (self.max_train_steps is None or self.max_train_steps >= 1,
             f"--max_train_steps must be at least 1, got {self.max_train_steps}"),
            (self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"--learning_rate must be a positive number, got {self.learning_rate}"),
            one_of("--lr_scheduler", self.lr_scheduler, LR_SCHEDULERS),
            (self.lr_warmup_steps >= 0, f"--lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}"),
            (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0, "--adam_beta1/--adam_beta2 must be in [0, 1)"),
            (self.adam_weight_decay >= 0, f"--adam_weight_decay must be >= 0, got {self.adam_weight_decay}"),
            (self.adam_epsilon > 0, f"--adam_epsilon must be > 0, got {self.adam_epsilon}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0,
             f"--max_grad_norm must be > 0, got {self.max_grad_norm}"),
            *self._loss_checks(),
            *self._mask_checks(),
            (self.save_steps >= 0, f"--save_steps must be >= 0 (0 turns it off), got {self.save_steps}"),
            (self.checkpointing_steps >= 0,
             f"--checkpointing_steps must be >= 0 (0 turns it off), got {self.checkpointing_steps}"),
            (self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             f"--checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}"),
            (bool(self.output_dir), "--output_dir must not be empty"),
            (self.num_validation_images >= 1,
             f"--num_validation_images must be at least 1, got {self.num_validation_images}"),
            (self.validation_steps >= 1, f"--validation_steps must be at least 1, got {self.validation_steps}"),
            (self.validation_num_inference_steps >= 1,
             f"--validation_num_inference_steps must be at least 1, got {self.validation_num_inference_steps}"),
            (self.validation_seed is None or 0 <= self.validation_seed < 2**32,
             f"--validation_seed must be in [0, 2**32), got {self.validation_seed}"),
            (self.validation_loss_steps >= 0,
             f"--validation_loss_steps must be >= 0 (0 turns it off), got {self.validation_loss_steps}"),
            (0.0 <= self.validation_split < 1.0,
             f"--validation_split must be a fraction in [0, 1) of the images to hold out, got {self.validation_split}"),
            (not self.validation_split or self.validation_loss_steps,
             "--validation_split holds images out for the validation loss only: set --validation_loss_steps N too"),
            (self.distributed_timeout > 0, f"--distributed_timeout must be > 0, got {self.distributed_timeout}"),
            one_of("--report_to", self.report_to, REPORT_TO),
            *self._row_checks(),
            *self._bucket_checks(),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        listed = concepts_lib.from_config(self)
        if self.concepts is not None:
            self._validate_concepts(listed)
        if self.report_to == "tensorboard" and not tensorboard_available():
            raise UserError("--report_to tensorboard needs tensorboardX: `pip install tensorboardX`")
        return listed

    def _loss_checks(self):
        """(ok, message) for the loss recipe's flags; --max_timestep's upper bound is the model's
        number of training timesteps, checked once it is loaded (losses.LossSpec.from_config)."""
        def positive(x):
            return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

        return [
            (self.snr_gamma is None or positive(self.snr_gamma),
             f"--snr_gamma must be a positive number (diffusers recommends 5.0), got {self.snr_gamma}"),
            (self.noise_offset == 0 or positive(self.noise_offset),
             f"--noise_offset must be >= 0 (0 turns it off; about 0.1 is usual), got {self.noise_offset}"),
            one_of("--loss_type", self.loss_type, LOSS_TYPES),
            one_of("--huber_schedule", self.huber_schedule, HUBER_SCHEDULES),
            (positive(self.huber_c), f"--huber_c must be a positive number, got {self.huber_c}"),
            (self.loss_type != "l2" or (self.huber_c, self.huber_schedule) == (HUBER_C, HUBER_SCHEDULE),
             "--huber_c and --huber_schedule apply only with --loss_type huber or smooth_l1; "
             "pass one of those or leave them out"),
            (self.min_timestep >= 0, f"--min_timestep must be >= 0, got {self.min_timestep}"),
            (self.max_timestep is None or self.max_timestep > self.min_timestep,
             f"--max_timestep must be greater than --min_timestep (timesteps are drawn from [min, max)), "
             f"got {self.min_timestep} and {self.max_timestep}"),
        ]

    @property
    def masked(self):
        """Whether the loss is masked: --masked_loss (mask files) or --alpha_mask (alpha channels)."""
        return self.masked_loss or self.alpha_mask

    def _mask_checks(self):
        """(ok, message) for the masked loss's flags; the masks themselves are checked as they are read."""
        suffix, weight = self.mask_suffix, self.unmasked_weight
        named = isinstance(suffix, str) and "/" not in suffix and "\\" not in suffix and os.path.splitext("x" + suffix)[0] != "x"
        return [
            (named, f"--mask_suffix must be the end of a file name after the image's stem, like {MASK_SUFFIX} or "
             f"_mask.png (dog.jpg -> dog_mask.png), got {suffix!r}"),
            (self.masked or suffix == MASK_SUFFIX, "--mask_suffix names the mask files of --masked_loss: pass "
             "--masked_loss too, or leave it out"),
            (not self.alpha_mask or suffix == MASK_SUFFIX,
             "--mask_suffix names mask files, but --alpha_mask takes the masks from the images' alpha channels: "
             "pass one of them"),
            (isinstance(weight, (int, float)) and 0.0 <= weight <= 1.0,
             f"--unmasked_weight must be between 0 and 1 (the background's weight; 0: not learned), got {weight}"),
            (self.masked or not weight, "--unmasked_weight weighs the background of --masked_loss / --alpha_mask: "
             "pass one of those too, or leave it out"),
        ]

    def _bucket_checks(self):
        """(ok, message) for --enable_bucket and its flags (the model's own needs: run.check_buckets)."""
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        changed = [name for name in BUCKET_FLAGS if getattr(self, name) != defaults[name]]
        low, high, steps = self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps
        if not self.enable_bucket:
            return [(not changed, f"--{changed[0] if changed else ''} needs --enable_bucket: alone it does nothing")]
        return [
            (steps >= 1, f"--bucket_reso_steps must be at least 1, got {steps}"),
            (0 < low <= high, f"--min_bucket_reso ({low}) must be positive and at most --max_bucket_reso ({high})"),
            (steps < 1 or (low % steps == 0 and high % steps == 0),
             f"--min_bucket_reso ({low}) and --max_bucket_reso ({high}) must be multiples of --bucket_reso_steps "
             f"({steps})"),
            (self.resolution is None or low <= self.resolution <= high,
             f"--resolution {self.resolution} must be between --min_bucket_reso ({low}) and --max_bucket_reso "
             f"({high})"),
            (not self.center_crop, "--center_crop does nothing with --enable_bucket, which always center-crops each "
             "image to its bucket; pass one of them"),
            (not self.validation_loss_steps, "--validation_loss_steps evaluates square images and cannot be combined "
             "with --enable_bucket yet; pass one of them"),
        ]

    def _row_checks(self):
        """(ok, message) for the flags that act on the rows after each update."""
        targets = self.norm_targets
        decay = self.embedding_norm_decay
        controls = self.embedding_norm == "preserve" or (isinstance(decay, (int, float)) and decay > 0)
        return [
            one_of("--embedding_norm", self.embedding_norm, EMBEDDING_NORMS),
            (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0,
             f"--embedding_norm_decay must be between 0 and 1 (0 turns it off), got {decay}"),
            (not (self.embedding_norm == "preserve" and decay),
             "--embedding_norm_decay does nothing with --embedding_norm preserve, which sets each norm to the target "
             "after every update; pass one of them"),
            (targets is None or controls,
             "--embedding_norm_target needs --embedding_norm preserve or --embedding_norm_decay: alone it does nothing"),
            (targets is None or (len(targets) in (1, 2) and all(math.isfinite(t) and t > 0 for t in targets)),
             f"--embedding_norm_target must be one positive number (SDXL: two, CLIP-L's and bigG's), got "
             f"{self.embedding_norm_target}"),
            (isinstance(self.ema_decay, (int, float)) and 0.0 < self.ema_decay < 1.0,
             f"--ema_decay must be between 0 and 1 (both excluded), got {self.ema_decay}"),
            (self.ema_update_after_step >= 0, f"--ema_update_after_step must be >= 0, got {self.ema_update_after_step}"),
            (self.use_ema or (self.ema_decay == TrainConfig.ema_decay and self.ema_update_after_step == 0),
             "--ema_decay and --ema_update_after_step need --use_ema: without it they do nothing"),
        ]

    @property
    def norm_rate(self):
        """How far each update moves a learned vector's norm to the target: 1 with --embedding_norm
        preserve, R with --embedding_norm_decay R, 0 (no norm control) without either."""
        return 1.0 if self.embedding_norm == "preserve" else float(self.embedding_norm_decay)

    @property
    def norm_targets(self):
        """--embedding_norm_target as a tuple of floats (a single number given alone is one), or None."""
        given = self.embedding_norm_target
        if given is None:
            return None
        try:
            return tuple(float(t) for t in (given if isinstance(given, (list, tuple)) else (given,)))
        except (TypeError, ValueError):
            return ()  # not numbers: _row_checks names the flag

    def _validate_concepts(self, listed):
        """Check --concepts as read (after the flags, which give its entries' defaults)."""
        if self.caption_prefix_token and not any(c.caption_extension for c in listed):
            raise UserError(
                "--caption_prefix_token needs a caption_extension (e.g. .txt), as --caption_extension or on a concept "
                "in --concepts: it changes caption files, and without one none are read"
            )
        if self.validation_prompt and "{}" not in self.validation_prompt:
            raise UserError(
                f"--validation_prompt {self.validation_prompt!r}: with --concepts it needs {{}} where each "
                "concept's token goes, like 'a photo of {} on a beach'"
            )

    @property
    def compute_dtype(self):
        """The frozen models' weight and activation dtype: "float32" or "bfloat16"."""
        return MIXED_PRECISION[self.mixed_precision]

    @property
    def resolved_report_to(self):
        """"auto" resolved: tensorboard when its writer is installed, else none."""
        if self.report_to != "auto":
            return self.report_to
        return "tensorboard" if tensorboard_available() else "none"

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown config fields: {', '.join(unknown[:5])}{f' and {len(unknown) - 5} more' if len(unknown) > 5 else ''}")
        return cls(**data)

    @classmethod
    def tiny(cls, model_dir, data_dir, output_dir, **changes):
        """A few-step run on the tiny test model: what tests and the demo use."""
        base = dict(
            pretrained_model_name_or_path=model_dir,
            train_data_dir=data_dir,
            output_dir=output_dir,
            placeholder_token="<cat-toy>",
            initializer_token="toy",
            resolution=32,
            train_batch_size=1,
            max_train_steps=4,
            repeats=10,
            learning_rate=5e-3,
            lr_warmup_steps=0,
            save_steps=0,
            checkpointing_steps=0,
            seed=0,
        )
        base.update(changes)
        return cls(**base)
