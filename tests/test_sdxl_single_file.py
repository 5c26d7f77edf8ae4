"""SDXL single files (sd_xl_base_1.0.safetensors and its fine-tunes) load as the diffusers folder they came from.

The tiny "single-sdxl" folder is written as one file in SDXL's original (Stability / sgm) layout by
`original_layout.to_original` (CLIP-L at conditioner.embedders.0.transformer., OpenCLIP bigG with its
fused in_proj and transposed text_projection at conditioner.embedders.1.model., the UNet's label_emb).
So that the test is not circular, PyTorch diffusers' `StableDiffusionXLPipeline.from_single_file`
reads the same file, with the folder as its config, and must find the same weights.
"""

import sys

import numpy as np
import pytest

from original_layout import assert_same_weights as _assert_same_weights, load_warned as _load
from original_layout import run_train_cli as _run_train_cli, save_original, to_original, zeros

from ti_flax import TrainConfig, families, models
from ti_flax.training import outputs
from ti_flax.errors import UserError
from ti_flax.models.weights import flatten
from ti_flax.models import schedulers

PARTS = ("text_encoder", "text_encoder_2", "unet", "vae")


# --------------------------------------------------------------------------------------------
# An SDXL single file is the folder it came from


def test_sdxl_file_loads_the_folders_weights(tiny_sdxl_single_file):
    folder, path = tiny_sdxl_single_file
    want = families.load_model(folder)
    got, warned = _load(path)
    for part in PARTS:
        _assert_same_weights(got.params[part], want.params[part], part)  # bitwise
    # Configs from the shapes and SDXL's rules (64-wide heads, 1024 px, 0.13025), both encoders' ids
    assert got.spec == want.spec and got.spec.family == "sdxl" and got.spec.scaling_factor == 0.13025
    assert got.spec.denoiser.sample_size == 128 and got.spec.denoiser.attention_head_dim == (1, 2)
    np.testing.assert_array_equal(got.alphas_cumprod, want.alphas_cumprod)
    assert got.scheduler_config["_class_name"] == "EulerDiscreteScheduler"  # SDXL base samples with Euler
    prompt = "a photo of a cat-toy, on a beach!"
    for ours, theirs in ((got.tokenizer, want.tokenizer), (got.tokenizer_2, want.tokenizer_2)):
        assert ours(prompt, padding="max_length", max_length=77).input_ids == \
            theirs(prompt, padding="max_length", max_length=77).input_ids  # "!" padding in the second
    assert not warned and got.notes == () and got.model_dir == path


