"""Build a tiny, random-init Stable Diffusion (or FLUX.1) model folder offline.

The folder has the layout of a real Hub checkpoint (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/, PyTorch safetensors weights), so ti_flax loads it
through the same code path as runwayml/stable-diffusion-v1-5. The tokenizer is the real
49408-token CLIP tokenizer, rebuilt from OpenAI CLIP's BPE merges file that ti_flax bundles
(ti_flax/clip_vocab.py, MIT licensed), so placeholder tokens, initializer tokens and token ids
behave exactly as on a real model.

`--layout flux-dev` / `flux-schnell` write a FluxPipeline folder instead (transformer/,
text_encoder/ CLIP, text_encoder_2/ T5 encoder, tokenizer/ CLIP, tokenizer_2/ a tiny T5
SentencePiece tokenizer trained here, vae/, scheduler/): see FLUX below.

Needs torch and diffusers (building uses diffusers' PyTorch classes) and ti_flax (installed, or
this checkout's); the FLUX layouts also need sentencepiece (training the T5 tokenizer).

Usage:
    python scripts/make_tiny_model.py OUTPUT_DIR [--layout tiny|sd1-small|flux-dev|flux-schnell|...]
        [--prediction_type epsilon|v_prediction] [--seed 0]
"""

import argparse
import os
import sys

# This checkout's ti_flax (the vocabulary the script was written against), installed or not.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(ROOT, "ti_flax", "clip_vocab.py")) and ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ti_flax.models.clip_vocab import NUM_MERGES, write_tokenizer_files  # noqa: E402

# The tiny UNet: SD 1.x's blocks (a cross-attention level, a plain level, their up blocks with
# skip connections, down- and upsamplers, the mid block) at 32 / 64 channels.
TINY_UNET = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=8,
    sample_size=16,
)

# Block layouts. "tiny" is the 2-block model the tests and the demo use, with one resnet (and one
# transformer) per down block: the suite compiles its train step dozens of times, and two layers
# per block made that compile ~1.5x as long (18.5 s of CPU against 11.8 s with the tests' XLA
# flags) and its steps 2x as long, without exercising anything new (the golden layouts and the
# port parity tests keep two). "sd1-small" has SD 1.x's 4 down / 4 up blocks with cross-attention
# at small widths (for benchmarks).
LAYOUTS = {
    "tiny": dict(
        unet=dict(TINY_UNET, layers_per_block=1),
        vae=dict(block_out_channels=(32, 64)),
        hidden=32,
        layers=2,
        resolution=32,
    ),
    "sd1-small": dict(
        unet=dict(
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            attention_head_dim=8,
            sample_size=32,
        ),
        vae=dict(block_out_channels=(32, 32, 64, 64)),
        hidden=64,
        layers=4,
        resolution=256,
    ),
}

# The golden layouts (tests/golden.py): the tiny SD 1.x block structure at 64 px, so the first
# UNet level has 32 x 32 = 1024 tokens and --attention chunked really splits them, and its SD 2.x
# variant (linear attention projections, a head count per block, OpenCLIP's gelu). Their weights
# are drawn with numpy from each weight's name (reinit_weights), not by the libraries'
# initialisers, so the golden values survive a torch or diffusers upgrade.
LAYOUTS["golden-sd1"] = dict(
    LAYOUTS["tiny"], unet=dict(TINY_UNET, sample_size=32), resolution=64, numpy_weights=True
)
LAYOUTS["golden-sd2"] = dict(
    LAYOUTS["golden-sd1"],
    unet=dict(LAYOUTS["golden-sd1"]["unet"], attention_head_dim=(2, 4), use_linear_projection=True),
    hidden_act="gelu",
)

