"""FLUX.1 [dev] and [schnell]: CLIP ViT-L's pooled output and T5-XXL's hidden states condition a
rectified-flow transformer on 2x2-packed latents of a 16-channel VAE.

What differs from the Stable Diffusion families, each answered here:
- two tokenizers with their own vocabularies: a prompt is CLIP's 77 ids and T5's 512 ([dev]) or
  256 ([schnell]) side by side, and a placeholder gets the id after each tokenizer's vocabulary;
  a learned row is its CLIP-L row (768) and its T5 row (4096) side by side;
- the objective: x_t = (1 - t) x0 + t e, target e - x0 (models/flow_match.py), t drawn by kohya's
  --timestep_sampling; [dev] embeds a guidance scale (--guidance_scale, 1.0 in training);
- the latents: (sample - shift) * scale, packed 2x2 into tokens with (t, h, w) ids for RoPE;
- sampling: flow-matching Euler from pure noise, no negative prompt ([dev] is guidance-distilled);
- the files: `{"clip_l", "t5xxl", "t5"}` (ComfyUI reads clip_l and t5xxl, OneTrainer clip_l and
  t5) and diffusers' pair, which `FluxPipeline.load_textual_inversion` loads per encoder.

A model is a diffusers FluxPipeline folder, or the files ComfyUI / Forge users keep apart (the
transformer, --clip_l, --t5xxl, --ae; models/flux_files.py reads them).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from .. import files, formats, models
from ..config import TrainConfig
from ..errors import UserError
from ..models import clip, clip_vocab, component_weights, flow_match, flux, flux_files, model_folder, t5, tokenizers
from ..tokens import split_rows
from .base import ModelFamily, TextEncoder, pair_loading_code
from .sd import embedding_path

CLIP_L = TextEncoder("text_encoder", "tokenizer", formats.flux.CLIP_L, "CLIP ViT-L")
T5XXL = TextEncoder("text_encoder_2", "tokenizer_2", formats.flux.T5XXL, "T5-XXL")
CLIP_LENGTH = 77  # FluxPipeline's tokenizer max_length for CLIP
T5_LENGTHS = {"dev": 512, "schnell": 256}  # its max_sequence_length: FLUX.1 [dev]'s and [schnell]'s
# The model's own T5 tokenizer where a file holds none (as kohya's scripts fetch it).
T5_TOKENIZER = "google/t5-v1_1-xxl"
FILE_FLAGS = ("clip_l", "t5xxl", "ae", "t5xxl_tokenizer")
# The flags of the DDPM families a rectified-flow model has no use for.
DDPM_FLAGS = ("snr_gamma", "min_timestep", "max_timestep", "prediction_type", "zero_terminal_snr",
              "pretrained_vae_model_name_or_path")


class Flux(ModelFamily):
    """FLUX.1 [dev] (guidance-distilled, 512 T5 tokens) and [schnell] (4-step, 256 T5 tokens)."""

    name = "flux"
    title = "FLUX.1"
    encoders = (CLIP_L, T5XXL)
    pipeline_class = "FluxPipeline"
    flow_matching = True
    negative_prompt = False
    file_flags = FILE_FLAGS

    # Recognising and loading -------------------------------------------------------------------

    def claims(self, model_dir, class_name):
        """A Flux pipeline's folder (FluxPipeline; Fill, Kontext and the others are claimed here and
        refused by name), or a folder whose transformer/ is a FluxTransformer2DModel."""
        if class_name.startswith("Flux"):
            return True
        path = os.path.join(model_dir, "transformer", "config.json")
        return os.path.isfile(path) and str(files.read_json(path, "a JSON config file").get("_class_name", "")) \
            .startswith("Flux")

    def check_folder(self, model_dir, tokenizer_dir=None):
        if tokenizer_dir is not None:
            raise UserError("--tokenizer_name: not for FLUX.1 models, which carry a CLIP and a T5 tokenizer; drop the "
                            "flag to use the model's own")
        flux_files.check_folder(model_dir)

    def load_folder(self, model_dir, tokenizer_dir=None, prediction_type=None, zero_terminal_snr=None,
                    dtype=np.float32):
        """The LoadedModel of a checked FluxPipeline folder, its weights in `dtype` (bf16 keeps
        [dev]'s 12B transformer at 24 GB on the host)."""
        parts = flux_files.load_folder(model_dir, dtype)
        tokenizer = tokenizers.load_tokenizer(os.path.join(model_dir, "tokenizer"))
        tokenizer_2 = tokenizers.load_t5_tokenizer(os.path.join(model_dir, "tokenizer_2"))
        return self._model(parts, tokenizer, tokenizer_2, flux_files.read_scheduler_config(model_dir), model_dir)

    def claims_file(self, path):
        """Whether one file is FLUX.1's (a BFL transformer, or ComfyUI's all-in-one checkpoint)."""
        try:
            held, _ = flux_files.describe(flux_files.open_part(path, "transformer").raw)
        except UserError:
            return False
        return "transformer" in held

    def load_file(self, path, separate=None, dtype=np.float32):
        """The LoadedModel of FLUX.1 kept as files: the transformer file `path` and `separate`
        ({"clip_l", "t5xxl", "ae", "t5xxl_tokenizer"}: kohya's --clip_l, --t5xxl, --ae, and T5's
        tokenizer, a folder or Hub id; default google/t5-v1_1-xxl's). The CLIP tokenizer is the
        bundled vocabulary's."""
        separate = dict(separate or {})
        parts = flux_files.load_files(path, separate.get("clip_l"), separate.get("t5xxl"), separate.get("ae"), dtype)
        folder = model_folder.resolve_model_dir(separate.get("t5xxl_tokenizer") or T5_TOKENIZER, None,
                                                flag="--t5xxl_tokenizer")
        if os.path.isdir(os.path.join(folder, "tokenizer_2")):
            folder = os.path.join(folder, "tokenizer_2")  # a whole FLUX.1 folder: its T5 tokenizer
        tokenizer_2 = tokenizers.load_t5_tokenizer(folder)
        tokenizer = clip_vocab.build_tokenizer()
        variant = flux_files.variant(parts["transformer"][0])
        return self._model(parts, tokenizer, tokenizer_2, dict(flux_files.SCHEDULERS[variant]), path)

    def _model(self, parts, tokenizer, tokenizer_2, scheduler_config, where):
        configs = {part: config for part, (config, _) in parts.items()}
        params = {part: weights for part, (_, weights) in parts.items()}
        tokenizer_2.model_max_length = T5_LENGTHS[flux_files.variant(configs["transformer"])]
        self.check_parts(where, configs, (tokenizer, tokenizer_2))
        spec = self.spec(configs, "flow", int(scheduler_config.get("num_train_timesteps") or 1000),
                         (tokenizer, tokenizer_2))
        return models.LoadedModel(spec, params, tokenizer, None, where, dict(scheduler_config), tokenizer_2)

    def check_parts(self, where, configs, all_tokenizers):
        """UserError unless each tokenizer fits its encoder's table: CLIP's exactly, T5's within it
        (T5-XXL's table has 28 rows past its 32100-token tokenizer)."""
        tokenizer, tokenizer_2 = all_tokenizers
        if configs["text_encoder"].vocab_size != len(tokenizer):
            raise UserError(f"{where}: the CLIP tokenizer has {len(tokenizer)} tokens but the text encoder "
                            f"{configs['text_encoder'].vocab_size} rows; use the tokenizer that belongs to the model")
        if len(tokenizer_2) > configs["text_encoder_2"].vocab_size:
            raise UserError(f"{where}: the T5 tokenizer has {len(tokenizer_2)} tokens but the T5 encoder only "
                            f"{configs['text_encoder_2'].vocab_size} rows; use T5-XXL's own tokenizer")

    def spec(self, configs, prediction_type, num_train_timesteps, all_tokenizers=None):
        """`base_vocab_size_2`: T5's tokenizer's length, where its learned ids start (its table is
        longer: 32100 of T5-XXL's 32128 rows are tokens)."""
        t5_tokens = len(all_tokenizers[1]) if all_tokenizers else 32100
        return models.spec_from(configs["text_encoder"], configs["transformer"], configs["vae"], "flow",
                                num_train_timesteps, text_2=configs["text_encoder_2"], family=self.name,
                                base_vocab_size_2=t5_tokens)

    def read_spec(self, model_dir, prediction_type=None):
        flux_files.check_folder(model_dir)
        configs = {part: component_weights.read_config(os.path.join(model_dir, part), kind)
                   for part, kind in flux_files.FOLDERS.items()}
        scheduler = flux_files.read_scheduler_config(model_dir)
        return self.spec(configs, "flow", int(scheduler.get("num_train_timesteps") or 1000)), None

    def prompt_tokenizers(self, model):
        return (model.tokenizer, model.tokenizer_2)

    def prompt_length(self, spec):
        return CLIP_LENGTH + T5_LENGTHS[flux_files.variant(spec.denoiser)]

    def check_run(self, config, model):
        """UserError for the flags of DDPM models (min-SNR weights, timestep ranges, a DDPM target, a
        separate VAE: FLUX's is --ae), a Huber threshold scheduled by a DDPM's SNR, and
        --guidance_scale for [schnell], which embeds none."""
        for name in DDPM_FLAGS:
            if getattr(config, name) != getattr(TrainConfig, name):
                more = ", and --ae for its autoencoder" if "vae" in name else ""
                raise UserError(f"--{name} applies to the Stable Diffusion models; FLUX.1 is trained with rectified "
                                f"flow (see --timestep_sampling{more})")
        if config.loss_type != "l2" and config.huber_schedule == "snr":
            raise UserError("--huber_schedule snr follows a DDPM schedule's SNR, which FLUX.1 does not have; pass "
                            "--huber_schedule constant or exponential")
        if config.guidance_scale != 1.0 and not model.spec.denoiser.guidance_embeds:
            raise UserError(f"--guidance_scale {config.guidance_scale:g}: FLUX.1 [schnell] embeds no guidance; it "
                            "applies to FLUX.1 [dev]")

    # Training ----------------------------------------------------------------------------------

    def token_tables(self, params):
        return clip.token_table(params["text_encoder"]), t5.token_table(params["text_encoder_2"])

    def resolve_attention(self, name, spec, resolution=None, backend=None, dtype="float32"):
        (*_, implementation), _ = self.attention_sites(spec, models.Compute(dtype, name, backend=backend),
                                                      resolution or self.default_resolution(spec))[0]
        return implementation

    def attention_sites(self, spec, compute, resolution):
        """One kind of call: joint attention over the T5 tokens and the image's packed tokens."""
        from ..models import attention as attention_lib

        side = resolution // (spec.vae_scale_factor * 2)
        tokens = T5_LENGTHS[flux_files.variant(spec.denoiser)] + side * side
        head_dim = spec.denoiser.attention_head_dim
        implementation = attention_lib.resolve(compute.attention, backend=compute.backend or jax.default_backend(),
                                               dtype=jnp.dtype(compute.dtype), q_len=tokens, kv_len=tokens,
                                               head_dim=head_dim)
        blocks = spec.denoiser.num_layers + spec.denoiser.num_single_layers
        return [(("joint", tokens, tokens, head_dim, implementation), blocks)]

    def default_resolution(self, spec):
        return self.default_size(spec)[0]

    def condition(self, spec, compute, text_params, input_ids, rows):
        """T5's last hidden state as the context, CLIP's pooled output as `text_embeds`; each
        encoder reads its own part of the ids (CLIP's 77, then T5's) and of the rows."""
        dtype = jnp.dtype(compute.dtype)
        rows_1, rows_2 = split_rows(rows, spec.text_widths)
        params_1, params_2 = text_params
        ids_1, ids_2 = input_ids[..., :CLIP_LENGTH], input_ids[..., CLIP_LENGTH:]
        pooled = clip.encode(params_1, spec.text, ids_1, rows_1, base_vocab_size=spec.base_vocab_size, dtype=dtype).pooled
        context = t5.encode(params_2, spec.text_2, ids_2, rows_2, base_vocab_size=spec.base_vocab_size_2, dtype=dtype)
        return models.Condition(context, pooled)

    def time_draw(self, spec, loss_spec):
        """kohya's raw draw for --timestep_sampling; a recipe without flow settings (LossSpec(): the
        validation loss, whose timesteps are given and whose draws go unused) draws uniformly."""
        return functools.partial(flow_match.timestep_draw, mode=loss_spec.timestep_sampling or "uniform")

    def forward_process(self, spec, frozen, loss_spec, latents, noise, drawn, timesteps=None):
        """Rectified flow: t from the draws (kohya's --timestep_sampling), or timesteps / N for the
        given ones; x_t = (1 - t) x0 + t e, target e - x0; the timesteps are t * N (floats), as
        kohya's, which `predict` divides back."""
        n = spec.num_train_timesteps
        if timesteps is None and loss_spec.timestep_sampling is None:
            raise ValueError("a FLUX.1 loss recipe needs its flow settings: LossSpec.from_config(..., flow=True)")
        if timesteps is None:
            t, timesteps = flow_match.timesteps_from_draws(
                drawn, loss_spec.timestep_sampling, shift=loss_spec.discrete_flow_shift,
                sigmoid_scale=loss_spec.sigmoid_scale, num_train_timesteps=n,
                image_seq_len=flow_match.packed_seq_len(*latents.shape[2:]))
        else:
            timesteps = jnp.asarray(timesteps, jnp.float32)
            t = timesteps / jnp.float32(n)
        return flow_match.noisy_latents(latents, noise, t), timesteps, flow_match.velocity_target(latents, noise)

    def predict(self, spec, compute, denoiser_params, latents, timesteps, cond, time_ids=None, guidance=None):
        """The transformer's velocity, NCHW: the latents packed 2x2 with their (t, h, w) ids, the
        text tokens' ids zero, [dev]'s guidance embedded (`guidance`, a scale for every example)."""
        batch, _, height, width = latents.shape
        config = spec.denoiser
        tokens = flux.pack_latents(latents)
        embedded = None
        if config.guidance_embeds:
            embedded = jnp.full((batch,), 1.0 if guidance is None else guidance, jnp.float32)
        out = flux.apply(denoiser_params, config, tokens, cond.context, cond.text_embeds,
                         flow_match.dit_timestep(timesteps), flux.latent_image_ids(height, width),
                         flux.text_ids(cond.context.shape[1]), embedded, attention=compute.attention,
                         dtype=jnp.dtype(compute.dtype), remat=compute.remat, backend=compute.backend)
        return flux.unpack_latents(out, height, width)

    # Sampling ----------------------------------------------------------------------------------

    def sampling_defaults(self, spec):
        """FluxPipeline's: [dev] 28 steps at guidance 3.5; [schnell] 4 steps (it embeds no guidance)."""
        return (28, 3.5) if spec.denoiser.guidance_embeds else (4, 0.0)

    def default_size(self, spec):
        """FluxPipeline's: 128 latent pixels a side times the VAE's factor (1024 px for FLUX.1)."""
        side = 128 * spec.vae_scale_factor
        return side, side

    def sampling_plan(self, scheduler, scheduler_config, num_inference_steps, size):
        """(sigmas, timesteps) as FluxPipeline sets them for latents of `size` (dynamic shifting for
        [dev]: by the number of packed 2x2 tokens)."""
        if scheduler != "euler":
            raise UserError(f"--scheduler {scheduler}: FLUX.1 samples with flow-matching Euler; pass --scheduler euler "
                            "or leave it out")
        config = dict(scheduler_config)
        height, width = size
        sigmas, timesteps = flow_match.sigmas_for_inference(
            num_inference_steps, flow_match.packed_seq_len(height, width), base_shift=config.get("base_shift", 0.5),
            max_shift=config.get("max_shift", 1.15), base_seq_len=config.get("base_image_seq_len", 256),
            max_seq_len=config.get("max_image_seq_len", 4096),
            use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)), shift=config.get("shift", 1.0),
            num_train_timesteps=config.get("num_train_timesteps", 1000))
        return tuple(float(s) for s in sigmas), tuple(float(t) for t in timesteps)

    def denoise(self, frozen, rows, prompt_ids, negative_ids, noise, guidance_scale, settings, plan):
        """Flow-matching Euler from pure noise (sigma 1) over the plan's sigmas; [dev] embeds
        `guidance_scale`; no negative prompt (FluxPipeline's default, true CFG off)."""
        spec, compute = settings.spec, settings.compute
        sigmas, timesteps = plan
        cond = self.condition(spec, compute, frozen.text_params, prompt_ids, rows)
        batch = prompt_ids.shape[0]
        sigmas_table, timesteps_table = jnp.asarray(sigmas, jnp.float32), jnp.asarray(timesteps, jnp.float32)

        def step(i, latents):
            t = jnp.broadcast_to(timesteps_table[i], (batch,))
            v = self.predict(spec, compute, frozen.denoiser, latents.astype(cond.context.dtype), t, cond,
                             guidance=guidance_scale)
            return flow_match.euler_step(latents, v.astype(jnp.float32), sigmas_table[i], sigmas_table[i + 1])

        return jax.lax.fori_loop(0, len(timesteps), step, noise.astype(jnp.float32))

    def decode(self, spec, compute, vae_params, latents):
        return models.decode_latents(spec, compute, vae_params, latents)

    def default_sampler(self, spec, scheduler_config):
        return "euler"

    def zero_empty_negative(self, model):
        return False

    def sampling_condition(self, spec, cond, negative_ids, size, zero_empty_negative=False):
        return cond, None

    # Outputs -----------------------------------------------------------------------------------

    def save_embedding(self, folder, token, rows, widths, step=None, bin=False):
        """diffusers' pair ("diffusers": learned_embeds, CLIP's rows; "diffusers_2": learned_embeds_2,
        T5's) and the `{clip_l, t5xxl, t5}` file ("flux", named by formats.sdxl_file_name: ComfyUI and
        OneTrainer call an embedding by its file name)."""
        first = embedding_path(folder, step)
        parts = split_rows(rows, widths)
        written = {}
        written["diffusers"], written["diffusers_2"] = formats.save_diffusers_sdxl(first, token, *parts)
        if bin:
            written["diffusers_bin"], written["diffusers_2_bin"] = formats.save_diffusers_sdxl(
                os.path.splitext(first)[0] + ".bin", token, *parts)
        written["flux"] = formats.flux.save(os.path.join(folder, formats.sdxl_file_name(token, step)), *parts)
        return written

    def embedding_file(self, token):
        return formats.sdxl_file_name(token)

    def usage_lines(self, model, embeddings):
        where = lambda folder, name: f"{folder}/{name}" if folder else name  # noqa: E731
        files = [(where(rel, formats.sdxl_file_name(token)), os.path.splitext(formats.sdxl_file_name(token))[0])
                 for token, _, rel in embeddings]
        several = len(files) > 1
        lines = [
            f"PyTorch diffusers: two `load_textual_inversion` calls{' per concept' if several else ''}, "
            "`learned_embeds.safetensors` into CLIP-L and `learned_embeds_2.safetensors` into T5:",
            "",
            *pair_loading_code("FluxPipeline", model, embeddings),
            "",
            f"ComfyUI: copy {', '.join(f'`{path}`' for path, _ in files)} (`clip_l` and `t5xxl` rows) into "
            f"`models/embeddings/` and write {', '.join(f'`embedding:{name}`' for _, name in files)} in the prompt; "
            "both text encoders read it.",
            "",
            f"OneTrainer reads the same file{'s' if several else ''} (its `clip_l` and `t5` rows).",
            "",
        ]
        return lines

    def save_pipeline(self, model, rows, out_dir, tokenizers=None):
        raise UserError("--save_as_full_pipeline: not for FLUX.1 models yet; the embedding files load into "
                        "FluxPipeline with load_textual_inversion (see the model card)")

    # Checking the files in PyTorch diffusers ---------------------------------------------------

    def reference_kwargs(self):
        return dict(transformer=None, vae=None)

    def reference_outputs(self, pipe, prompt):
        length = pipe.tokenizer_2.model_max_length
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt, device="cpu", max_sequence_length=length)
        return {"prompt_embeds": embeds.float().numpy(), "pooled_prompt_embeds": pooled.float().numpy()}

    def our_outputs(self, cond):
        return {"prompt_embeds": cond.context, "pooled_prompt_embeds": cond.text_embeds}


FAMILY = Flux()