def test_pytorch_diffusers_reads_the_sdxl_file_the_same_way(tiny_sdxl_single_file):
    """Not circular: diffusers' own converter finds in the file the weights ti_flax finds."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    folder, path = tiny_sdxl_single_file
    ours, _ = _load(path)
    with torch.no_grad():
        pipe = StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True)
    for part in PARTS:
        state = {k: v for k, v in getattr(pipe, part).state_dict().items() if not k.endswith("position_ids")}
        if part.startswith("text"):  # transformers >= 5.6 drops CLIPTextModel's text_model. prefix
            state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                     for k, v in state.items()}
        mine = flatten(ours.params[part])
        assert sorted(mine) == sorted(state), part
        for name, value in state.items():
            np.testing.assert_array_equal(mine[name], value.float().numpy(), err_msg=f"{part}: {name}")


def test_sdxl_file_trains_like_the_folder(tiny_sdxl_single_file, sample_images_dir, tmp_path):
    import jax

    from ti_flax import train

    folder, path = tiny_sdxl_single_file
    device = jax.local_devices()[:1]
    rows = {}
    for name, model in (("folder", folder), ("file", path)):
        config = TrainConfig.tiny(model, sample_images_dir, str(tmp_path / name), max_train_steps=2, num_vectors=2)
        rows[name] = train(config, devices=device).rows
    assert rows["file"].shape == (2, 64 + 128)  # a CLIP-L row and a bigG row side by side
    np.testing.assert_array_equal(rows["file"], rows["folder"])


def test_ema_only_and_half_precision_sdxl_files_load(tiny_sdxl_single_file, tmp_path):
    """A file whose UNet is only the EMA copy loads that; float16 / bfloat16 files widen to float32."""
    import ml_dtypes

    folder, _ = tiny_sdxl_single_file
    want = families.load_model(folder).params
    ema = save_original(to_original(folder, "sdxl", ema="only"), str(tmp_path / "ema.safetensors"))
    _assert_same_weights(families.load_model(ema).params["unet"], want["unet"], "ema")
    state = to_original(folder, "sdxl")
    for dtype in (np.float16, ml_dtypes.bfloat16):
        half = {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in state.items()}
        model = families.load_model(save_original(half, str(tmp_path / f"{np.dtype(dtype).name}.safetensors")))
        for part in PARTS:
            rounded = {k: np.asarray(v).astype(dtype).astype(np.float32) for k, v in flatten(want[part]).items()}
            _assert_same_weights(model.params[part], rounded, f"{part} {np.dtype(dtype).name}")


def test_an_sdxl_file_saves_as_a_diffusers_folder(tiny_sdxl_single_file, tmp_path):
    """--save_as_full_pipeline from an SDXL file: a StableDiffusionXLPipeline folder that loads as the same model."""

    _, path = tiny_sdxl_single_file
    model, _ = _load(path)
    families.of(model.spec).save_pipeline(model, np.zeros((0, model.spec.row_width), np.float32), str(tmp_path))
    again = families.load_model(str(tmp_path))
    assert again.spec == model.spec and again.tokenizer_2.pad_token == "!"
    assert again.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    for part in PARTS:
        _assert_same_weights(again.params[part], model.params[part], part)


# --------------------------------------------------------------------------------------------
# v-prediction and zero terminal SNR: ComfyUI's marker keys, and the flags that win over them


def _marked(folder, tmp_path, *keys):
    state = dict(to_original(folder, "sdxl"), **{k: np.zeros((0,), np.float32) for k in keys})
    return save_original(state, str(tmp_path / f"{'-'.join(keys) or 'plain'}.safetensors"))


def test_v_pred_and_ztsnr_keys_are_honoured_and_flags_win(tiny_sdxl_single_file, tmp_path):
    folder, _ = tiny_sdxl_single_file
    marked = _marked(folder, tmp_path, "v_pred", "ztsnr")
    model, _ = _load(marked)
    assert model.spec.prediction_type == model.scheduler_config["prediction_type"] == "v_prediction"
    assert model.scheduler_config["rescale_betas_zero_snr"] is True
    assert model.scheduler_config["timestep_spacing"] == "trailing"
    assert model.alphas_cumprod[-1] == 0 and model.alphas_cumprod[-2] > 0
    assert model.notes == ("v_prediction from the file's v_pred key", "zero terminal SNR from the file's ztsnr key")
    assert outputs._model_kind(model) == ("SDXL, v_prediction, zero terminal SNR, hidden 64 + 128; v_prediction "
                                          "from the file's v_pred key; zero terminal SNR from the file's ztsnr key")
    # An explicit flag wins over its marker, and says nothing of a marker it overrode.
    plain, _ = _load(marked, prediction_type="epsilon", zero_terminal_snr=False)
    assert plain.spec.prediction_type == "epsilon" and not plain.scheduler_config["rescale_betas_zero_snr"]
    np.testing.assert_array_equal(plain.alphas_cumprod, families.load_model(folder).alphas_cumprod)
    assert plain.notes == ()
    # ComfyUI reads ztsnr only beside v_pred; v_pred alone is v-prediction on the plain schedule.
    for keys, prediction_type in ((("ztsnr",), "epsilon"), (("v_pred",), "v_prediction")):
        model, _ = _load(_marked(folder, tmp_path, *keys))
        assert model.spec.prediction_type == prediction_type and "rescale_betas_zero_snr" not in model.scheduler_config


def test_zero_terminal_snr_loss_is_finite_at_the_last_timestep(tiny_sdxl_single_file, tmp_path):
    """At the last timestep alpha_cumprod is 0: the noisy latents are pure noise, the v target is
    -x0, and the loss and its gradient stay finite."""
    import jax
    import jax.numpy as jnp

    from ti_flax.training import step

    folder, _ = tiny_sdxl_single_file
    model = families.load_model(folder, prediction_type="v_prediction", zero_terminal_snr=True)
    frozen = families.Frozen.from_model(model)
    rng = np.random.default_rng(0)
    latents, noise = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t = jnp.array([999, 500])
    noisy = schedulers.noisy_latents(model.alphas_cumprod, latents, noise, t)
    target = schedulers.velocity(model.alphas_cumprod, latents, noise, t)
    np.testing.assert_array_equal(np.asarray(noisy[0]), noise[0])
    np.testing.assert_array_equal(np.asarray(target[0]), -latents[0])
    ids = jnp.asarray([model.tokenizer("a photo of a toy", padding="max_length", max_length=77).input_ids] * 2)
    rows = jnp.zeros((1, model.spec.row_width), jnp.float32)
    time_ids = jnp.asarray([[32, 32, 0, 0, 32, 32]] * 2, jnp.float32)
    loss, grads = jax.value_and_grad(step.diffusion_loss)(rows, model.spec, models.Compute(), frozen, ids, noisy, t,
                                                          target, time_ids=time_ids)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grads)))


def test_zero_terminal_snr_default_sampler():
    """PNDM has no rescaled schedule: SD 1.x / 2.x sample zero terminal SNR with DDIM (v-prediction,
    as diffusers recommends) or Euler (epsilon, which DDIM cannot start from pure noise with)."""
    from types import SimpleNamespace

    from ti_flax.models.schedulers import with_zero_terminal_snr
    from ti_flax.models.ldm_layout import SCHEDULER
    from ti_flax.sampling.sampler import default_scheduler

    def sd(prediction_type):
        return SimpleNamespace(family="sd1", prediction_type=prediction_type)

    ztsnr = with_zero_terminal_snr(SCHEDULER, True)
    assert default_scheduler(sd("v_prediction"), SCHEDULER) == "pndm"
    assert default_scheduler(sd("v_prediction"), ztsnr) == "ddim"
    assert default_scheduler(sd("epsilon"), ztsnr) == "euler"


def test_zero_terminal_snr_flags():
    from ti_flax.config.cli import parse_config

    base = ["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "d", "--placeholder_token", "<x>",
            "--initializer_token", "toy"]
    assert parse_config(base).zero_terminal_snr is None  # the model's own: off unless it asks
    config = parse_config(base + ["--zero_terminal_snr"])
    assert config.zero_terminal_snr is True and TrainConfig.from_json(config.to_json()) == config
    assert parse_config(base + ["--no_zero_terminal_snr"]).zero_terminal_snr is False
    with pytest.raises(UserError, match="--zero_terminal_snr"):
        config.replace(zero_terminal_snr="yes").validate()


# --------------------------------------------------------------------------------------------
# What is not an SDXL base checkpoint: one line naming it, nothing written


OTHER_FILES = {
    "lora": ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": zeros(4, 64),
              "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": zeros(128, 4),
              "lora_unet_input_blocks_4_1_proj_in.alpha": zeros()}, "a LoRA"),
    "vae-only": ({"encoder.conv_in.weight": zeros(8, 3, 3, 3), "decoder.conv_in.weight": zeros(8, 4, 3, 3),
                  "encoder.down.0.block.0.conv1.weight": zeros(8, 8, 3, 3)}, "a VAE only"),
    "refiner": ({"model.diffusion_model.input_blocks.0.0.weight": zeros(64, 4, 3, 3),
                 "model.diffusion_model.label_emb.0.0.weight": zeros(256, 2560),
                 "conditioner.embedders.0.model.positional_embedding": zeros(77, 128),
                 "conditioner.embedders.0.model.text_projection": zeros(128, 32),
                 "first_stage_model.encoder.conv_in.weight": zeros(8, 3, 3, 3)}, "an SDXL refiner"),
}


@pytest.mark.parametrize("kind", sorted(OTHER_FILES))
def test_other_sdxl_files_are_one_line(kind, tmp_path, capsys):
    state, words = OTHER_FILES[kind]
    assert words in _run_train_cli(save_original(state, str(tmp_path / f"{kind}.safetensors")), tmp_path, capsys)


def test_inpainting_and_incomplete_sdxl_files_are_one_line(tiny_sdxl_single_file, tmp_path, capsys):
    folder, _ = tiny_sdxl_single_file
    state = to_original(folder, "sdxl")
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    inpainting = dict(state, **{conv_in: np.zeros((64, 9, 3, 3), np.float32)})
    cases = {"inpainting": (inpainting, "the SDXL UNet takes 9 input channels (an inpainting")}
    for prefix, name in (("conditioner.embedders.1.", "OpenCLIP bigG"), ("conditioner.embedders.0.", "CLIP ViT-L")):
        cases[name] = ({k: v for k, v in state.items() if not k.startswith(prefix)},
                       f"an SDXL checkpoint without its {name} text encoder ({prefix}")
    for kind, (bad, words) in cases.items():
        assert words in _run_train_cli(save_original(bad, str(tmp_path / f"{kind}.safetensors")), tmp_path, capsys)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
