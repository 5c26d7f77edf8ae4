"""Command-line flags -> TrainConfig. Flag names follow diffusers' textual_inversion scripts."""

import argparse
import dataclasses
import os

from .choices import (
    ATTENTION, EMBEDDING_NORMS, HUBER_SCHEDULES, INTERPOLATIONS, LEARNABLE_PROPERTIES, LOSS_TYPES, LR_SCHEDULERS,
    MIXED_PRECISION, PREDICTION_TYPES, REPORT_TO,
)
from .train_config import TrainConfig
from ..errors import UserError


def _bool_flag(parser, name, help):
    parser.add_argument(f"--{name}", action="store_true", help=help)


def build_parser():
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m ti_flax.train",
        description="Textual inversion for Stable Diffusion in JAX/Flax: learn new token embeddings "
        "for a concept from a few images.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="local model folder, Hub id, or one original SD 1.x/2.x or SDXL checkpoint file "
                   "(A1111/ComfyUI .safetensors)")
    g.add_argument("--revision", help="Hub revision (branch, tag or commit) of the model")
    g.add_argument("--tokenizer_name", help="tokenizer folder or Hub id, if not the model's own")
    g.add_argument("--pretrained_vae_model_name_or_path", help="another VAE instead of the model's, as diffusers' scripts' flag and kohya's --vae: an AutoencoderKL folder or Hub id (e.g. an fp16-fix VAE), or one VAE file in the original layout (A1111's models/VAE)")
    g.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=d.prediction_type,
                   help="the model's training target, instead of its scheduler config's (a single file: its "
                   "v_pred key, else epsilon; pass v_prediction for SD 2.x 768-v files)")
    g.add_argument("--zero_terminal_snr", action="store_const", const=True, default=d.zero_terminal_snr,
                   help="rescale the noise schedule to zero terminal SNR (diffusers' rescale_betas_zero_snr), for "
                   "training and for sampling with trailing timesteps; for v-prediction models trained that way "
                   "(default: as the model says: its scheduler config, or a single file's ztsnr key)")
    g.add_argument("--no_zero_terminal_snr", dest="zero_terminal_snr", action="store_const", const=False,
                   help="train and sample with the model's plain schedule even where a single file's ztsnr key "
                   "or its scheduler config asks for zero terminal SNR")
    g.add_argument("--allow_pickle", "--allow-pickle", action="store_true",
                   help="allow unpickling a .ckpt model or a .npy --initial_embeddings: it can run code, so only "
                   "for files you trust")
    g = p.add_argument_group("concept and data")
    # Not argparse-required: --concepts replaces both; TrainConfig.validate says which is missing.
    g.add_argument("--train_data_dir", default=d.train_data_dir, help="folder with the 3-10 training images (required "
                   "without --concepts)")
    g.add_argument("--placeholder_token", default=d.placeholder_token, help="the new token, e.g. <cat-toy> (required "
                   "without --concepts)")
    g.add_argument("--initializer_token", default="", help="one existing token whose row starts the training")
    g.add_argument("--num_vectors", type=int, default=d.num_vectors, help="vectors per concept (tokens tok, tok_1, ...)")
    g.add_argument("--initial_embeddings", help="start from this embedding file (diffusers, A1111 or kohya layout) "
                   "instead of the initializer token's row; its vector count must equal --num_vectors")
    g.add_argument("--learnable_property", choices=LEARNABLE_PROPERTIES, default=d.learnable_property)
    g.add_argument("--caption_extension", default=d.caption_extension,
                   help="e.g. .txt: an image's prompt is in the file of its name with this extension, written with "
                   "the placeholder (\"a photo of <cat-toy> on a table\"); images without one use the templates (default: off)")
    g.add_argument("--concepts", metavar="FILE", default=d.concepts,
                   help="train several concepts at once: a .json or .toml file listing them ([[concepts]] tables, or "
                   "a JSON list or {\"concepts\": [...]}), each with the keys placeholder_token, train_data_dir, and "
                   "initializer_token or initial_embeddings; optional num_vectors, learnable_property, "
                   "caption_extension, repeats (default: those flags) and weight (its share of each batch, default 1). "
                   "Relative paths are relative to the file's folder. Replaces --placeholder_token, --train_data_dir, "
                   "--initializer_token and --initial_embeddings; each concept's embedding goes in "
                   "OUTPUT_DIR/<token>/")
    _bool_flag(g, "caption_prefix_token", "put the placeholder in front of a caption that lacks it "
               "(\"<cat-toy>, a photo of ...\"); without this such a caption is an error")
    g.add_argument("--repeats", type=int, default=d.repeats, help="times each image appears per epoch")
    g.add_argument("--resolution", type=int, default=d.resolution,
                   help="image side (default: 512, as diffusers' scripts; 1024, its native size, for an SDXL model)")
    _bool_flag(g, "center_crop", "crop the central square before resizing (default: squash to a square)")
    g.add_argument("--interpolation", choices=tuple(INTERPOLATIONS), default=d.interpolation)
    g.add_argument("--flip_p", type=float, default=d.flip_p, help="probability of a horizontal flip")
    g = p.add_argument_group("aspect-ratio buckets (kohya sd-scripts' flags; off by default)")
    _bool_flag(g, "enable_bucket", "train each image in the bucket nearest its aspect ratio (buckets of about "
               "--resolution^2 pixels), resized to cover it and center-cropped, instead of a square; each global "
               "batch comes from one bucket, and each bucket is one more compiled step")
    g.add_argument("--min_bucket_reso", type=int, default=d.min_bucket_reso,
                   help="the buckets' shortest side in pixels (default 256); needs --enable_bucket")
    g.add_argument("--max_bucket_reso", type=int, default=d.max_bucket_reso,
                   help="the buckets' longest side in pixels (default 1024); needs --enable_bucket")
    g.add_argument("--bucket_reso_steps", type=int, default=d.bucket_reso_steps,
                   help="every bucket side is a multiple of this (default 64); the model's VAE x UNet downsampling "
                   "must divide it; needs --enable_bucket")
    _bool_flag(g, "bucket_no_upscale", "never enlarge an image: its bucket is its own size (larger ones scaled down "
               "to about --resolution^2 pixels) rounded down to --bucket_reso_steps; needs --enable_bucket")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--train_batch_size", type=int, default=d.train_batch_size, help="batch size per device")
    g.add_argument("--num_train_epochs", type=int, default=d.num_train_epochs)
    g.add_argument("--max_train_steps", type=int, default=d.max_train_steps, help="total steps; overrides --num_train_epochs (0: use --num_train_epochs)")
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    _bool_flag(g, "scale_lr", "multiply the learning rate by the global batch size (off by default)")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default=d.lr_scheduler)
    g.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--adam_beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam_beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam_weight_decay", type=float, default=d.adam_weight_decay)
    g.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm, help="clip the gradient norm (off by default)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps,
                   help="micro-batches per optimizer update; --max_train_steps and --checkpointing_steps count updates")
    g = p.add_argument_group("loss recipe (diffusers' and kohya's flags, each off by default)")
    g.add_argument("--snr_gamma", type=float, default=d.snr_gamma,
                   help="min-SNR-gamma weighting, as diffusers' train_text_to_image.py: each example's loss times "
                   "min(snr, gamma) / snr (v-prediction: / (snr + 1)); 5.0 is the paper's (default: off)")
    g.add_argument("--noise_offset", type=float, default=d.noise_offset,
                   help="add noise_offset * randn(batch, channels, 1, 1) to the noise, as diffusers and kohya "
                   "(about 0.1 is usual; default 0: off)")
    g.add_argument("--loss_type", choices=LOSS_TYPES, default=d.loss_type,
                   help="kohya's element loss: l2 (squared error), huber or smooth_l1 (pseudo-Huber with "
                   "threshold --huber_c, scheduled by --huber_schedule)")
    g.add_argument("--huber_c", type=float, default=d.huber_c,
                   help=f"kohya's Huber threshold (default {d.huber_c}); only with --loss_type huber or smooth_l1")
    g.add_argument("--huber_schedule", choices=HUBER_SCHEDULES, default=d.huber_schedule,
                   help=f"kohya's Huber threshold over timesteps (default {d.huber_schedule}); only with --loss_type "
                   "huber or smooth_l1")
    g.add_argument("--min_timestep", type=int, default=d.min_timestep,
                   help="draw training timesteps from [min_timestep, max_timestep), as kohya (default 0)")
    g.add_argument("--max_timestep", type=int, default=d.max_timestep,
                   help="see --min_timestep (default: the model's number of training timesteps, 1000 for SD)")
    g = p.add_argument_group("masked loss (kohya's and OneTrainer's flags, off by default)")
    _bool_flag(g, "masked_loss", "weigh each example's loss by its image's mask, normalised by the mask's area "
               "(a small subject is learned as strongly as a large one): the mask file beside the image, "
               "<stem>-masklabel.png as OneTrainer names it (see --mask_suffix); white = learn, black = ignore, "
               "grey in between; every image needs one")
    _bool_flag(g, "alpha_mask", "take each image's mask from its alpha channel (transparent = not learned), as kohya; "
               "turns the masked loss on without --masked_loss")
    g.add_argument("--mask_suffix", default=d.mask_suffix,
                   help=f"the mask file of dog.jpg is dog + this (default {d.mask_suffix}); such files are never "
                   "training images")
    g.add_argument("--unmasked_weight", type=float, default=d.unmasked_weight,
                   help="OneTrainer's weight of the background: each latent position's weight is clamp(mask, W, 1), "
                   "0 <= W <= 1 (default 0: the background is not learned)")
    g = p.add_argument_group("the learned rows after each optimizer update (all off by default)")
    g.add_argument("--embedding_norm", choices=EMBEDDING_NORMS, default=d.embedding_norm,
                   help="preserve: rescale each learned vector to the target norm after every update, as OneTrainer's "
                   "preserve embedding norm (SDXL: each text encoder's part to its own target)")
    g.add_argument("--embedding_norm_target", type=float, nargs="+", metavar="NORM", default=d.embedding_norm_target,
                   help="the target norm of --embedding_norm and --embedding_norm_decay (default: the median row norm "
                   "of the text encoder's token table); SDXL: two, CLIP-L's then bigG's")
    g.add_argument("--embedding_norm_decay", type=float, metavar="R", default=d.embedding_norm_decay,
                   help="after every update, pull each learned vector's norm toward the target, direction kept: "
                   "norm <- norm + R * (target - norm), 0 <= R <= 1 (0: off; 1: as --embedding_norm preserve)")
    _bool_flag(g, "use_ema", "keep an exponential moving average of the learned rows, as diffusers' EMAModel, and "
               "write it as the embeddings (final, --save_steps, checkpoints, --save_as_full_pipeline) and use it for "
               "the validation images")
    g.add_argument("--ema_decay", type=float, default=d.ema_decay,
                   help="the EMA's decay (default 0.9999, diffusers' EMAModel's): update k moves the average 1 - d of the way to the rows, "
                   "d = min((1 + s) / (10 + s), ema_decay), s = k - ema_update_after_step - 1 (0 while s <= 0: the "
                   "average is the rows); needs --use_ema")
    g.add_argument("--ema_update_after_step", type=int, default=d.ema_update_after_step,
                   help="diffusers' update_after_step U: the EMA copies the rows for the first U + 1 updates, then "
                   "averages (default 0); needs --use_ema")
    g = p.add_argument_group("speed and memory")
    g.add_argument("--mixed_precision", default=d.mixed_precision, metavar="{" + ",".join(MIXED_PRECISION) + "}",
                   help="bf16: frozen text encoder, UNet and VAE in bfloat16 (learned rows, loss and optimizer stay float32)")
    _bool_flag(g, "cache_latents", "VAE-encode each image and its flip once before training (the VAE leaves the step)")
    _bool_flag(g, "gradient_checkpointing", "recompute the UNet's block activations in the backward pass: less memory, more compute")
    g.add_argument("--attention", choices=ATTENTION, default=d.attention,
                   help="UNet attention: dense (one score matrix), chunked (query chunks: faster on CPU, less memory), "
                   "cudnn (fused, NVIDIA GPU, bf16), flash (Pallas kernel, TPU); auto: the fastest one each call can run")
    _bool_flag(g, "no_compilation_cache", "do not keep compiled programs on disk for the next run (default: in "
               "$XDG_CACHE_HOME/ti_flax/jax_cache, ~/.cache/ti_flax/jax_cache, or $JAX_COMPILATION_CACHE_DIR if set)")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default=d.output_dir)
    g.add_argument("--save_steps", type=int, default=d.save_steps,
                   help="write learned_embeds-steps-N.safetensors every N steps (0: off)")
    g.add_argument("--checkpointing_steps", type=int, default=d.checkpointing_steps,
                   help="save a resumable checkpoint-N folder every N steps (0: off)")
    g.add_argument("--checkpoints_total_limit", type=int, default=d.checkpoints_total_limit,
                   help="keep at most this many checkpoints (oldest removed first)")
    g.add_argument("--resume_from_checkpoint", default=d.resume_from_checkpoint,
                   help='a checkpoint folder, or "latest" to continue from the newest in --output_dir')
    _bool_flag(g, "no_safe_serialization", "also write learned_embeds.bin with torch.save")
    _bool_flag(g, "save_as_full_pipeline", "also save the whole model as a diffusers folder (PyTorch diffusers and ti_flax load it) holding the new tokens")
    g = p.add_argument_group("validation images")
    g.add_argument("--validation_prompt", help="prompt to render every --validation_steps (off when not set)")
    g.add_argument("--num_validation_images", type=int, default=d.num_validation_images)
    g.add_argument("--validation_steps", type=int, default=d.validation_steps)
    g.add_argument("--validation_num_inference_steps", type=int, default=d.validation_num_inference_steps)
    g.add_argument("--validation_guidance_scale", type=float, default=d.validation_guidance_scale)
    g.add_argument("--validation_seed", type=int, default=d.validation_seed, help="default: --seed")
    g = p.add_argument_group("validation loss")
    g.add_argument("--validation_loss_steps", type=int, default=d.validation_loss_steps,
                   help="every N updates and after the last, the plain diffusion loss (MSE) of fixed examples: each "
                   "validation image unflipped with its caption or first template, at timesteps 200, 400, 600, 800 "
                   "(kohya's), with noise fixed by --seed; logged as validation_loss (0: off)")
    g.add_argument("--validation_split", type=float, default=d.validation_split,
                   help="kohya's flag: hold this fraction of each concept's images (round(N x F), chosen from --seed) "
                   "out of training and compute the validation loss on them only (default 0: on every training image)")
    g = p.add_argument_group("logging")
    g.add_argument("--logging_dir", default=d.logging_dir, help="TensorBoard folder, relative to --output_dir")
    g.add_argument("--report_to", choices=REPORT_TO, default=d.report_to)
    _bool_flag(g, "push_to_hub", "upload the output folder to the Hugging Face Hub at the end")
    g.add_argument("--hub_model_id", help="Hub repository for --push_to_hub (default: the output folder's name)")
    g.add_argument("--hub_token", help="Hub token for --push_to_hub")
    _bool_flag(g, "use_auth_token", "use the token saved by `huggingface-cli login`")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    g = p.add_argument_group("multi-process (a multi-host TPU slice needs none of these)")
    g.add_argument("--coordinator_address", help="host:port of process 0, for CPU/GPU clusters")
    g.add_argument("--num_processes", type=int, help="number of processes (one per host)")
    g.add_argument("--process_id", type=int, help="this process's index, 0 .. num_processes-1")
    g.add_argument("--distributed_timeout", type=int, default=d.distributed_timeout,
                   help="seconds to wait for all processes to join (default 300)")
    return p


def parse_config(argv=None, parser=None, validate=True):
    """Parse flags into a validated TrainConfig. Raises UserError on bad values.

    `parser`: another command's parser built on `build_parser` (its own flags are left out of the
    config); `validate=False` leaves the checks to the caller (`ti_flax.plan` fills in the data flags first).
    """
    args = vars((parser or build_parser()).parse_args(argv))
    local_rank = args.pop("local_rank")
    if local_rank != -1:
        raise UserError(
            "--local_rank is a PyTorch launcher flag; JAX runs one process per host and uses every local device"
        )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in args.items() if k in known}
    if values["embedding_norm_target"] is not None:
        values["embedding_norm_target"] = tuple(values["embedding_norm_target"])
    if values["max_train_steps"] == 0:
        values["max_train_steps"] = None
    config = TrainConfig(**values)
    if config.output_dir and os.path.isfile(config.output_dir):
        raise UserError(f"--output_dir {config.output_dir}: is a file, not a folder")
    return config.validate() if validate else config
