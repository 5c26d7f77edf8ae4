"""SDXL: two text encoders, CLIP ViT-L (768) and OpenCLIP bigG (1280, with a projection). The UNet
attends to both encoders' penultimate hidden states side by side and adds bigG's pooled, projected
output and each image's size-and-crop ids (`text_time`). A learned row is its CLIP-L row and its
bigG row side by side (tokens.join_rows); an embedding is written as diffusers' pair of files and
as the `{clip_l, clip_g}` file A1111 / Forge, ComfyUI and kohya read.
"""

import os
import shlex

import jax.numpy as jnp

from .. import formats, models
from ..data.images import size_and_crop_ids
from ..errors import UserError
from ..formats import pipeline as pipeline_files
from ..models import clip, ldm_layout, model_folder, schedulers, tokenizers
from ..tokens import split_rows
from .base import TextEncoder, pair_loading_code
from .sd import StableDiffusion, embedding_path

CLIP_L = TextEncoder("text_encoder", "tokenizer", formats.sdxl.CLIP_L, "CLIP ViT-L")
BIG_G = TextEncoder("text_encoder_2", "tokenizer_2", formats.sdxl.CLIP_G, "OpenCLIP bigG")

LAYOUT = ldm_layout.SingleFileLayout(
    "sdxl", "SDXL", f"CLIP ViT-L ({ldm_layout.SDXL_CLIP_L}*) and OpenCLIP bigG ({ldm_layout.SDXL_BIG_G}*)",
    f"linear attention projections and added conditioning ({ldm_layout.LABEL_EMB}*)",
    (ldm_layout.EncoderLayout(ldm_layout.SDXL_CLIP_L, "CLIP ViT-L", open_clip=False, pad="sdxl"),
     ldm_layout.EncoderLayout(ldm_layout.SDXL_BIG_G, "OpenCLIP bigG", open_clip=True, hidden_act="gelu",
                              with_projection=True, pad="sdxl_2")),
    linear_projection=True, unet_head_dim=ldm_layout.HEAD_DIM, added_conditioning=True, sample_size=128,
    scaling_factor=0.13025, scheduler=tuple(ldm_layout.SDXL_SCHEDULER.items()),
)
# The CLIP tokenizer's end-of-text id, and tokenizer_2's padding ("!"): SDXL's own, for a spec
# made from config files alone.
EOS_TOKEN_ID, PAD_TOKEN_ID_2 = 49407, 0