# Tiny models with every value an original single file cannot record set as the family's diffusers
# configs set it (tests/test_single_file.py): 64-wide text-encoder heads, SD 1.x's 8 UNet heads,
# SD 2.x's 64-wide UNet heads, OpenCLIP's gelu and "!" padding, eos_token_id 2, the projection_dim,
# 512 px sample sizes; so one loaded from a single file is its diffusers folder, configs included.
LAYOUTS["single-sd1"] = dict(
    LAYOUTS["tiny"],
    unet=dict(LAYOUTS["tiny"]["unet"], sample_size=64),
    vae=dict(LAYOUTS["tiny"]["vae"], sample_size=128),  # pixels: 64 latents x 2 (two VAE levels)
    hidden=64,
    text=dict(num_attention_heads=1, eos_token_id=2, projection_dim=768),
)
LAYOUTS["single-sd2"] = dict(
    LAYOUTS["single-sd1"],
    unet=dict(LAYOUTS["single-sd1"]["unet"], block_out_channels=(64, 128), attention_head_dim=(1, 2),
              use_linear_projection=True),
    hidden_act="gelu",
    text=dict(LAYOUTS["single-sd1"]["text"], projection_dim=512),
    pad_token="!",
)

# The smallest model with every kind of weight an SD 1.x pipeline has (cross-attention and plain
# blocks, 1x1-conv projections, resnets with and without conv_shortcut, down- and upsamplers,
# a VAE mid-block attention), for the committed Flax fixture (scripts/make_flax_fixture.py):
# 4 / 8 channels with 4 norm groups, and a 514-token CLIP tokenizer (bytes and specials, no merges).
LAYOUTS["flax-fixture"] = dict(
    unet=dict(TINY_UNET, block_out_channels=(4, 8), attention_head_dim=2, norm_num_groups=4, sample_size=8),
    vae=dict(block_out_channels=(4, 8), norm_num_groups=4),
    hidden=8,
    layers=2,
    resolution=16,
    num_merges=0,
    numpy_weights=True,
)

# The planted-concept model (scripts/bench_learning.py): the tiny SD 1.x blocks with SD 1.x's
# 64-wide text-encoder heads (one head of 64) at 16 px (8 x 8 latents), its weights drawn with numpy
# from their names as the golden layouts' are, whose UNet is then trained to denoise captioned
# shapes, with concepts reachable only through rows that no token has, until each is learned
# (scripts/planted_denoiser.py). "denoiser" holds train_denoiser's settings.
LAYOUTS["planted"] = dict(
    LAYOUTS["tiny"],
    unet=dict(LAYOUTS["tiny"]["unet"], sample_size=8),
    hidden=64,
    text=dict(num_attention_heads=1),
    resolution=16,
    numpy_weights=True,
    denoiser=dict(batch=32, learning_rate=2e-3),
)

# SDXL's layout at tiny widths: CLIP-L-like and OpenCLIP-bigG-like text encoders (the second with
# a text projection, OpenCLIP's gelu and "!" padding), their penultimate states concatenated as
# the UNet's 32 + 48 = 80-wide context, a text_time UNet whose added embedding takes the pooled
# projection (16) and six 8-wide time-id embeddings, and the VAE's SDXL scaling factor.
# `python scripts/make_tiny_model.py DIR --layout tiny-sdxl` writes a StableDiffusionXLPipeline folder.
SDXL_UNET = dict(  # what SDXL's UNet adds to an SD 2.x-style one: plain blocks first, text_time
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
)
LAYOUTS["tiny-sdxl"] = dict(
    LAYOUTS["tiny"],
    unet=dict(LAYOUTS["tiny"]["unet"], **SDXL_UNET, projection_class_embeddings_input_dim=16 + 6 * 8),
    vae=dict(LAYOUTS["tiny"]["vae"], scaling_factor=0.13025, force_upcast=True),
    text=dict(eos_token_id=2),  # what SDXL base's configs ship: the pooled state is at the highest id
    text_2=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, projection_dim=16, hidden_act="gelu"),
    sdxl=True,
)

