"""A run, prepared: the model, data, tokens and optimizer checked and loaded before anything is
written, the state to start from, and the lines that describe the run on the terminal."""

import contextlib
import dataclasses
import functools
import os
import time
from typing import Optional

import jax
import numpy as np

from .. import families, formats, models, parallel, tokens as tokens_lib
from ..config import TrainConfig, checks, concepts as concepts_lib
from ..data import batches as data_lib, captions as captions_lib, images as images_lib, prompts
from ..data.buckets import BucketBatches
from ..data.concept_mix import ConceptMix
from ..errors import UserError
from ..families import Frozen
from ..models import lora
from ..sampling import sampler, validation
from . import checkpoint as ckpt, distribution as distributed, early_stopping, footprint, step as step_lib
from .losses import LossSpec, bucket_latent_masks, check_schedule
from .optim import OptimizerSpec


@dataclasses.dataclass(frozen=True)
class Learned:
    """One concept of a run: its tokens, its rows of the learned leaf, where its files go.

    Attributes:
      concept: the concepts.Concept. tokens: its placeholder tokens (tok, tok_1, ...).
      rows: slice of the run's learned rows that are this concept's.
      out_dir: the folder its embedding files go to: --output_dir for a single-concept run,
        --output_dir/<token> for each concept of a --concepts run.
    """

    concept: concepts_lib.Concept
    tokens: tuple
    rows: slice
    out_dir: str


@dataclasses.dataclass
class Run:
    """Everything a run needs, prepared and checked before anything is written."""

    config: TrainConfig
    model: models.LoadedModel
    tokens: list  # every concept's tokens, in row order
    token_ids: list
    init_rows: np.ndarray
    # data.TrainData, or a concept_data.ConceptMix for several concepts; with --enable_bucket either one
    # dealt into a bucket_data.BucketBatches
    data: data_lib.BatchSource
    opt_spec: OptimizerSpec
    total_steps: int
    devices: tuple
    meta: dict  # what checkpoints record about this run
    load_seconds: float = 0.0  # reading and converting the model's weights
    learned: tuple = ()  # one Learned per concept
    attention: str = "dense"  # what --attention resolved to for the UNet's self-attention
    # --validation_loss_steps: the images its loss is computed on (data.ValidationImages); else None
    validation_images: Optional[data_lib.ValidationImages] = None
    # Why the frozen weights are split over the devices (shard_decision), for the banner; None: replicated
    sharded: Optional[str] = None
    # --early_stopping dvar: the training images its deterministic loss uses (data.ValidationImages)
    # and its examples over them (early_stopping.examples); else None
    stopping_images: Optional[data_lib.ValidationImages] = None
    stopping_examples: Optional[tuple] = None

    @functools.cached_property
    def layout(self):
        """Where the run's trees go on its devices: parallel.Sharded when its frozen weights are
        split over them (`sharded`), else parallel.Replicated (the pmapped step's)."""
        return parallel.layout(self.devices, sharded=self.sharded is not None)

    @property
    def compute(self):
        """How this run computes with the model (models.Compute, from its flags)."""
        return model_compute(self.config)

    @property
    def loss_spec(self):
        """The run's loss recipe (losses.LossSpec, from its flags and the model's schedule; checked
        by prepare)."""
        return loss_spec(self.config, self.model.spec)

    @property
    def family(self):
        """The model's family (families.ModelFamily): what its outputs and model card hold differs."""
        return families.of(self.model.spec)

    @property
    def num_concepts(self):
        return max(1, len(self.learned))

    @property
    def concept_names(self):
        """Each concept's name (its first token) in a run of several concepts, which logs a loss
        for each; () in a run of one."""
        return tuple(c.tokens[0] for c in self.learned) if self.num_concepts > 1 else ()