class SDXL(StableDiffusion):
    """SDXL base and its fine-tunes (Pony, Illustrious, NoobAI; v-prediction with zero terminal SNR)."""

    pipeline_class = "StableDiffusionXLPipeline"
    time_ids = True

    def __init__(self):
        super().__init__("sdxl", "SDXL", (CLIP_L, BIG_G), LAYOUT, ())

    kohya_base_model = "sdxl_base_v1-0"

    def kohya_lora_names(self, spec, modules):
        """kohya's SDXL LoRA names its modules after the original UNet's blocks
        (input_blocks.4.1.transformer_blocks.0.attn1.to_q), as SDXL's single files do."""
        table = ldm_layout.unet_names(spec.denoiser)
        prefix = ldm_layout.UNET
        return {m: table[f"{m}.weight"][0][len(prefix):].removesuffix(".weight") for m in modules}

    def claims(self, model_dir, class_name):
        """An SDXL pipeline's folder, or (no model_index.json) a folder with a second text encoder
        and no transformer/ (FLUX.1's second encoder is T5, beside its transformer)."""
        if class_name:
            return class_name.startswith("StableDiffusionXL")
        return os.path.isdir(os.path.join(model_dir, "text_encoder_2")) and \
            not os.path.isdir(os.path.join(model_dir, "transformer"))

    def check_folder(self, model_dir, tokenizer_dir=None):
        super().check_folder(model_dir, tokenizer_dir)
        missing = [c for c in ("text_encoder_2", "tokenizer_2") if not os.path.isdir(os.path.join(model_dir, c))]
        if missing:
            raise UserError(f"{model_dir}: an SDXL model folder without {', '.join(missing)}/; "
                            "an SDXL folder has text_encoder_2/ and tokenizer_2/ beside text_encoder/ and tokenizer/")
        if tokenizer_dir is not None:
            raise UserError("--tokenizer_name: not supported for SDXL models, which carry two tokenizers; "
                            "drop the flag to use the model's own")

    def more_tokenizers(self, model_dir, tokenizer):
        return (tokenizers.load_second_tokenizer(model_dir, tokenizer),)

    def check_parts(self, model_dir, configs, all_tokenizers):
        text, text_2, unet_config = configs["text_encoder"], configs["text_encoder_2"], configs["unet"]
        if not text_2.with_projection:
            raise UserError(f"{model_dir}/text_encoder_2: SDXL's second text encoder needs its text_projection "
                            "(CLIPTextModelWithProjection)")
        if unet_config.addition_embed_type != "text_time":
            raise UserError(f"{model_dir}/unet: an SDXL UNet has addition_embed_type 'text_time', this one "
                            f"{unet_config.addition_embed_type!r}")
        tokenizer_2 = all_tokenizers[1]
        if text_2.vocab_size != len(tokenizer_2):
            raise UserError(f"{model_dir}: tokenizer_2 has {len(tokenizer_2)} tokens but text_encoder_2 has "
                            f"{text_2.vocab_size} rows; use the tokenizer that belongs to this model")
        want = unet_config.projection_class_embeddings_input_dim
        got = text_2.projection_dim + 6 * unet_config.addition_time_embed_dim
        if text.hidden_size + text_2.hidden_size not in unet_config.cross_dims or want != got:
            raise UserError(f"{model_dir}: the text encoders ({text.hidden_size} + {text_2.hidden_size} wide, "
                            f"projection {text_2.projection_dim}) do not fit the UNet's conditioning")

    def spec(self, configs, prediction_type, num_train_timesteps, all_tokenizers=None):
        """With the ids that turn the first tokenizer's ids into the second's: the first's end-of-text
        and the second's padding (from config files alone, SDXL's own: 49407 and "!", id 0)."""
        eos, pad_2 = EOS_TOKEN_ID, PAD_TOKEN_ID_2
        if all_tokenizers:
            eos, pad_2 = all_tokenizers[0].eos_token_id, all_tokenizers[1].pad_token_id
        return models.spec_from(configs["text_encoder"], configs["unet"], configs["vae"], prediction_type,
                                num_train_timesteps, text_2=configs["text_encoder_2"], eos_token_id=eos,
                                pad_token_id_2=pad_2, family=self.name)

    # ----------------------------------------------------------------------------------------
    # Training

    def default_resolution(self, spec):
        """The native size (1024 px for SDXL base), as diffusers' SDXL script."""
        return self.default_size(spec)[0]

    def condition(self, spec, compute, text_params, input_ids, rows):
        """Both encoders' penultimate hidden states side by side, and bigG's pooled projection as
        `text_embeds`; the second encoder reads the first tokenizer's ids with its own padding
        (`second_encoder_ids`), and each encoder its part of the rows (tokens.split_rows)."""
        dtype = jnp.dtype(compute.dtype)
        rows_1, rows_2 = split_rows(rows, spec.text_widths)
        params_1, params_2 = text_params
        first = clip.encode(params_1, spec.text, input_ids, rows_1, base_vocab_size=spec.base_vocab_size, dtype=dtype)
        second = clip.encode(params_2, spec.text_2, second_encoder_ids(spec, input_ids), rows_2,
                             base_vocab_size=spec.base_vocab_size, dtype=dtype)
        return models.Condition(jnp.concatenate([first.penultimate, second.penultimate], axis=-1), second.text_embeds)

    def predict(self, spec, compute, denoiser_params, latents, timesteps, cond, time_ids=None, guidance=None):
        added = {"text_embeds": cond.text_embeds, "time_ids": time_ids}
        return models.predict_noise(spec, compute, denoiser_params, latents, timesteps, cond.context, added)

    # ----------------------------------------------------------------------------------------
    # Sampling

    def default_sampler(self, spec, scheduler_config):
        """The model folder's own scheduler, which diffusers' StableDiffusionXLPipeline (and its
        textual-inversion script's validation) samples with: euler for SDXL base, and euler when the
        folder's is none of ours."""
        return schedulers.SAMPLER_OF_CLASS.get(str(dict(scheduler_config).get("_class_name")), "euler")

    def zero_empty_negative(self, model):
        """The folder's model_index.json `force_zeros_for_empty_prompt` (True when unset, as diffusers'
        default; a single file, or no model, has no index: True)."""
        model_dir = None if model is None else model.model_dir
        return bool(model_folder.model_index(model_dir).get("force_zeros_for_empty_prompt", True))

    def sampling_condition(self, spec, cond, negative_ids, size, zero_empty_negative=False):
        """An empty negative prompt (its ids are BOS, EOS: the text tokenizes to nothing) conditions
        on zero context and zero pooled embedding when `zero_empty_negative`; every image gets the
        time ids (height, width, 0, 0, height, width): diffusers' defaults original_size =
        target_size = (height, width), crop (0, 0)."""
        batch = negative_ids.shape[0]
        context, pooled = cond.context, cond.text_embeds
        if zero_empty_negative:
            keep = jnp.concatenate([negative_ids[:, 1] != spec.eos_token_id, jnp.ones((batch,), bool)])
            context = jnp.where(keep[:, None, None], context, jnp.zeros((), context.dtype))
            pooled = jnp.where(keep[:, None], pooled, jnp.zeros((), pooled.dtype))
        time_ids = jnp.broadcast_to(jnp.asarray(size_and_crop_ids(size, (0, 0), size)), (2 * batch, 6))
        return models.Condition(context, pooled), time_ids

    # ----------------------------------------------------------------------------------------
    # Outputs

    def save_embedding(self, folder, token, rows, widths, step=None, bin=False):
        """diffusers' pair ("diffusers": learned_embeds, "diffusers_2": learned_embeds_2; with `bin`
        their `.bin` twins too) and the `{clip_l, clip_g}` file ("sdxl", named by
        formats.sdxl_file_name)."""
        first = embedding_path(folder, step)
        parts = split_rows(rows, widths)
        written = {}
        written["diffusers"], written["diffusers_2"] = formats.save_diffusers_sdxl(first, token, *parts)
        if bin:
            written["diffusers_bin"], written["diffusers_2_bin"] = formats.save_diffusers_sdxl(
                os.path.splitext(first)[0] + ".bin", token, *parts)
        written["sdxl"] = formats.save_sdxl(os.path.join(folder, formats.sdxl_file_name(token, step)), *parts)
        return written

    def embedding_file(self, token):
        """The `{clip_l, clip_g}` file (diffusers' pair is two files)."""
        return formats.sdxl_file_name(token)

    def usage_lines(self, model, embeddings):
        """diffusers loads its pair with two `load_textual_inversion` calls, one per text encoder;
        A1111 / Forge, ComfyUI and kohya read the one {clip_l, clip_g} file and call the embedding
        by its file name."""
        where = lambda folder, name: f"{folder}/{name}" if folder else name  # noqa: E731
        files = [(token, where(rel, formats.sdxl_file_name(token)), os.path.splitext(formats.sdxl_file_name(token))[0])
                 for token, _, rel in embeddings]
        names = ", ".join(f"`{name}`" for _, _, name in files)
        several = len(files) > 1
        lines = [
            f"PyTorch diffusers: two `load_textual_inversion` calls{' per concept' if several else ''}, "
            "`learned_embeds.safetensors` into the first text encoder and `learned_embeds_2.safetensors` into the second:",
            "",
            *pair_loading_code("StableDiffusionXLPipeline", model, embeddings),
            "",
            f"AUTOMATIC1111 / Forge: copy {', '.join(f'`{path}`' for _, path, _ in files)} (SDXL's "
            f"`{{clip_l, clip_g}}` layout) into `embeddings/` and write the file name without extension ({names}) "
            "in the prompt.",
            "",
            f"ComfyUI: copy the same file{'s' if several else ''} into `models/embeddings/` and write "
            f"{', '.join(f'`embedding:{name}`' for _, _, name in files)} in the prompt.",
            "",
            f"kohya sd-scripts: `sdxl_gen_img.py --textual_inversion_embeddings "
            f"{' '.join(shlex.quote(path) for _, path, _ in files)}`, with {names} in the prompt.",
            "",
        ]
        return lines

    def model_index(self, model, scheduler_class):
        return dict(
            pipeline_files.model_index(scheduler_class), _class_name=self.pipeline_class, image_encoder=[None, None],
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"],
            # SDXL base zeroes the negative conditioning of an empty prompt; keep the model's choice.
            force_zeros_for_empty_prompt=self.zero_empty_negative(model),
        )

    # ----------------------------------------------------------------------------------------
    # Checking the files in PyTorch diffusers

    def reference_kwargs(self):
        return dict(unet=None, vae=None)  # encode_prompt needs neither, and SDXL's UNet is 10 GB

    def reference_outputs(self, pipe, prompt):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds.float().numpy(), "pooled_prompt_embeds": pooled.float().numpy()}

    def our_outputs(self, cond):
        return {"prompt_embeds": cond.context, "pooled_prompt_embeds": cond.text_embeds}


def second_encoder_ids(spec, input_ids):
    """The second tokenizer's ids from the first's: the padding after the first end-of-text token
    becomes the second tokenizer's padding id (the two differ only there)."""
    positions = jnp.arange(input_ids.shape[-1])
    first_eos = jnp.argmax(input_ids == spec.eos_token_id, axis=-1)[..., None]
    return jnp.where(positions > first_eos, jnp.asarray(spec.pad_token_id_2, input_ids.dtype), input_ids)


FAMILY = SDXL()