# The tiny SDXL model with what an original SDXL single file cannot record set as SDXL base's
# diffusers configs set it (tests/test_sdxl_single_file.py): 64-wide heads in both text encoders
# and in the UNet, CLIP-L's projection_dim 768, eos_token_id 2, 1024 px sample sizes (128 latents).
LAYOUTS["single-sdxl"] = dict(
    LAYOUTS["tiny-sdxl"],
    unet=dict(LAYOUTS["tiny-sdxl"]["unet"], block_out_channels=(64, 128), attention_head_dim=(1, 2), sample_size=128,
              projection_class_embeddings_input_dim=32 + 6 * 8),
    vae=dict(LAYOUTS["tiny-sdxl"]["vae"], sample_size=256),  # pixels: 128 latents x 2 (two VAE levels)
    hidden=64,
    text=dict(num_attention_heads=1, eos_token_id=2, projection_dim=768),
    text_2=dict(hidden_size=128, intermediate_size=160, num_attention_heads=2, projection_dim=32, hidden_act="gelu"),
)


# FLUX.1 at tiny widths, keeping what makes it FLUX.1 and what a single file cannot record as the
# published configs state it, so the same model loads alike from its folder and from the files
# ComfyUI users keep (tests/flux_files.py writes them, tests/test_flux_loading.py compares):
#   transformer  2 double- and 2 single-stream blocks, 2 heads of FLUX's 128 (the RoPE axes
#                (16, 56, 56) add up to the head width; a BFL file states neither), 64 input
#                channels (16 latent channels packed 2x2), T5's and CLIP's widths as its inputs;
#                [dev] has the guidance embedder, [schnell] not
#   text_encoder CLIP ViT-L's kind: one 64-wide head per layer, quick_gelu, eos_token_id 2,
#                projection_dim 768 (as FLUX.1's text_encoder/config.json), the 49408-token table
#   text_encoder_2  T5 v1.1's kind (gated-gelu, 32 buckets, max distance 128, no biases), its table
#                320 rows for a 300-token tokenizer: T5-XXL's 32128 rows for 32100 tokens keep
#                such a gap, and the ids in it are learned rows, never the table's
#   tokenizer_2  a SentencePiece unigram model of 200 pieces (pad 0, eos 1, unk 2, as T5's) + 100
#                extra_ids, trained here on a text this script writes (write_t5_tokenizer)
#   vae          16 latent channels, no quant convs, FLUX's scaling 0.3611 and shift 0.1159
#   scheduler    FlowMatchEulerDiscreteScheduler as FLUX.1 [dev]'s / [schnell]'s configs set it
# Every weight is drawn with numpy from its name (reinit_weights), so the fixture does not change
# with a diffusers or transformers release.
FLUX_TRANSFORMER = dict(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=64,
                        axes_dims_rope=(16, 56, 56))
FLUX_CLIP = dict(vocab_size=49408, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0,
                 eos_token_id=2, pad_token_id=1)
FLUX_T5 = dict(vocab_size=320, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
               layer_norm_epsilon=1e-6, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
               tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False)
FLUX_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=16, norm_num_groups=32,
                sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True)
T5_PIECES = 200  # + 100 extra_ids: a 300-token tokenizer for the 320-row table
FLUX_SCHEDULERS = {  # FLUX.1 [dev]'s and [schnell]'s scheduler/scheduler_config.json
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
}
LAYOUTS["flux-dev"] = dict(flux="dev", numpy_weights=True)
LAYOUTS["flux-schnell"] = dict(flux="schnell", numpy_weights=True)


