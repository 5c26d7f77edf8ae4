"""One frozen dataclass describing a training run: every flag declared once, validation, JSON round trip.

Each field is `flag(default, group=..., resume=..., help=...)` (flags.py): the field, its
`python -m ti_flax.train` flag, its resume decision and its line in docs/flags.md. The checks of
`validate()` are in checks.py.
"""

import dataclasses
import json
from typing import Any, Optional

from ..errors import UserError
from . import checks
from .checks import HUBER_C, HUBER_SCHEDULE
from .choices import (
    ATTENTION, EARLY_STOPPING, EMBEDDING_NORMS, HUBER_SCHEDULES, INTERPOLATIONS, LEARNABLE_PROPERTIES, LOSS_TYPES,
    LR_SCHEDULERS, MASK_SUFFIX, MIXED_PRECISION, PREDICTION_TYPES, REPORT_TO, TIMESTEP_SAMPLINGS,
)
from .flags import (
    BUCKETS, DATA, FLOW, LOGGING, LORA, LOSS, MASKS, MATCH, MAY_CHANGE, MODEL, MODEL_FILES, OPTIMISATION, OUTPUTS,
    PROCESSES, ROWS, SPEED, STOPPING, VALIDATION, VALIDATION_LOSS, flag,
)

# Where validate() keeps the concepts it read, in the instance's __dict__ (the dataclass is frozen).
_CHECKED = "_checked_concepts"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A textual-inversion run. Field names and meanings follow diffusers' training scripts.

    Args:
        Every field is the `python -m ti_flax.train` flag of the same name, with the same
        default, declared once below with `flag(...)` (its group, help and resume decision;
        docs/flags.md lists them); `TrainConfig.tiny(...)` is a few-step run on a tiny test
        model. Call `validate()` to check the values before a long model load.

    Example:
        >>> from ti_flax import TrainConfig, train
        >>> cfg = TrainConfig(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5",
        ...                   train_data_dir="cat_toy/", placeholder_token="<cat-toy>",
        ...                   initializer_token="toy", output_dir="out", max_train_steps=3000)
        >>> result = train(cfg)  # doctest: +SKIP
    """

    pretrained_model_name_or_path: str = flag("", group=MODEL, resume=MAY_CHANGE, required=True,
        help="local model folder, Hub id, or one original SD 1.x/2.x or SDXL checkpoint file (A1111/ComfyUI "
             ".safetensors)")
    revision: Optional[str] = flag(None, group=MODEL, resume=MAY_CHANGE,
        help="Hub revision (branch, tag or commit) of the model")
    tokenizer_name: Optional[str] = flag(None, group=MODEL, resume=MAY_CHANGE,
        help="tokenizer folder or Hub id, if not the model's own")
    # another VAE: a folder, Hub id or VAE file
    pretrained_vae_model_name_or_path: Optional[str] = flag(None, group=MODEL, resume=MATCH,
        help="another VAE instead of the model's, as diffusers' scripts' flag and kohya's --vae: an AutoencoderKL "
             "folder or Hub id (e.g. an fp16-fix VAE), or one VAE file in the original layout (A1111's models/VAE)")
    # None: the model's scheduler config (a single file: epsilon)
    prediction_type: Optional[str] = flag(None, group=MODEL, resume=MAY_CHANGE, choices=PREDICTION_TYPES,
        help="the model's training target, instead of its scheduler config's (a single file: its v_pred key, else "
             "epsilon; pass v_prediction for SD 2.x 768-v files)")
    # True: the noise schedule rescaled to zero terminal SNR (diffusers' rescale_betas_zero_snr, with
    # "trailing" sampling timesteps); False: not, even where the model asks; None: as the model's
    # scheduler config, or a single file's ztsnr marker, says (off for every model without one).
    zero_terminal_snr: Optional[bool] = flag(None, group=MODEL, resume=MATCH,
        negation="train and sample with the model's plain schedule even where a single file's ztsnr key or its "
                 "scheduler config asks for zero terminal SNR",
        help="rescale the noise schedule to zero terminal SNR (diffusers' rescale_betas_zero_snr), for training and "
             "for sampling with trailing timesteps; for v-prediction models trained that way (default: as the model "
             "says: its scheduler config, or a single file's ztsnr key)")
    # unpickle a .ckpt model or a .npy --initial_embeddings (can run code)
    allow_pickle: bool = flag(False, group=MODEL, resume=MAY_CHANGE, switch=True, aliases=("--allow-pickle",),
        help="allow unpickling a .ckpt model or a .npy --initial_embeddings: it can run code, so only for files you "
             "trust")
    # FLUX.1 kept as files (kohya's flags): the transformer file is --pretrained_model_name_or_path.
    text_encoders: Optional[str] = flag(None, group=MODEL, resume=MATCH, metavar="NAMES",
        help="a model with several text encoders (SDXL, FLUX.1): the ones whose rows are trained, comma-separated by "
             "their keys (clip_l, clip_g; clip_l, t5xxl); the others keep the initializer's rows (default: all)")
    clip_l: Optional[str] = flag(None, group=MODEL_FILES, resume=MAY_CHANGE,
        help="FLUX.1 kept as files (ComfyUI, Forge): the CLIP-L text encoder file, clip_l.safetensors, as kohya's "
             "--clip_l; --pretrained_model_name_or_path is then the transformer file (flux1-dev.safetensors)")
    t5xxl: Optional[str] = flag(None, group=MODEL_FILES, resume=MAY_CHANGE,
        help="FLUX.1 kept as files: the T5-XXL encoder file (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors), as "
             "kohya's --t5xxl")
    ae: Optional[str] = flag(None, group=MODEL_FILES, resume=MAY_CHANGE,
        help="FLUX.1 kept as files: the autoencoder file, ae.safetensors, as kohya's --ae")
    t5xxl_tokenizer: Optional[str] = flag(None, group=MODEL_FILES, resume=MAY_CHANGE,
        help="FLUX.1 kept as files: T5's tokenizer, a folder (a FLUX.1 folder's tokenizer_2/) or Hub id (default: "
             "google/t5-v1_1-xxl's, which a file does not hold)")
    train_data_dir: str = flag("", group=DATA, resume=MAY_CHANGE,
        help="folder with the 3-10 training images (required without --concepts)")
    placeholder_token: str = flag("", group=DATA, resume=MATCH,
        help="the new token, e.g. <cat-toy> (required without --concepts)")
    initializer_token: str = flag("", group=DATA, resume=MAY_CHANGE,
        help="one existing token whose row starts the training")
    num_vectors: int = flag(1, group=DATA, resume=MATCH, type=int,
        help="vectors per concept (tokens tok, tok_1, ...)")
    # start from an existing embedding file instead
    initial_embeddings: Optional[str] = flag(None, group=DATA, resume=MAY_CHANGE,
        help="start from this embedding file (diffusers, A1111 or kohya layout) instead of the initializer token's "
             "row; its vector count must equal --num_vectors")
    learnable_property: str = flag("object", group=DATA, resume=MATCH, choices=LEARNABLE_PROPERTIES)
    # ".txt": an image's prompt is in its caption file beside it
    caption_extension: Optional[str] = flag(None, group=DATA, resume=MATCH,
        help="e.g. .txt: an image's prompt is in the file of its name with this extension, written with the "
             'placeholder ("a photo of <cat-toy> on a table"); images without one use the templates (default: off)')
    # Several concepts at once: the path of a .json/.toml file, or a list of dicts with the keys of
    # concepts.Concept (see concepts.py); None: the one concept of the flags below.
    concepts: Optional[Any] = flag(None, group=DATA, resume=MAY_CHANGE, metavar="FILE",
        help="train several concepts at once: a .json or .toml file listing them ([[concepts]] tables, or a JSON "
             'list or {"concepts": [...]}), each with the keys placeholder_token, train_data_dir, and '
             "initializer_token or initial_embeddings; optional num_vectors, learnable_property, caption_extension, "
             "repeats (default: those flags) and weight (its share of each batch, default 1). Relative paths are "
             "relative to the file's folder. Replaces --placeholder_token, --train_data_dir, --initializer_token and "
             "--initial_embeddings; each concept's embedding goes in OUTPUT_DIR/<token>/")
    # a caption without the placeholder gets it in front
    caption_prefix_token: bool = flag(False, group=DATA, resume=MATCH, switch=True,
        help='put the placeholder in front of a caption that lacks it ("<cat-toy>, a photo of ..."); without this '
             "such a caption is an error")
    repeats: int = flag(100, group=DATA, resume=MATCH, type=int,
        help="times each image appears per epoch")
    # None: run.DEFAULT_RESOLUTION (512), or an SDXL model's native size (1024)
    resolution: Optional[int] = flag(None, group=DATA, resume=MATCH, type=int,
        help="image side (default: 512, as diffusers' scripts; 1024, its native size, for an SDXL model)")
    center_crop: bool = flag(False, group=DATA, resume=MATCH, switch=True,
        help="crop the central square before resizing (default: squash to a square)")
    interpolation: str = flag("bicubic", group=DATA, resume=MATCH, choices=tuple(INTERPOLATIONS))
    flip_p: float = flag(0.5, group=DATA, resume=MATCH, type=float,
        help="probability of a horizontal flip")
    # Aspect-ratio buckets (kohya sd-scripts' flags and defaults; all need enable_bucket)
    # each image trains in the bucket nearest its aspect ratio, not a square
    enable_bucket: bool = flag(False, group=BUCKETS, resume=MATCH, switch=True,
        help="train each image in the bucket nearest its aspect ratio (buckets of about --resolution^2 pixels), "
             "resized to cover it and center-cropped, instead of a square; each global batch comes from one bucket, "
             "and each bucket is one more compiled step")
    # the buckets' shortest side
    min_bucket_reso: int = flag(256, group=BUCKETS, resume=MATCH, type=int,
        help="the buckets' shortest side in pixels (default 256); needs --enable_bucket")
    # the buckets' longest side
    max_bucket_reso: int = flag(1024, group=BUCKETS, resume=MATCH, type=int,
        help="the buckets' longest side in pixels (default 1024); needs --enable_bucket")
    # every bucket side is a multiple of this
    bucket_reso_steps: int = flag(64, group=BUCKETS, resume=MATCH, type=int,
        help="every bucket side is a multiple of this (default 64); the model's VAE x UNet downsampling must divide "
             "it; needs --enable_bucket")
    # buckets from each image's own size, never enlarged
    bucket_no_upscale: bool = flag(False, group=BUCKETS, resume=MATCH, switch=True,
        help="never enlarge an image: its bucket is its own size (larger ones scaled down to about --resolution^2 "
             "pixels) rounded down to --bucket_reso_steps; needs --enable_bucket")
    seed: int = flag(42, group=OPTIMISATION, resume=MATCH, type=int)
    # per device
    train_batch_size: int = flag(16, group=OPTIMISATION, resume=MAY_CHANGE, type=int,
        help="batch size per device")
    num_train_epochs: int = flag(100, group=OPTIMISATION, resume=MAY_CHANGE, type=int)
    # overrides num_train_epochs when set
    max_train_steps: Optional[int] = flag(
        5000, group=OPTIMISATION, resume=MAY_CHANGE, type=int, from_cli=lambda steps: steps or None,
        help="total steps; overrides --num_train_epochs (0: use --num_train_epochs)")
    learning_rate: float = flag(1e-4, group=OPTIMISATION, resume=MAY_CHANGE, type=float)
    scale_lr: bool = flag(False, group=OPTIMISATION, resume=MAY_CHANGE, switch=True,
        help="multiply the learning rate by the global batch size (off by default)")
    lr_scheduler: str = flag("constant", group=OPTIMISATION, resume=MAY_CHANGE, choices=LR_SCHEDULERS)
    lr_warmup_steps: int = flag(500, group=OPTIMISATION, resume=MAY_CHANGE, type=int)
    adam_beta1: float = flag(0.9, group=OPTIMISATION, resume=MAY_CHANGE, type=float)
    adam_beta2: float = flag(0.999, group=OPTIMISATION, resume=MAY_CHANGE, type=float)
    adam_weight_decay: float = flag(1e-2, group=OPTIMISATION, resume=MAY_CHANGE, type=float)
    adam_epsilon: float = flag(1e-8, group=OPTIMISATION, resume=MAY_CHANGE, type=float)
    max_grad_norm: Optional[float] = flag(None, group=OPTIMISATION, resume=MAY_CHANGE, type=float,
        help="clip the gradient norm (off by default)")
    # micro-batches per optimizer update
    gradient_accumulation_steps: int = flag(1, group=OPTIMISATION, resume=MATCH, type=int,
        help="micro-batches per optimizer update; --max_train_steps and --checkpointing_steps count updates")
    # Loss recipe (diffusers' and kohya's flags, each off by default: see losses.py)
    # min-SNR-gamma loss weighting
    snr_gamma: Optional[float] = flag(None, group=LOSS, resume=MATCH, type=float,
        help="min-SNR-gamma weighting, as diffusers' train_text_to_image.py: each example's loss times min(snr, "
             "gamma) / snr (v-prediction: / (snr + 1)); 5.0 is the paper's (default: off)")
    # noise + noise_offset * randn(B, C, 1, 1)
    noise_offset: float = flag(0.0, group=LOSS, resume=MATCH, type=float,
        help="add noise_offset * randn(batch, channels, 1, 1) to the noise, as diffusers and kohya (about 0.1 is "
             "usual; default 0: off)")
    loss_type: str = flag("l2", group=LOSS, resume=MATCH, choices=LOSS_TYPES,
        help="kohya's element loss: l2 (squared error), huber or smooth_l1 (pseudo-Huber with threshold --huber_c, "
             "scheduled by --huber_schedule)")
    # kohya's defaults; used only with --loss_type huber or smooth_l1
    huber_c: float = flag(HUBER_C, group=LOSS, resume=MATCH, type=float,
        help=f"kohya's Huber threshold (default {HUBER_C}); only with --loss_type huber or smooth_l1")
    huber_schedule: str = flag(HUBER_SCHEDULE, group=LOSS, resume=MATCH, choices=HUBER_SCHEDULES,
        help=f"kohya's Huber threshold over timesteps (default {HUBER_SCHEDULE}); only with --loss_type huber or "
             f"smooth_l1")
    # timesteps drawn from [min_timestep, max_timestep)
    min_timestep: int = flag(0, group=LOSS, resume=MATCH, type=int,
        help="draw training timesteps from [min_timestep, max_timestep), as kohya (default 0)")
    # None: the model's num_train_timesteps
    max_timestep: Optional[int] = flag(None, group=LOSS, resume=MATCH, type=int,
        help="see --min_timestep (default: the model's number of training timesteps, 1000 for SD)")
    # Rectified flow (FLUX.1): how each example's noise level is drawn, and [dev]'s guidance.
    timestep_sampling: str = flag("sigma", group=FLOW, resume=MATCH, choices=TIMESTEP_SAMPLINGS,
        help="kohya's: how each example's noise level t is drawn (sigma: from the shifted training schedule; "
             "uniform; sigmoid of a normal draw; shift: that sigmoid shifted by --discrete_flow_shift; flux_shift: "
             "shifted by the image's size, as FLUX.1 samples); FLUX.1 models only")
    discrete_flow_shift: float = flag(3.0, group=FLOW, resume=MATCH, type=float,
        help="kohya's shift of the noise levels for --timestep_sampling sigma and shift (default 3.0); FLUX.1 only")
    sigmoid_scale: float = flag(1.0, group=FLOW, resume=MATCH, type=float,
        help="kohya's scale of the normal draw for --timestep_sampling sigmoid, shift and flux_shift (default 1.0); "
             "FLUX.1 only")
    guidance_scale: float = flag(1.0, group=FLOW, resume=MATCH, type=float,
        help="FLUX.1 [dev]'s embedded guidance scale while training (default 1.0, as kohya trains [dev]); not for "
             "[schnell], which has none")
    # Masked loss (off by default; kohya's --masked_loss / --alpha_mask, OneTrainer's mask files and
    # unmasked weight): each example's loss is its mask's weighted mean (see losses.py, images.py).
    # masks from the files <stem><mask_suffix> beside the images
    masked_loss: bool = flag(False, group=MASKS, resume=MATCH, switch=True,
        help="weigh each example's loss by its image's mask, normalised by the mask's area (a small subject is "
             "learned as strongly as a large one): the mask file beside the image, <stem>-masklabel.png as "
             "OneTrainer names it (see --mask_suffix); white = learn, black = ignore, grey in between; every image "
             "needs one")
    # masks from the images' alpha channels (turns masked loss on, as kohya's)
    alpha_mask: bool = flag(False, group=MASKS, resume=MATCH, switch=True,
        help="take each image's mask from its alpha channel (transparent = not learned), as kohya; turns the masked "
             "loss on without --masked_loss")
    # the mask of dog.jpg is dog-masklabel.png
    mask_suffix: str = flag(MASK_SUFFIX, group=MASKS, resume=MATCH,
        help=f"the mask file of dog.jpg is dog + this (default {MASK_SUFFIX}); such files are never training images")
    # the background's weight: each weight is clamp(mask, this, 1)
    unmasked_weight: float = flag(0.0, group=MASKS, resume=MATCH, type=float,
        help="OneTrainer's weight of the background: each latent position's weight is clamp(mask, W, 1), 0 <= W <= 1 "
             "(default 0: the background is not learned)")
    # The learned rows after each update (all off by default)
    # "preserve": each vector rescaled to the target norm
    embedding_norm: str = flag("none", group=ROWS, resume=MATCH, choices=EMBEDDING_NORMS,
        help="preserve: rescale each learned vector to the target norm after every update, as OneTrainer's preserve "
             "embedding norm (SDXL: each text encoder's part to its own target)")
    # a norm per text encoder (SDXL: two); None: each table's median
    embedding_norm_target: Optional[Any] = flag(
        None, group=ROWS, resume=MATCH, type=float, metavar="NORM", nargs="+", from_cli=tuple,
        help="the target norm of --embedding_norm and --embedding_norm_decay (default: the median row norm of the "
             "text encoder's token table); SDXL: two, CLIP-L's then bigG's")
    # R: norm <- norm + R * (target - norm); 0: off
    embedding_norm_decay: float = flag(0.0, group=ROWS, resume=MATCH, type=float, metavar="R",
        help="after every update, pull each learned vector's norm toward the target, direction kept: norm <- norm + "
             "R * (target - norm), 0 <= R <= 1 (0: off; 1: as --embedding_norm preserve)")
    # the embeddings written are the rows' moving average
    use_ema: bool = flag(False, group=ROWS, resume=MATCH, switch=True,
        help="keep an exponential moving average of the learned rows, as diffusers' EMAModel, and write it as the "
             "embeddings (final, --save_steps, checkpoints, --save_as_full_pipeline) and use it for the validation "
             "images")
    # diffusers' EMAModel decay (its warm-up caps at it)
    ema_decay: float = flag(0.9999, group=ROWS, resume=MATCH, type=float,
        help="the EMA's decay (default 0.9999, diffusers' EMAModel's): update k moves the average 1 - d of the way "
             "to the rows, d = min((1 + s) / (10 + s), ema_decay), s = k - ema_update_after_step - 1 (0 while s <= "
             "0: the average is the rows); needs --use_ema")
    # diffusers' EMAModel update_after_step
    ema_update_after_step: int = flag(0, group=ROWS, resume=MATCH, type=int,
        help="diffusers' update_after_step U: the EMA copies the rows for the first U + 1 updates, then averages "
             "(default 0); needs --use_ema")
    # Pivotal tuning (training/lora in optim.LoraSpec, models/lora.py): off while lora_rank is None
    lora_rank: Optional[int] = flag(None, group=LORA, resume=MATCH, type=int, aliases=("--network_dim",),
        help="train a LoRA of the UNet of this rank beside the rows (kohya's --network_dim; default: off, rows only); "
             "written as pytorch_lora_weights.safetensors (diffusers) and <token>_lora.safetensors (kohya, A1111, "
             "ComfyUI; the embedding bundled)")
    lora_alpha: Optional[float] = flag(None, group=LORA, resume=MATCH, type=float, aliases=("--network_alpha",),
        help="the LoRA's alpha: its update is scaled by alpha / rank (kohya's --network_alpha; default: the rank, "
             "a scale of 1); needs --lora_rank")
    lora_dropout: float = flag(0.0, group=LORA, resume=MATCH, type=float,
        help="dropout on the LoRA's input (PEFT's lora_dropout); only 0 (the default) is supported for now")
    lora_targets: str = flag("attn", group=LORA, resume=MATCH, metavar="MODULES",
        help="the UNet modules the LoRA adapts, comma-separated as diffusers' --lora_layers: attn (to_q, to_k, "
             "to_v, to_out.0: the default), ff (ff.net.0.proj, ff.net.2), proj (proj_in, proj_out), or those "
             "names; needs --lora_rank")
    lora_learning_rate: Optional[float] = flag(None, group=LORA, resume=MAY_CHANGE, type=float,
        aliases=("--unet_lr",),
        help="the LoRA's learning rate (kohya's --unet_lr; default 1e-4), on --lr_scheduler's schedule, scaled as "
             "--learning_rate by --scale_lr; needs --lora_rank")
    train_text_encoder_ti_frac: Optional[float] = flag(None, group=LORA, resume=MATCH, type=float,
        help="the pivot, as diffusers' advanced scripts: the rows learn during the first F of the updates, then "
             "stay as they are while the LoRA goes on (0 <= F <= 1, 0: the LoRA alone; default 0.5, diffusers'); needs "
             "--lora_rank")
    # "bf16": frozen weights and activations in bfloat16
    mixed_precision: str = flag("no", group=SPEED, resume=MAY_CHANGE, metavar="{" + ",".join(MIXED_PRECISION) + "}",
        help="bf16: frozen text encoder, UNet and VAE in bfloat16 (learned rows, loss and optimizer stay float32)")
    # VAE-encode each (image, flip) view once, up front
    cache_latents: bool = flag(False, group=SPEED, resume=MAY_CHANGE, switch=True,
        help="VAE-encode each image and its flip once before training (the VAE leaves the step)")
    # rematerialise the UNet's blocks in the backward pass
    gradient_checkpointing: bool = flag(False, group=SPEED, resume=MAY_CHANGE, switch=True,
        help="recompute the UNet's block activations in the backward pass: less memory, more compute")
    # the UNet's attention: one of ATTENTION; auto picks per call site
    attention: str = flag("auto", group=SPEED, resume=MAY_CHANGE, choices=ATTENTION,
        help="UNet attention: dense (one score matrix), chunked (query chunks: faster on CPU, less memory), cudnn "
             "(fused, NVIDIA GPU, bf16), flash (Pallas kernel, TPU); auto: the fastest one each call can run")
    # FSDP: the frozen weights split over the devices, one jit program over a mesh (parallel.Sharded)
    shard_weights: bool = flag(False, group=SPEED, resume=MAY_CHANGE, switch=True,
        help="split the frozen weights over the devices (FSDP; the batch is still split over them too) instead of "
             "a copy on each: for FLUX.1, whose weights do not fit one device; on by itself where a device's memory "
             "is smaller than the weights")
    # True: no persistent compilation cache (see compile_cache.py)
    no_compilation_cache: bool = flag(False, group=SPEED, resume=MAY_CHANGE, switch=True,
        help="do not keep compiled programs on disk for the next run (default: in $XDG_CACHE_HOME/ti_flax/jax_cache, "
             "~/.cache/ti_flax/jax_cache, or $JAX_COMPILATION_CACHE_DIR if set)")
    output_dir: str = flag("text-inversion-model", group=OUTPUTS, resume=MAY_CHANGE)
    save_steps: int = flag(500, group=OUTPUTS, resume=MAY_CHANGE, type=int,
        help="write learned_embeds-steps-N.safetensors every N steps (0: off)")
    # 0: no checkpoints
    checkpointing_steps: int = flag(500, group=OUTPUTS, resume=MAY_CHANGE, type=int,
        help="save a resumable checkpoint-N folder every N steps (0: off)")
    checkpoints_total_limit: Optional[int] = flag(None, group=OUTPUTS, resume=MAY_CHANGE, type=int,
        help="keep at most this many checkpoints (oldest removed first)")
    # a checkpoint folder, or "latest"
    resume_from_checkpoint: Optional[str] = flag(None, group=OUTPUTS, resume=MAY_CHANGE,
        help='a checkpoint folder, or "latest" to continue from the newest in --output_dir')
    no_safe_serialization: bool = flag(False, group=OUTPUTS, resume=MAY_CHANGE, switch=True,
        help="also write learned_embeds.bin with torch.save")
    save_as_full_pipeline: bool = flag(False, group=OUTPUTS, resume=MAY_CHANGE, switch=True,
        help="also save the whole model as a diffusers folder (PyTorch diffusers and ti_flax load it) holding the "
             "new tokens")
    # Validation images (off unless validation_prompt is set)
    validation_prompt: Optional[str] = flag(None, group=VALIDATION, resume=MAY_CHANGE,
        help="prompt to render every --validation_steps (off when not set)")
    num_validation_images: int = flag(4, group=VALIDATION, resume=MAY_CHANGE, type=int)
    validation_steps: int = flag(100, group=VALIDATION, resume=MAY_CHANGE, type=int)
    validation_num_inference_steps: int = flag(25, group=VALIDATION, resume=MAY_CHANGE, type=int)
    validation_resolution: Optional[int] = flag(None, group=VALIDATION, resume=MAY_CHANGE, type=int,
        help="the validation images' side in pixels (default: the model's own size, as its diffusers pipeline "
             "draws: 512 for SD 1.5, 768 for SD 2.x 768-v, 1024 for SDXL and FLUX.1)")
    validation_guidance_scale: Optional[float] = flag(None, group=VALIDATION, resume=MAY_CHANGE, type=float,
        help="default: the model's pipeline's (7.5; FLUX.1 [dev]: 3.5, its embedded guidance)")
    # default: --seed
    validation_seed: Optional[int] = flag(None, group=VALIDATION, resume=MAY_CHANGE, type=int,
        help="default: --seed")
    # The validation loss (off unless validation_loss_steps is set): the plain diffusion loss of
    # fixed examples every N updates; with validation_split a fraction of each concept's images is
    # held out of training for it (kohya's --validation_split).
    validation_loss_steps: int = flag(0, group=VALIDATION_LOSS, resume=MAY_CHANGE, type=int,
        help="every N updates and after the last, the plain diffusion loss (MSE) of fixed examples: each validation "
             "image unflipped with its caption or first template, at timesteps 200, 400, 600, 800 (kohya's), with "
             "noise fixed by --seed; logged as validation_loss (0: off)")
    validation_split: float = flag(0.0, group=VALIDATION_LOSS, resume=MATCH, type=float,
        help="kohya's flag: hold this fraction of each concept's images (round(N x F), chosen from --seed) out of "
             "training and compute the validation loss on them only (default 0: on every training image)")
    # Early stopping (off by default): DVAR (Voronov et al., NeurIPS 2023) ends the run when the
    # loss of fixed training examples stops changing (training/early_stopping.py). Every knob may
    # change on resume: none changes the rows' path, only where it ends, and the checkpoint keeps
    # the criterion's history for whatever knobs the resumed run has.
    early_stopping: str = flag("none", group=STOPPING, resume=MAY_CHANGE, choices=EARLY_STOPPING,
        help="dvar: end the run when the concept stops changing the training objective (DVAR, Voronov et al. 2023): "
             "the plain loss of 4 fixed training examples per concept (the validation loss's draws: each at its own "
             "timestep of 200, 400, 600, 800) is computed every --early_stopping_every updates, and the run ends at "
             "the first evaluation where its variance over the last --early_stopping_window updates is below "
             "--early_stopping_threshold times its variance since the start; the final files are written as at the "
             "last step (default none: the run takes every step)")
    early_stopping_window: int = flag(200, group=STOPPING, resume=MAY_CHANGE, type=int,
        help="DVAR's window in optimizer updates (default 200, the paper's code's): a multiple of "
             "--early_stopping_every, shorter than the run; needs --early_stopping dvar")
    early_stopping_threshold: float = flag(0.15, group=STOPPING, resume=MAY_CHANGE, type=float,
        help="DVAR stops when the window's variance is below this fraction of the variance since the start, "
             "0 < T < 1 (default 0.15, the paper's code's); needs --early_stopping dvar")
    early_stopping_every: int = flag(1, group=STOPPING, resume=MAY_CHANGE, type=int,
        help="compute the deterministic loss every N updates (default 1, as the paper's code); each time is one "
             "forward pass of 4 examples per device; needs --early_stopping dvar")
    early_stopping_min_steps: int = flag(0, group=STOPPING, resume=MAY_CHANGE, type=int,
        help="never stop before this many updates (default 0: no floor but the window's); shorter than the run; "
             "needs --early_stopping dvar")
    logging_dir: str = flag("logs", group=LOGGING, resume=MAY_CHANGE,
        help="TensorBoard folder, relative to --output_dir")
    # tensorboard when tensorboardX is installed, else none
    report_to: str = flag("auto", group=LOGGING, resume=MAY_CHANGE, choices=REPORT_TO)
    push_to_hub: bool = flag(False, group=LOGGING, resume=MAY_CHANGE, switch=True,
        help="upload the output folder to the Hugging Face Hub at the end")
    hub_model_id: Optional[str] = flag(None, group=LOGGING, resume=MAY_CHANGE,
        help="Hub repository for --push_to_hub (default: the output folder's name)")
    hub_token: Optional[str] = flag(None, group=LOGGING, resume=MAY_CHANGE,
        help="Hub token for --push_to_hub")
    use_auth_token: bool = flag(False, group=LOGGING, resume=MAY_CHANGE, switch=True,
        help="use the token saved by `huggingface-cli login`")
    # Multi-process (CPU/GPU clusters; a multi-host TPU slice is detected automatically)
    coordinator_address: Optional[str] = flag(None, group=PROCESSES, resume=MAY_CHANGE,
        help="host:port of process 0, for CPU/GPU clusters")
    num_processes: Optional[int] = flag(None, group=PROCESSES, resume=MAY_CHANGE, type=int,
        help="number of processes (one per host)")
    process_id: Optional[int] = flag(None, group=PROCESSES, resume=MAY_CHANGE, type=int,
        help="this process's index, 0 .. num_processes-1")
    distributed_timeout: int = flag(300, group=PROCESSES, resume=MAY_CHANGE, type=int,
        help="seconds to wait for all processes to join (default 300)")

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
            self.__dict__[_CHECKED] = checks.check(self)
        return self

    def concept_list(self):
        """The run's concepts (`concepts.from_config`), as `validate()` read and checked them."""
        return self.validate().__dict__[_CHECKED]

    @property
    def masked(self):
        """Whether the loss is masked: --masked_loss (mask files) or --alpha_mask (alpha channels)."""
        return self.masked_loss or self.alpha_mask

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

    @property
    def compute_dtype(self):
        """The frozen models' weight and activation dtype: "float32" or "bfloat16"."""
        return MIXED_PRECISION[self.mixed_precision]

    @property
    def resolved_report_to(self):
        """"auto" resolved: tensorboard when its writer is installed, else none."""
        if self.report_to != "auto":
            return self.report_to
        return "tensorboard" if checks.tensorboard_available() else "none"

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
