"""The Stable Diffusion UNet families: a CLIP text encoder (SDXL: two), a UNet, the KL VAE, a
DDPM noise schedule with an epsilon or v target. SD 1.x and SD 2.x are `StableDiffusion`
entries (sd1.py, sd2.py); SDXL (sdxl.py) adds a second encoder, pooled text and size ids.

Each method here is a question the rest of ti_flax asks a family; `ModelFamily` (base.py)
lists them, and a new family answers each one.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp

from .. import formats, models
from ..config import TrainConfig
from ..errors import UserError
from ..formats import pipeline as pipeline_files
from ..models import clip, component_weights, lora, model_folder, pretrained, schedulers, tokenizers, unet, vae
from .base import ModelFamily, TextEncoder

CLIP_L = TextEncoder("text_encoder", "tokenizer", "", "CLIP ViT-L")  # a one-encoder family's CLIP ViT-L
DIFFUSERS_FILE = "learned_embeds.safetensors"
# --resolution left unset: the diffusers scripts' 512 for SD 1.x / 2.x (an SD 2.x 768-v model too).
DEFAULT_RESOLUTION = 512
# The rectified-flow flags (FLUX.1's): a DDPM model has no use for them.
FLOW_FLAGS = ("timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "guidance_scale")


class StableDiffusion(ModelFamily):
    """A UNet family with one CLIP text encoder, whose last hidden state the UNet attends to."""

    pipeline_class = "StableDiffusionPipeline"
    default_sampler_name = "pndm"  # diffusers' StableDiffusionPipeline's PNDMScheduler
    shards_weights = False  # replicated on every device, the pmapped step's layout (check_run refuses --shard_weights)

    def __init__(self, name, title, encoders, layout, text_activations):
        self.name, self.title, self.encoders, self.layout = name, title, tuple(encoders), layout
        self.text_activations = tuple(text_activations)  # what its text encoder's config.json says

    # ----------------------------------------------------------------------------------------
    # Recognising and loading a model folder

    def claims(self, model_dir, class_name):
        """Whether a diffusers folder (its model_index.json `_class_name`) is this family's: SD 1.x and 2.x
        folders are one pipeline class, told apart by their text encoder's activation."""
        if class_name.startswith("StableDiffusionXL") or os.path.isdir(os.path.join(model_dir, "text_encoder_2")):
            return False
        folder = os.path.join(model_dir, "text_encoder")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            return False  # not a model folder at all: families.detect_folder says what is missing
        return component_weights.read_config(folder, "text_encoder").hidden_act in self.text_activations

    @property
    def folders(self):
        """The folders a diffusers model of this family has."""
        return (*model_folder.COMPONENTS, *(e.part for e in self.encoders[1:]), *(e.tokenizer for e in self.encoders[1:]))

    def check_folder(self, model_dir, tokenizer_dir=None):
        """UserError naming the folders a model of this family lacks (before any weight is read)."""
        missing = [c for c in model_folder.COMPONENTS if not os.path.isdir(os.path.join(model_dir, c))]
        if tokenizer_dir is None and not os.path.isdir(os.path.join(model_dir, "tokenizer")):
            missing.append("tokenizer")
        if missing:
            raise UserError(
                f"{model_dir}: not a Stable Diffusion model folder (missing {', '.join(missing)}/); "
                "expected unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
            )

    def load_folder(self, model_dir, tokenizer_dir=None, prediction_type=None, zero_terminal_snr=None,
                    dtype="float32"):
        """The models.LoadedModel of a checked diffusers folder of this family, in float32 whatever
        `dtype` (the learned rows start from the float32 token tables; the engine casts the frozen
        weights once, on their way to the devices).

        `tokenizer_dir`: --tokenizer_name's folder, in place of the model's tokenizer/.
        `prediction_type`, `zero_terminal_snr`: as `models.pretrained.read_scheduler` takes them.
        """
        tokenizer = tokenizers.load_tokenizer(tokenizer_dir or os.path.join(model_dir, "tokenizer"))
        scheduler_config, alphas_cumprod, prediction_type = pretrained.read_scheduler(model_dir, prediction_type,
                                                                                      zero_terminal_snr)
        text_config = component_weights.read_config(os.path.join(model_dir, "text_encoder"), "text_encoder")
        if text_config.vocab_size != len(tokenizer):
            raise UserError(
                f"{model_dir}: tokenizer has {len(tokenizer)} tokens but the text encoder has "
                f"{text_config.vocab_size} rows; use the tokenizer that belongs to this model"
            )
        params, found = {}, {}
        for kind in ("text_encoder", "unet", "vae", *(e.part for e in self.encoders[1:])):
            loaded_as = "text_encoder" if kind.startswith("text_encoder") else kind
            found[kind], params[kind] = component_weights.load_component(os.path.join(model_dir, kind), loaded_as)
        all_tokenizers = (tokenizer, *self.more_tokenizers(model_dir, tokenizer))
        self.check_parts(model_dir, found, all_tokenizers)
        spec = self.spec(found, prediction_type, int(scheduler_config.get("num_train_timesteps") or 1000),
                         all_tokenizers)
        return models.LoadedModel(spec, params, tokenizer, alphas_cumprod, model_dir, dict(scheduler_config),
                                  *all_tokenizers[1:])

    def prompt_tokenizers(self, model):
        """The first tokenizer: SDXL's second encoder reads its ids too (second_encoder_ids)."""
        return model.tokenizer

    def prompt_length(self, spec):
        return spec.text.max_position_embeddings

    def check_run(self, config, model):
        """UserError for a rectified-flow flag (FLUX.1's) set away from its default, and for
        --shard_weights (the weights fit one device: the SD families train pmapped, replicated)."""
        changed = [name for name in FLOW_FLAGS if getattr(config, name) != getattr(TrainConfig, name)]
        if changed:
            raise UserError(f"--{changed[0]} applies to rectified-flow models (FLUX.1); this model is "
                            f"{self.title}, trained with a DDPM schedule")
        if config.shard_weights:
            raise UserError("--shard_weights: for FLUX.1 models; Stable Diffusion's weights fit one device replicated")

    def more_tokenizers(self, model_dir, tokenizer):
        """The tokenizers of the encoders after the first, read from `model_dir` ((), with one encoder)."""
        return ()

    def check_parts(self, model_dir, configs, all_tokenizers):
        """UserError unless the loaded parts' configs fit together as this family's do."""

    def spec(self, configs, prediction_type, num_train_timesteps, all_tokenizers=None):
        """The models.ModelSpec of this family's parts: {"text_encoder", "unet", "vae"} owned configs."""
        return models.spec_from(configs["text_encoder"], configs["unet"], configs["vae"], prediction_type,
                                num_train_timesteps, family=self.name)

    def spec_from_configs(self, text_config, unet_config, vae_config, prediction_type="epsilon",
                          num_train_timesteps=1000, text_config_2=None):
        """A ModelSpec from config dicts (a model's config.json contents), with no weights anywhere:
        for measuring a model's step (shapes, FLOPs, memory) without downloading it.
        `text_config_2`: the second text encoder's, for a family of two."""
        configs = {"text_encoder": clip.CLIPTextConfig.from_dict(dict(text_config)),
                   "unet": unet.UNetConfig.from_dict(dict(unet_config)),
                   "vae": vae.VAEConfig.from_dict(dict(vae_config))}
        if text_config_2 is not None:
            configs["text_encoder_2"] = clip.CLIPTextConfig.from_dict(dict(text_config_2))
        return self.spec(configs, prediction_type, num_train_timesteps)

    def read_spec(self, model_dir, prediction_type=None):
        """(ModelSpec, alphas_cumprod) from a folder's config files alone: no weights are read."""
        _, alphas_cumprod, prediction_type = pretrained.read_scheduler(model_dir, prediction_type)
        configs = {kind: component_weights.read_config(os.path.join(model_dir, kind), "text_encoder"
                                                       if kind.startswith("text_encoder") else kind)
                   for kind in ("text_encoder", "unet", "vae", *(e.part for e in self.encoders[1:]))}
        return self.spec(configs, prediction_type, len(alphas_cumprod)), alphas_cumprod

    # ----------------------------------------------------------------------------------------
    # Training

    def token_tables(self, params):
        return models.token_tables(params)

    def resolve_attention(self, name, spec, resolution=None, backend=None, dtype="float32"):
        return models.resolve_attention(name, spec, resolution, backend, dtype)

    def attention_sites(self, spec, compute, resolution):
        return models.attention_sites(spec, compute, resolution)

    def lora_targets(self, spec, targets):
        """The UNet's Linear (and SD 1.x's 1x1 proj_in/proj_out Conv2d) layers of `targets`, by
        their diffusers names, as diffusers' and PEFT's LoRA adapt them."""
        return lora.target_shapes(unet.param_shapes(spec.denoiser), lora.modules(targets))

    def kohya_lora_names(self, spec, modules):
        """{module: kohya's name} of the LoRA's modules: for SD 1.x and 2.x kohya names them as
        diffusers does (its key is "lora_unet_" + the name with "_" for ".")."""
        return {module: module for module in modules}

    @property
    def kohya_base_model(self):
        """kohya's `ss_base_model_version` of this family."""
        return {"sd1": "sd_v1", "sd2": "sd_v2"}.get(self.name, self.name)

    def default_resolution(self, spec):
        """--resolution left unset."""
        return DEFAULT_RESOLUTION

    def condition(self, spec, compute, text_params, input_ids, rows):
        """The UNet's text conditioning (models.Condition) of the first tokenizer's ids [B, L].

        Args:
          text_params: every text encoder's params (Frozen.text_params).
          rows: learned rows [N, spec.row_width]; id `base_vocab_size + i` reads rows[i].
        """
        (params,) = text_params
        return models.Condition(models.encode_text(spec, compute, params, input_ids, rows))

    def time_draw(self, spec, loss_spec):
        """One example's timestep from its key: uniform over --min_timestep / --max_timestep's range."""
        low, high = loss_spec.timestep_range(spec.num_train_timesteps)
        return lambda key: jax.random.randint(key, (), low, high)

    def forward_process(self, spec, frozen, loss_spec, latents, noise, drawn, timesteps=None):
        """DDPM's: (noisy latents, timesteps, target): the latents noised to their timesteps (the
        drawn ones, or `timesteps`) on the model's schedule (Frozen.alphas_cumprod), and the noise
        (epsilon) or the velocity (v_prediction) as the target."""
        timesteps = drawn if timesteps is None else timesteps
        alphas = frozen.alphas_cumprod
        noisy = schedulers.noisy_latents(alphas, latents, noise, timesteps)
        target = noise if spec.prediction_type == "epsilon" else schedulers.velocity(alphas, latents, noise, timesteps)
        return noisy, timesteps, target

    def predict(self, spec, compute, denoiser_params, latents, timesteps, cond, time_ids=None, guidance=None):
        """The UNet's prediction (epsilon or v), NCHW, for NCHW latents conditioned on `cond`.

        `time_ids` float32 [B, 6]: each example's size-and-crop ids where `time_ids` is True."""
        return models.predict_noise(spec, compute, denoiser_params, latents, timesteps, cond.context)

    # ----------------------------------------------------------------------------------------
    # Sampling

    def sampling_defaults(self, spec):
        """25 steps (ti_flax's default since its first release) at guidance 7.5 (diffusers' pipelines')."""
        return 25, 7.5

    def default_sampler(self, spec, scheduler_config):
        """The sampler used when none is chosen: pndm, as diffusers' pipeline. With zero terminal SNR
        (diffusers' PNDMScheduler has no rescaled schedule): "ddim", as diffusers recommends for a
        v-prediction model, and "euler" for an epsilon one (DDIM cannot start from pure noise with it)."""
        if schedulers.zero_terminal_snr(scheduler_config):
            return "ddim" if spec.prediction_type == "v_prediction" else "euler"
        return self.default_sampler_name

    def default_size(self, spec):
        """(height, width) the model was trained at: the UNet's sample_size x the VAE's factor."""
        return models.default_size(spec)

    def sampling_plan(self, scheduler, scheduler_config, num_inference_steps, size):
        """The sampler's static plan (models.schedulers.plan; the same at every size); UserError
        for a sampler that cannot run on this schedule."""
        return _plan(scheduler, json.dumps(dict(scheduler_config), sort_keys=True, default=str), num_inference_steps)

    def denoise(self, frozen, rows, prompt_ids, negative_ids, noise, guidance_scale, settings, plan):
        """The scheduler's loop from starting noise to final latents, with classifier-free guidance:
        negative and positive prompts go through the UNet in one batch, [uncond, cond]; the noise is
        scaled by the scheduler's init_noise_sigma, as diffusers' pipelines scale given latents."""
        spec, compute = settings.spec, settings.compute
        batch = prompt_ids.shape[0]
        cond = self.condition(spec, compute, frozen.text_params, jnp.concatenate([negative_ids, prompt_ids]), rows)
        cond, time_ids = self.sampling_condition(spec, cond, negative_ids, (settings.height, settings.width),
                                                 settings.zero_empty_negative)
        latents = noise * schedulers.init_noise_sigma(plan)
        # The plan's few small tables are constants of the program.
        timesteps_table = jnp.asarray(plan.timesteps, jnp.float32)

        def step(i, carry):
            latents, state = carry
            x = schedulers.scale_model_input(plan, jnp.concatenate([latents, latents]), i)
            timesteps = jnp.broadcast_to(timesteps_table[i], (2 * batch,))
            pred = self.predict(spec, compute, frozen.denoiser, x.astype(cond.context.dtype), timesteps, cond, time_ids)
            uncond, conditioned = jnp.split(pred.astype(jnp.float32), 2)
            guided = uncond + guidance_scale * (conditioned - uncond)
            return schedulers.step(plan, state, guided, i, latents)

        # PNDM calls the model num_inference_steps + 1 times (its warm-up), as diffusers' PyTorch pipeline.
        latents, _ = jax.lax.fori_loop(0, plan.num_steps, step, (latents, schedulers.init_state(plan, latents)))
        return latents

    def decode(self, spec, compute, vae_params, latents):
        """Pixels in about [-1, 1], NCHW, from the sampler's NCHW latents (scaled as the UNet sees them)."""
        return models.decode_latents(spec, compute, vae_params, latents)

    def zero_empty_negative(self, model):
        """Whether an empty negative prompt of `model` (a models.LoadedModel, or None for the family's
        default) conditions on zeros (False: on the encoded empty text, as SD 1.x / 2.x pipelines)."""
        return False

    def sampling_condition(self, spec, cond, negative_ids, size, zero_empty_negative=False):
        """(cond, time_ids) for the sampler's [negative, positive] batch of `cond` at `size` (h, w)."""
        return cond, None

    # ----------------------------------------------------------------------------------------
    # Outputs

    def save_embedding(self, folder, token, rows, widths, step=None, bin=False):
        """Write a run's embedding of `token` into `folder`, in the layouts other tools load.

        Args:
          rows: float32 [N, sum(widths)]. widths: ModelSpec.text_widths.
          step: for an intermediate file, its step (`learned_embeds-steps-S.safetensors`).
          bin: also the PyTorch `.bin` twin of each diffusers file (--no_safe_serialization).
        Returns:
          {kind: path}: "diffusers" (and "diffusers_bin").
        """
        first = embedding_path(folder, step)
        written = {"diffusers": formats.save_diffusers(first, token, rows)}
        if bin:
            written["diffusers_bin"] = formats.save_diffusers_bin(os.path.splitext(first)[0] + ".bin", token, rows)
        return written

    def embedding_file(self, token):
        """The file the model card names for a concept's embedding."""
        return DIFFUSERS_FILE

    def usage_lines(self, model, embeddings):
        """The model card's lines on loading the run's embeddings in each tool.

        Args:
          model: --pretrained_model_name_or_path.
          embeddings: (token, folder as the run names it, folder relative to the card or "" for
            the card's own) per concept.
        """
        if len(embeddings) == 1 and not embeddings[0][2]:
            (token, out, _), = embeddings
            return _sd_single_use(model, token, out)
        return _sd_concepts_use(model, embeddings)

    def model_index(self, model, scheduler_class):
        """A saved pipeline's model_index.json."""
        return dict(pipeline_files.model_index(scheduler_class), _class_name=self.pipeline_class,
                    requires_safety_checker=False, safety_checker=[None, None])

    def save_pipeline(self, model, rows, out_dir, tokenizers=None):
        """Write `model` with `rows` appended to each encoder's token table into `out_dir` (which
        must exist) as this family's diffusers folder.

        `tokenizers`: each encoder's tokenizer holding the new tokens (default: the model's own,
        which run.prepare gave them). Returns out_dir.
        """
        tokenizers = tokenizers or model.tokenizers
        parts = [(e.part, e.tokenizer, tok) for e, tok in zip(self.encoders, tokenizers)]
        scheduler = pipeline_files.scheduler_config(model.scheduler_config)
        return pipeline_files.save_pipeline(model, parts, rows, out_dir, scheduler,
                                            self.model_index(model, scheduler["_class_name"]))

    # ----------------------------------------------------------------------------------------
    # Checking the files in PyTorch diffusers (ti_flax.export --verify)

    def reference_kwargs(self):
        """What `from_pretrained` of `pipeline_class` needs to load the text encoders alone."""
        return dict(unet=None, vae=None, safety_checker=None, requires_safety_checker=False)

    def reference_outputs(self, pipe, prompt):
        """{name: float32 array} of the PyTorch pipeline's prompt encoding, to compare with `our_outputs`."""
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        return {"prompt_embeds": embeds.float().numpy()}

    def our_outputs(self, cond):
        """{name: array} of a models.Condition, named as `reference_outputs` names them."""
        return {"prompt_embeds": cond.context}