def write_clip_tokenizer(out_dir, num_merges=NUM_MERGES, pad_token="<|endoftext|>"):
    """Write the CLIP tokenizer files (ti_flax.models.clip_vocab.write_tokenizer_files) to `out_dir` and
    return a CLIPTokenizer loaded from them.

    With fewer `num_merges`, the tokenizer keeps only the first merges (vocabulary
    512 + num_merges + 2): the same token ids for bytes, the specials last."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(out_dir, num_merges, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(out_dir)


def t5_training_text(lines=2000, seed=0):
    """The text the tiny T5 tokenizer is trained on: captions of common words and made-up ones
    (three syllables each), so SentencePiece finds 200 pieces; deterministic."""
    import random

    common = ("a photo of the cat dog toy sitting on table red blue green yellow house tree sky painting in style "
              "by artist small large bright dark river mountain portrait watercolor oil sketch city night morning "
              "with and an old new wooden").split()
    syllables = "ka lo mi ne ru ta si po ve da".split()
    made_up = [a + b + c for a in syllables for b in syllables for c in syllables[:3]]
    rng = random.Random(seed)
    return [" ".join(rng.choice(common) if rng.random() < 0.7 else rng.choice(made_up) for _ in range(8))
            for _ in range(lines)]


def write_t5_tokenizer(out_dir, pieces=T5_PIECES, extra_ids=100, model_max_length=512):
    """Write a tiny T5 tokenizer folder (spiece.model, tokenizer.json, tokenizer_config.json) and
    return the transformers T5Tokenizer read from it.

    The SentencePiece unigram model is trained here on `t5_training_text` with T5's special pieces:
    <pad> 0, </s> 1, <unk> 2, no <s>; transformers adds the `extra_ids` sentinels <extra_id_N> after
    the pieces, as T5's 32000 pieces + 100 make its 32100 tokens. One thread: the same bytes on every
    machine.
    """
    import io

    import sentencepiece
    import transformers

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(t5_training_text()), model_writer=model, vocab_size=pieces, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    # The fast class (FluxPipeline's; transformers 5's only one, aliased) converts spiece.model and
    # saves tokenizer.json in every version; 4.x's slow T5Tokenizer would save spiece.model alone.
    cls = getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer
    tokenizer = cls.from_pretrained(out_dir, extra_ids=extra_ids, model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)
    return cls.from_pretrained(out_dir)


def build_tiny_model(out_dir, layout="tiny", prediction_type="epsilon", seed=0, log=None):
    """Write a random-init Stable Diffusion folder to `out_dir` and return its path (`log`: a
    function given the planted layout's progress lines)."""
    import tempfile

    import torch
    from transformers.utils import logging as transformers_logging

    # transformers 5 advises on torchvision and draws progress bars on every save and load.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    diffusers_logging.disable_progress_bar()

    spec = LAYOUTS[layout]
    if spec.get("flux"):
        _build_flux(out_dir, spec["flux"], seed)
        reinit_weights(out_dir, seed)
        return out_dir
    hidden = spec["hidden"]
    num_merges = spec.get("num_merges", NUM_MERGES)
    vocab_size = 512 + num_merges + 2  # 49408 (clip_vocab.VOCAB_SIZE) for the full tokenizer
    context = hidden + spec["text_2"]["hidden_size"] if spec.get("sdxl") else hidden
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, cross_attention_dim=context, **{"norm_num_groups": 32, **spec["unet"]}
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(spec["vae"]["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(spec["vae"]["block_out_channels"]),
        **{"sample_size": spec["resolution"], **spec["vae"]},
    )
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden + 5,
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": hidden,
        "hidden_act": spec.get("hidden_act", "quick_gelu"),
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
        **spec.get("text", {}),
    }
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    if spec.get("sdxl"):
        _build_sdxl(out_dir, spec, prediction_type, vae, text_encoder, unet, {**text_config, **spec["text_2"]}, num_merges)
        if spec.get("numpy_weights"):
            reinit_weights(out_dir, seed)
        return out_dir
    # SD 1.x's scheduler config; v_prediction gives an SD 2.x-768-style model.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = write_clip_tokenizer(tok_dir, num_merges, spec.get("pad_token", "<|endoftext|>"))
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
    if spec.get("numpy_weights"):
        reinit_weights(out_dir, seed)
    if spec.get("denoiser"):
        import planted_denoiser

        planted_denoiser.train_denoiser(out_dir, seed=seed, log=log, **spec["denoiser"])
    return out_dir


def _build_flux(out_dir, variant, seed):
    """Save a FluxPipeline folder of the FLUX layouts (see FLUX_TRANSFORMER); `variant` "dev" or "schnell"."""
    import shutil
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)  # the weights are redrawn from their names after the save
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=variant == "dev")
    levels = len(FLUX_VAE["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, **FLUX_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**FLUX_CLIP))
    text_encoder_2 = T5EncoderModel(T5Config(**FLUX_T5))
    with tempfile.TemporaryDirectory() as tok_dir, tempfile.TemporaryDirectory() as tok_2_dir:
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[variant]),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=write_clip_tokenizer(tok_dir),
            text_encoder_2=text_encoder_2,
            tokenizer_2=write_t5_tokenizer(tok_2_dir),
            transformer=transformer,
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
        # FLUX.1's tokenizer_2/ ships the SentencePiece model beside tokenizer.json; so does this one.
        shutil.copy(os.path.join(tok_2_dir, "spiece.model"), os.path.join(out_dir, "tokenizer_2", "spiece.model"))


def _build_sdxl(out_dir, spec, prediction_type, vae, text_encoder, unet, text_2_config, num_merges):
    """Save an SDXL pipeline folder: the second encoder with projection and "!" padding, SDXL's
    Euler scheduler config."""
    import tempfile

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2_config))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type=prediction_type,
    )
    with tempfile.TemporaryDirectory() as tok_dir, tempfile.TemporaryDirectory() as tok_2_dir:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=write_clip_tokenizer(tok_dir, num_merges),
            tokenizer_2=write_clip_tokenizer(tok_2_dir, num_merges, pad_token="!"),
            unet=unet,
            scheduler=scheduler,
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)