def prepare(config, devices=None):
    """Load the model and data and check the run can go ahead. Raises UserError; writes nothing.

    `devices` are the local devices to train on (default: all of them).
    """
    concepts = config.validate().concept_list()
    config, model, attention, load_seconds = load_checked_model(config)
    tables = families.of(model.spec).token_tables(model.params)
    init_rows, learned, tokens, token_ids = learned_concepts(config, concepts, model, tables)
    check_validation_prompts(config, model, learned)
    devices = tuple(devices or jax.local_devices())
    sharded = shard_decision(config, model, devices)
    num_devices = len(devices) * jax.process_count()
    global_batch = config.train_batch_size * num_devices
    data, parts, validation_images = run_data(config, model, concepts, learned, global_batch)
    # Steps count optimizer updates; each consumes --gradient_accumulation_steps batches.
    epochs_batches = data.epochs_steps(config.num_train_epochs)
    total_steps = config.max_train_steps or max(1, epochs_batches // config.gradient_accumulation_steps)
    for ok, message in checks.stopping_fits(config, total_steps):  # a run of --num_train_epochs: known now
        if not ok:
            raise UserError(message)
    stopping_images, stopping_examples = stopping_data(config, parts)
    targets = norm_targets(config, model.spec, tables) if config.norm_rate else ()
    opt_spec = OptimizerSpec.from_config(config, num_devices, total_steps, targets, model.spec.text_widths,
                                         tuple(e.key for e in families.of(model.spec).encoders),
                                         lora_shapes(config, model.spec))
    config = check_loss_recipe(config, model)
    if config.push_to_hub:
        check_hub_token(config)
    meta = checkpoint_meta(config, model, tables, concepts, parts, data, tokens, token_ids, global_batch)
    return Run(config, model, tokens, token_ids, init_rows, data, opt_spec, total_steps, devices, meta, load_seconds,
               tuple(learned), attention, validation_images, sharded=sharded,
               stopping_images=stopping_images, stopping_examples=stopping_examples)


def shard_decision(config, model, devices):
    """Whether the run splits its frozen weights over its devices (FSDP, parallel.Sharded), and
    why: "--shard_weights"; or, for a family whose weights may be split (ModelFamily.shards_weights),
    on its own where the weights in the compute dtype are more than a device's memory
    (footprint.memory_limit: never on CPU, which reports none), e.g. "23.8 GiB of frozen weights,
    15.7 GiB per device". None: replicated on every device, the step pmapped. (A family that
    cannot shard has refused --shard_weights in its check_run.)"""
    if config.shard_weights:
        return "--shard_weights"
    if not families.of(model.spec).shards_weights:
        return None
    limit = footprint.memory_limit(devices[0])
    need = footprint.tree_bytes(Frozen.from_model(model, config.compute_dtype, abstract=True))
    if limit is None or need <= limit:
        return None
    return f"{need / footprint.GIB:.1f} GiB of frozen weights, {limit / footprint.GIB:.1f} GiB per device"


def load_checked_model(config):
    """(config with its --resolution settled, models.LoadedModel, what --attention resolved to,
    seconds loading): the model loaded, and the flags that depend on it checked."""
    start = time.perf_counter()
    model = families.load_model(config.pretrained_model_name_or_path, config.revision, config.tokenizer_name,
                                config.prediction_type, config.allow_pickle, config.zero_terminal_snr,
                                config.pretrained_vae_model_name_or_path,
                                separate={name: getattr(config, name) for name in families.FILE_FLAGS},
                                dtype=config.compute_dtype)
    load_seconds = time.perf_counter() - start
    families.of(model.spec).check_run(config, model)
    if config.resolution is None:
        config = dataclasses.replace(config, resolution=default_resolution(model.spec))
    check_resolution(config.resolution, model.spec)
    if config.enable_bucket:
        check_buckets(config, model.spec)
    if config.validation_prompt and config.validation_resolution:  # a size the model cannot draw: before any step
        side = config.validation_resolution
        sampler.check_size(model.spec, side, side, flag="--validation_resolution")
    # An explicit --attention that cannot run here: one line, before anything is written.
    attention = families.of(model.spec).resolve_attention(config.attention, model.spec, config.resolution,
                                                          dtype=config.compute_dtype)
    return config, model, attention, load_seconds


def learned_concepts(config, concepts, model, tables):
    """(initial rows float32 [num_vectors, row_width], one Learned per concept, every token, their
    ids): each concept's starting rows, read from the token `tables` before any placeholder is
    added to the model's tokenizer(s), then its tokens added."""
    init_rows = []
    for concept in concepts:
        with naming(config, concept):
            init_rows.append(initial_rows(config, concept, model, tables))
    learned, tokens, token_ids = [], [], []
    for concept in concepts:
        names = concept.tokens
        with naming(config, concept):
            token_ids += tokens_lib.add_to_tokenizers(model.tokenizers, names)
        out_dir = config.output_dir if config.concepts is None else os.path.join(config.output_dir, names[0])
        learned.append(Learned(concept, tuple(names), slice(len(tokens), len(tokens) + len(names)), out_dir))
        tokens += names
    return np.concatenate(init_rows), learned, tokens, token_ids


def lora_shapes(config, spec):
    """{module: weight shape} of the layers --lora_rank adapts in a model of `spec` (None without
    it); UserError for a family without a LoRA or a rank above a layer's width."""
    if config.lora_rank is None:
        return None
    shapes = families.of(spec).lora_targets(spec, config.lora_targets.split(","))
    lora.check_rank(shapes, config.lora_rank)
    return shapes


def check_validation_prompts(config, model, learned):
    """UserError for a --validation_prompt too long for a concept's tokens (with --concepts, "{}"
    in it is each concept's token: config.validate checked)."""
    if not config.validation_prompt:
        return
    for concept in learned:
        text = validation.prompt_for(config, concept)
        # Refused at start-up only with the token in it: a cut would drop its vectors unseen.
        tokenizers = families.of(model.spec).prompt_tokenizers(model)
        if prompts.mentions(tokenizers, text, concept.tokens[0]):
            prompts.encode_prompt(tokenizers, text, [concept.tokens],
                                  overflow=prompts.too_long("--validation_prompt", concept.tokens))


def run_data(config, model, concepts, learned, global_batch):
    """(the run's batch source, each concept's data.TrainData, data.ValidationImages or None):
    one concept's batches, several concepts' drawn by weight (ConceptMix), dealt into batches of
    one bucket each with --enable_bucket; the validation loss's images with --validation_loss_steps."""
    parts, validation_parts = [], []
    for index, concept in enumerate(learned):
        with naming(config, concept.concept):
            part, held = concept_data_part(config, families.of(model.spec).prompt_tokenizers(model), concept,
                                           global_batch if len(learned) == 1 else 1,
                                           families.of(model.spec).time_ids, index, model.spec.vae_scale_factor)
        parts.append(part)
        validation_parts.append(held)
    if len(parts) == 1:  # one concept: the single-concept batches, whether from flags or a file
        data = parts[0]
    else:
        data = ConceptMix(parts, [c.weight for c in concepts], [c.placeholder_token for c in concepts],
                          config.seed, global_batch)
    if config.enable_bucket:  # the same slots, dealt into batches of one bucket each
        data = BucketBatches(data, config.seed, global_batch)
    validation_images = data_lib.ValidationImages.concatenate(validation_parts) if config.validation_loss_steps else None
    return data, parts, validation_images


def stopping_data(config, parts):
    """(data.ValidationImages, examples) of --early_stopping dvar's deterministic loss: each
    concept's first training images (each concept's data.TrainData in `parts`), unflipped with
    their captions or first template, and early_stopping.examples over them; (None, None) when it
    is off."""
    if config.early_stopping != "dvar":
        return None, None
    used = [data_lib.ValidationImages.of(part.images, part.template_ids, part.captions,
                                         np.arange(early_stopping.images_used(len(part.images))), index, part.time_ids)
            for index, part in enumerate(parts)]
    return data_lib.ValidationImages.concatenate(used), early_stopping.examples([len(part.images) for part in parts])


def checkpoint_meta(config, model, tables, concepts, parts, data, tokens, token_ids, global_batch):
    """What the run's checkpoints record, for the compatibility check on resume (checkpoint.run_meta)."""
    fingerprint = ckpt.model_fingerprint(model.spec, tables[0])
    captions = [c for part in parts for c in (part.captions or [None] * len(part.images))]
    captions = captions if any(part.captions is not None for part in parts) else None
    meta = ckpt.run_meta(config, tokens, token_ids, fingerprint, global_batch, len(data.images), captions)
    if len(model.spec.text_widths) > 1:  # how a checkpoint splits the rows into each encoder's files
        meta["text_widths"] = list(model.spec.text_widths)
    if config.concepts is not None:  # what each concept must keep on resume
        meta["concepts"] = [ckpt.concept_meta(c, len(part.images)) for c, part in zip(concepts, parts)]
    return meta


def check_loss_recipe(config, model):
    """The config, its loss recipe checked against the loaded model's noise schedule (the
    timestep range; min-SNR weights that would divide by zero), with a --max_timestep equal to
    the model's number of timesteps recorded as unset: the same run as one that leaves it out,
    for resume. Raises UserError."""
    count = model.spec.num_train_timesteps
    recipe = loss_spec(config, model.spec)
    if model.alphas_cumprod is not None:  # a DDPM schedule's (a rectified-flow model has none)
        check_schedule(recipe, model.alphas_cumprod, model.spec.prediction_type)
    return dataclasses.replace(config, max_timestep=None) if config.max_timestep == count else config


def loss_spec(config, spec):
    """The losses.LossSpec of a validated TrainConfig for a model of `spec` (its schedule's length;
    the flow settings where its family trains with rectified flow): the run's and `plan`'s."""
    return LossSpec.from_config(config, spec.num_train_timesteps, flow=families.of(spec).flow_matching)


def model_compute(config, backend=None):
    """The models.Compute of a TrainConfig: its --mixed_precision, --attention and
    --gradient_checkpointing; the one mapping of the flags to how the model computes (the run, `plan`
    and the benchmark scripts use it). `backend`: the platform the program is traced for, where it
    is not this machine's (`plan`'s deviceless TPU)."""
    return models.Compute(dtype=config.compute_dtype, attention=config.attention,
                          remat=bool(config.gradient_checkpointing), backend=backend)


@contextlib.contextmanager
def naming(config, concept):
    """With --concepts, a UserError raised inside names the concept it is about."""
    try:
        yield
    except UserError as err:
        if config.concepts is None:
            raise
        raise UserError(f"concept {concept.placeholder_token}: {err}") from None


def initial_rows(config, concept, model, tables):
    """float32 [num_vectors, row_width]: a concept's starting rows, from its initializer token's
    row in each text encoder's table (`tables`), or its --initial_embeddings file. For SDXL a
    row is the CLIP-L row and the bigG row side by side (tokens.join_rows)."""
    if concept.initial_embeddings:
        start = formats.read_embedding(concept.initial_embeddings, allow_pickle=config.allow_pickle)
        return tokens_lib.join_rows(formats.check_embedding_fits(start, concept.num_vectors, model.spec.text_widths))
    init_ids = [tokens_lib.initializer_id(tokenizer, concept.initializer_token) for tokenizer in model.tokenizers]
    return tokens_lib.join_rows([tokens_lib.initial_rows(table, init_id, concept.num_vectors)
                                 for table, init_id in zip(tables, init_ids)])


def norm_targets(config, spec, tables):
    """Each text encoder's target norm for --embedding_norm / --embedding_norm_decay: the
    --embedding_norm_target given, or the median row norm of each encoder's token table
    (`tables`). SDXL's two encoders need a target each: one number for both is refused, since
    the CLIP-L and bigG tables' norms differ."""
    given = config.norm_targets
    if given is None:
        return tuple(tokens_lib.median_norm(table) for table in tables)
    if len(given) != len(tables):
        medians = " ".join(f"{tokens_lib.median_norm(table):.4g}" for table in tables)
        family = families.of(spec)
        if len(tables) > 1:
            parts = " and ".join(f"{'an' if e.title[0] in 'AEIOU' else 'a'} {e.title} part" for e in family.encoders)
            raise UserError(f"--embedding_norm_target: an {family.title} row has {parts}, whose tables' "
                            f"norms differ; give a target for each (their medians: --embedding_norm_target {medians}) "
                            "or none for those medians")
        raise UserError(f"--embedding_norm_target: this model has one text encoder; give one target (its table's "
                        f"median: {medians}) or none for that median")
    return given


def concept_data_part(config, tokenizer, learned, global_batch, time_ids=False, index=0, vae_scale_factor=8):
    """A concept's (data.TrainData, data.ValidationImages): its images decoded, every prompt tokenized
    and checked (one that does not fit is an error, never cut); with `time_ids` (the family's
    ModelFamily.time_ids), each image's time ids
    kept; with --masked_loss / --alpha_mask, each image's mask (with --enable_bucket, on its bucket's
    latent grid: the VAE downsamples by `vae_scale_factor`). With --validation_split the images it holds out (data.hold_out; `index` is the concept's
    place in the run) are the validation images and the others train; without, every image is both.
    The validation images are None without --validation_loss_steps."""
    concept = learned.concept
    mask = None
    if config.masked:
        mask = images_lib.ALPHA if config.alpha_mask else config.mask_suffix
    images, names, image_time_ids, *masks = images_lib.load_image_set(
        concept.train_data_dir, config.resolution, config.center_crop, config.interpolation, concept.caption_extension,
        mask, bucketing(config),
    )
    masks = masks[0] if masks else None
    if masks is not None and config.enable_bucket:  # a batch then carries a 64th of the pixels' masks
        masks = bucket_latent_masks(masks, vae_scale_factor)
    template_ids = prompts.encode_templates(
        tokenizer, prompts.templates_for(concept.learnable_property), tokens_lib.placeholder_text(learned.tokens)
    )
    caption_ids = None
    if concept.caption_extension:
        caption_ids = captions_lib.tokenize_captions(
            tokenizer, captions_lib.read_captions(concept.train_data_dir, names, concept.caption_extension),
            list(learned.tokens), config.caption_prefix_token,
        )
    time_ids = image_time_ids if time_ids else None
    kept = held = np.arange(len(images))
    if config.validation_split:
        kept, held = data_lib.hold_out(len(images), config.validation_split, config.seed, index)
    held_out = None
    if config.validation_loss_steps:
        held_out = data_lib.ValidationImages.of(images, template_ids, caption_ids, held, index, time_ids)
    if config.validation_split:  # only the kept images train
        images, time_ids = images[kept], None if time_ids is None else time_ids[kept]
        masks = None if masks is None else masks[kept]
        caption_ids = None if caption_ids is None else [caption_ids[i] for i in kept]
    return data_lib.TrainData(images, template_ids, concept.repeats, config.flip_p, config.seed, global_batch,
                              caption_ids, time_ids, masks), held_out


def default_resolution(spec):
    """--resolution left unset: the model family's (512 for SD 1.x / 2.x, as diffusers' scripts; the
    native size for SDXL, 1024)."""
    return families.of(spec).default_resolution(spec)


def check_resolution(resolution, spec):
    if resolution % spec.pixel_multiple:
        raise UserError(f"--resolution {resolution}: this model needs a multiple of {spec.pixel_multiple}")


def check_buckets(config, spec):
    """--enable_bucket's flags against the model and the resolved --resolution: one line each."""
    if config.bucket_reso_steps % spec.pixel_multiple:
        raise UserError(f"--bucket_reso_steps {config.bucket_reso_steps}: this model needs a multiple of "
                        f"{spec.pixel_multiple} (its VAE x UNet downsampling), so every bucket side divides evenly")
    if not config.min_bucket_reso <= config.resolution <= config.max_bucket_reso:
        raise UserError(f"--resolution {config.resolution} must be between --min_bucket_reso ({config.min_bucket_reso}) "
                        f"and --max_bucket_reso ({config.max_bucket_reso})")


def bucketing(config):
    """The images.Bucketing of --enable_bucket's flags (None when it is off)."""
    if not config.enable_bucket:
        return None
    return images_lib.Bucketing.of(config.resolution, config.min_bucket_reso, config.max_bucket_reso,
                                   config.bucket_reso_steps, config.bucket_no_upscale)


def check_hub_token(config):
    from huggingface_hub import get_token

    if not (config.hub_token or get_token()):
        raise UserError("--push_to_hub needs a token: pass --hub_token or run `huggingface-cli login` first")


def initial_state(run):
    """(host TrainState, first step, early-stopping history): fresh, or restored from
    --resume_from_checkpoint; the history is --early_stopping's criterion state from the
    checkpoint's meta.json (early_stopping.DVAR.state()), or None (fresh, or none saved).

    Process 0 reads the checkpoint (other hosts need not see its disk) and every process
    receives the same state through a broadcast. Raises UserError before anything is written.
    """
    fresh = step_lib.init_state(run.init_rows, run.opt_spec)
    state, error, history = fresh, None, None
    if jax.process_index() == 0:
        try:
            path = ckpt.resolve_resume(run.config)
            if path:
                ckpt.check_compatible(ckpt.read_meta(path), run.meta, path)
                state, meta = ckpt.load_checkpoint(path, fresh)
                history = meta.get(ckpt.EARLY_STOPPING)
                print(f"resuming from {path} (step {meta['step']})", flush=True)
        except UserError as err:
            error = err
    if jax.process_count() > 1:
        ok = distributed.broadcast_from_first(np.int32(error is None))
        if error is None and not ok:
            raise UserError("process 0 could not resume from its checkpoint; see its output")
        if error is None:
            state = distributed.broadcast_from_first(jax.tree_util.tree_map(np.asarray, state))
            history = distributed.broadcast_json(history)
    if error is not None:
        raise error
    return state, int(state.step), history