@functools.lru_cache(maxsize=None)
def _plan(name, scheduler_config_json, num_inference_steps):
    return schedulers.plan(name, json.loads(scheduler_config_json), num_inference_steps)


def embedding_path(folder, step=None):
    """A run's diffusers embedding file in `folder`: learned_embeds.safetensors, or at an
    intermediate `step` learned_embeds-steps-S.safetensors."""
    suffix = "" if step is None else f"-steps-{step}"
    return os.path.join(folder, f"learned_embeds{suffix}.safetensors")


def _sd_single_use(model, token, out):
    name = token.strip("<>") or "embedding"
    return [
        "PyTorch diffusers:",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        f'pipe = StableDiffusionPipeline.from_pretrained("{model}")',
        f'pipe.load_textual_inversion("{DIFFUSERS_FILE}")',
        f'image = pipe("a photo of {token}").images[0]',
        "```",
        "",
        "AUTOMATIC1111 / Forge: convert once, copy into `embeddings/`, and write its name in the prompt:",
        "",
        "```bash",
        f"python -m ti_flax.export {out} --format a1111 --output {name}.pt",
        "```",
        "",
        f"ComfyUI: `python -m ti_flax.export {out} --format comfyui --output {name}.safetensors`, copy it into "
        f"`models/embeddings/`, and write `embedding:{name}` in the prompt.",
        "",
        "JAX/Flax:",
        "",
        "```bash",
        f'python -m ti_flax.generate --pretrained_model_name_or_path {model} \\',
        f'  --embeddings {os.path.join(out, DIFFUSERS_FILE)} --prompt "a photo of {token}"',
        "```",
        "",
    ]


def _sd_concepts_use(model, embeddings):
    first = embeddings[0][0]
    return [
        "PyTorch diffusers (each concept's folder holds its own embedding):",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        f'pipe = StableDiffusionPipeline.from_pretrained("{model}")',
        *[f'pipe.load_textual_inversion("{rel}/{DIFFUSERS_FILE}")' for _, _, rel in embeddings],
        f'image = pipe("a photo of {first}").images[0]',
        "```",
        "",
        "AUTOMATIC1111 / Forge and ComfyUI: convert each concept's folder once, for example",
        "",
        "```bash",
        *[f"python -m ti_flax.export {out} --format a1111 --output {token.strip('<>') or 'embedding'}.pt"
          for token, out, _ in embeddings],
        "```",
        "",
        "JAX/Flax:",
        "",
        "```bash",
        f"python -m ti_flax.generate --pretrained_model_name_or_path {model} \\",
        "  --embeddings " + " ".join(os.path.join(out, DIFFUSERS_FILE) for _, out, _ in embeddings)
        + f' --prompt "a photo of {first}"',
        "```",
        "",
    ]