def _weight_values(name, shape, seed):
    """Deterministic float32 values for one weight, from its name: norm scales near 1, biases
    near 0, embeddings at CLIP's 0.02, matrices and kernels at 1 / sqrt(fan_in)."""
    import zlib

    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    noise = rng.standard_normal(shape).astype(np.float32)
    leaf = name.rsplit(".", 2)
    if len(shape) == 1:
        return (1.0 + 0.1 * noise) if "norm" in name and name.endswith(".weight") else 0.05 * noise
    if "embedding" in leaf[-2]:
        return 0.02 * noise
    fan_in = int(np.prod(shape[1:]))
    return noise / np.float32(np.sqrt(fan_in))


def _canonical(component, name):
    """The weight's name as transformers 4.x saved it: 5.x drops CLIPTextModel's `text_model.`
    prefix, and the values are drawn from the name, so the same model must get the same name.
    A T5 encoder's tied token table is drawn as `shared.weight` under either of its names, so a
    file that holds both copies keeps them equal."""
    if name == "encoder.embed_tokens.weight":
        return "shared.weight"
    if name.startswith(("shared.", "encoder.block.", "encoder.final_layer_norm.")):  # T5's, not CLIP's
        return name
    if component.startswith("text_encoder") and name.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return "text_model." + name
    return name


def reinit_weights(model_dir, seed):
    """Overwrite every float weight of a saved pipeline folder with `_weight_values`."""
    from safetensors.numpy import load_file, save_file

    for component in sorted(os.listdir(model_dir)):
        folder = os.path.join(model_dir, component)
        if not os.path.isdir(folder):
            continue
        for filename in sorted(os.listdir(folder)):
            if not filename.endswith(".safetensors"):
                continue
            path = os.path.join(folder, filename)
            state = load_file(path)
            for name in state:
                if state[name].dtype.kind == "f":
                    state[name] = _weight_values(f"{component}.{_canonical(component, name)}", state[name].shape, seed)
            save_file(state, path, metadata={"format": "pt"})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tiny")
    parser.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_tiny_model(args.output_dir, args.layout, args.prediction_type, args.seed, log=print)
    if LAYOUTS[args.layout].get("flux"):
        print(f"tiny FLUX.1 [{LAYOUTS[args.layout]['flux']}] model written to {args.output_dir}")
    else:
        print(f"tiny Stable Diffusion model ({args.layout}, {args.prediction_type}) written to {args.output_dir}")


if __name__ == "__main__":
    sys.exit(main())
