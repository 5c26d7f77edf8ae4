"""--pretrained_vae_model_name_or_path: another VAE in place of the model's, from an AutoencoderKL
folder or from one VAE file in the original layout (A1111's models/VAE), in training and generate."""

import json
import os
import shutil

import numpy as np
import pytest
from original_layout import assert_same_weights, run_train_cli, save_original, vae_key

from ti_flax import families, models
from ti_flax.errors import UserError
from ti_flax.models.weights import flatten


@pytest.fixture(scope="module")
def other_vae(tiny_model_dir, tmp_path_factory):
    """An AutoencoderKL folder: the tiny model's VAE config with another scaling factor, and
    weights that differ from the model's own everywhere."""
    folder = tmp_path_factory.mktemp("other-vae")
    own = families.load_model(tiny_model_dir)
    rng = np.random.default_rng(7)
    state = {k: v + rng.normal(0.0, 0.01, v.shape).astype(np.float32) for k, v in flatten(own.params["vae"]).items()}
    save_original(state, str(folder / "diffusion_pytorch_model.safetensors"))
    config = json.load(open(os.path.join(tiny_model_dir, "vae", "config.json")))
    json.dump(dict(config, scaling_factor=0.5), open(folder / "config.json", "w"))
    return str(folder), state, own


def original_vae_file(state, model_dir, path, prefix=""):
    """`state` (diffusers names) written as an original-layout VAE file, A1111's (no prefix) or a
    whole checkpoint's part (prefix "first_stage_model.")."""
    levels = len(json.load(open(os.path.join(model_dir, "vae", "config.json")))["block_out_channels"])
    out = {}
    for name, value in state.items():
        key, was_conv = vae_key(name, levels)
        out[prefix + key] = value[:, :, None, None] if was_conv and value.ndim == 2 else value
    return save_original(out, str(path))


def test_a_vae_folder_replaces_the_vae_and_nothing_else(tiny_model_dir, other_vae):
    folder, state, own = other_vae
    swapped = families.load_model(tiny_model_dir, vae=folder)
    assert_same_weights(swapped.params["vae"], state, "the VAE folder's weights")
    for part in ("text_encoder", "unet"):
        assert_same_weights(swapped.params[part], own.params[part], part)
    # The folder's config sets the latents' scale, as diffusers reads vae.config.scaling_factor.
    assert swapped.spec.scaling_factor == swapped.spec.vae.scaling_factor == 0.5 != own.spec.scaling_factor
    assert swapped.spec.denoiser == own.spec.denoiser and swapped.spec.text == own.spec.text
    assert swapped.notes == (f"VAE from {folder}",)
    # A whole model folder given as the VAE: its vae/ is taken.
    whole = families.load_model(tiny_model_dir, vae=tiny_model_dir)
    assert_same_weights(whole.params["vae"], own.params["vae"], "a model folder's vae/")


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_an_original_layout_vae_file_loads_as_its_folder(tiny_model_dir, other_vae, tmp_path, prefix):
    folder, state, own = other_vae
    path = original_vae_file(state, tiny_model_dir, tmp_path / "vae.safetensors", prefix)
    from_file = families.load_model(tiny_model_dir, vae=path)
    assert_same_weights(from_file.params["vae"], state, "the VAE file's weights")
    # A file states no scale: the model's stays.
    assert from_file.spec.scaling_factor == own.spec.scaling_factor
    assert from_file.spec.vae == own.spec.vae


def test_the_swapped_vae_encodes_as_pytorch_diffusers_does(tiny_model_dir, other_vae):
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    folder, _, _ = other_vae
    model = families.load_model(tiny_model_dir, vae=folder)
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    mean, _ = models.vae_moments(model.spec, models.Compute(), model.params["vae"], pixels)
    with torch.no_grad():
        ref = AutoencoderKL.from_pretrained(folder).encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latent_dist.mean
    np.testing.assert_allclose(np.asarray(mean), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_training_and_generate_take_the_flag(tiny_model_dir, sample_images_dir, other_vae, tmp_path, monkeypatch):
    import jax

    from ti_flax import TrainConfig
    from ti_flax.commands import generate as generation
    from ti_flax.training.run import prepare

    folder, state, _ = other_vae
    config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(tmp_path / "out"),
                              pretrained_vae_model_name_or_path=folder)
    run = prepare(config, devices=jax.local_devices()[:1])
    assert_same_weights(run.model.params["vae"], state, "the run's VAE")
    asked = {}

    def fake_load(*args, **kwargs):
        asked.update(kwargs)
        raise UserError("stop here")

    monkeypatch.setattr(families, "load_model", fake_load)
    assert generation.main(["--pretrained_model_name_or_path", tiny_model_dir, "--prompt", "a cat",
                            "--pretrained_vae_model_name_or_path", folder, "--output_dir", str(tmp_path / "g")]) == 2
    assert asked["vae"] == folder


def test_bad_vaes_are_one_line(tiny_model_dir, other_vae, tmp_path, capsys):
    folder, state, _ = other_vae
    # A VAE whose latents the UNet cannot take (16 channels, as SD3's and Flux's).
    wide = tmp_path / "wide"
    shutil.copytree(folder, wide)
    config = json.load(open(wide / "config.json"))
    json.dump(dict(config, latent_channels=16), open(wide / "config.json", "w"))
    with pytest.raises(UserError, match="16 channels .* takes 4"):
        families.load_model(tiny_model_dir, vae=str(wide))
    # diffusers' names in one file: the folder with its config is what to pass.
    flat = save_original(state, str(tmp_path / "diffusers-vae.safetensors"))
    with pytest.raises(UserError, match="diffusers' layout; pass the folder"):
        families.load_model(tiny_model_dir, vae=flat)
    with pytest.raises(UserError, match="not a VAE"):
        families.load_model(tiny_model_dir, vae=save_original({"x": np.zeros(3, np.float32)}, str(tmp_path / "x.safetensors")))
    err = run_train_cli(tiny_model_dir, tmp_path, capsys, "--pretrained_vae_model_name_or_path", str(tmp_path / "none"))
    assert "--pretrained_vae_model_name_or_path" in err and "no such" in err
