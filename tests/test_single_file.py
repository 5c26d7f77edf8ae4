"""Original single-file checkpoints (A1111 / ComfyUI layout) load as the diffusers folder they came from.

The tiny SD 1.x and SD 2.x-like folders are written as one file in the ORIGINAL key layout by
`original_layout.to_original` (the tests' own diffusers -> LDM mapping, the reverse of what the loader does).
So that the test is not circular, PyTorch diffusers' `StableDiffusionPipeline.from_single_file`
reads the same file, with the folder as its config, and must find the same weights.
"""

import sys
import warnings

import numpy as np
import pytest

import make_tiny_model
from original_layout import assert_same_weights as _assert_same_weights, load_warned as _load
from original_layout import run_train_cli as _run_train_cli, save_original, to_original

from ti_flax import TrainConfig, families
from ti_flax.errors import UserError
from ti_flax.models.weights import flatten

FAMILIES = {"sd1": "single-sd1", "sd2": "single-sd2"}
SD2_WARNING = "pass --prediction_type v_prediction"

# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def single_file_model(request, tmp_path_factory):
    """(family, diffusers folder, the same model as one original-layout .safetensors file)."""
    family = request.param
    folder = make_tiny_model.build_tiny_model(str(tmp_path_factory.mktemp(f"folder-{family}")), FAMILIES[family])
    path = save_original(to_original(folder, family), str(tmp_path_factory.mktemp("file") / f"{family}.safetensors"))
    return family, folder, path


# --------------------------------------------------------------------------------------------
# A single file is the folder it came from


def test_single_file_loads_the_folders_weights(single_file_model):
    family, folder, path = single_file_model
    want = families.load_model(folder)
    got, warned = _load(path)
    for part in ("text_encoder", "unet", "vae"):
        _assert_same_weights(got.params[part], want.params[part], part)  # bitwise
    assert got.spec == want.spec  # configs (the family's, from the shapes), prediction type, vocabulary
    np.testing.assert_array_equal(got.alphas_cumprod, want.alphas_cumprod)
    prompt = "a photo of a cat-toy, on a beach!"
    assert got.tokenizer(prompt, padding="max_length", max_length=77).input_ids == \
        want.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert got.spec.denoiser.sample_size == 64 and got.model_dir == path
    assert [w for w in warned if SD2_WARNING in w] == ([] if family == "sd1" else warned[:1])


def test_pytorch_diffusers_reads_the_file_the_same_way(single_file_model):
    """Not circular: diffusers' own converter finds in the file the weights ti_flax finds."""
    import torch
    from diffusers import StableDiffusionPipeline

    family, folder, path = single_file_model
    ours, _ = _load(path)
    with torch.no_grad():
        pipe = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    text_state = {k if k.startswith("text_model.") else "text_model." + k: v
                  for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    for part, state in (("unet", pipe.unet.state_dict()), ("vae", pipe.vae.state_dict()), ("text_encoder", text_state)):
        mine = flatten(ours.params[part])
        assert sorted(mine) == sorted(state), part
        for name, value in state.items():
            np.testing.assert_array_equal(mine[name], value.float().numpy(), err_msg=f"{part}: {name}")


# Loading is bitwise the same for both families (above), so the run is compiled for one: SD 2.x's,
# whose tokenizer pads with "!" and whose text encoder drops OpenCLIP's last block.
@pytest.mark.parametrize("single_file_model", ["sd2"], indirect=True)
def test_single_file_trains_like_the_folder(single_file_model, sample_images_dir, tmp_path):
    import jax

    from ti_flax import train

    family, folder, path = single_file_model
    device = jax.local_devices()[:1]
    rows = {}
    for name, model in (("folder", folder), ("file", path)):
        config = TrainConfig.tiny(model, sample_images_dir, str(tmp_path / name), max_train_steps=2, num_vectors=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows[name] = train(config, devices=device).rows
        said = [str(w.message) for w in caught if SD2_WARNING in str(w.message)]
        assert len(said) == (name == "file"), said  # an SD 2.x file: say how to train a 768-v model
    np.testing.assert_array_equal(rows["file"], rows["folder"])


# --------------------------------------------------------------------------------------------
# EMA copies, .ckpt pickles, --prediction_type


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return make_tiny_model.build_tiny_model(str(tmp_path_factory.mktemp("folder-sd1-ema")), "single-sd1")


def test_ema_only_file_loads_the_ema_weights_and_both_takes_the_model(sd1_folder, tmp_path):
    want = families.load_model(sd1_folder).params["unet"]
    for ema in ("only", "both"):
        path = save_original(to_original(sd1_folder, "sd1", ema=ema), str(tmp_path / f"ema-{ema}.safetensors"))
        _assert_same_weights(families.load_model(path).params["unet"], want, f"ema={ema}")


def test_half_precision_files_load_as_float32(sd1_folder, tmp_path):
    """Most shared checkpoints are float16 (some bfloat16): read and widened to float32."""
    import ml_dtypes

    state = to_original(sd1_folder, "sd1")
    want = families.load_model(sd1_folder).params
    for dtype in (np.float16, ml_dtypes.bfloat16):
        half = {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in state.items()}
        model = families.load_model(save_original(half, str(tmp_path / f"{np.dtype(dtype).name}.safetensors")))
        for part in ("unet", "text_encoder"):
            rounded = {k: np.asarray(v).astype(dtype).astype(np.float32) for k, v in flatten(want[part]).items()}
            _assert_same_weights(model.params[part], rounded, f"{part} {np.dtype(dtype).name}")


def test_ckpt_needs_allow_pickle(sd1_folder, tmp_path):
    import torch

    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_original(sd1_folder, "sd1").items()}
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": state, "global_step": 470000}, path)
    with pytest.raises(UserError, match="--allow_pickle") as err:
        families.load_model(path)
    assert "\n" not in str(err.value)
    model, warned = _load(path, allow_pickle=True)
    _assert_same_weights(model.params["unet"], families.load_model(sd1_folder).params["unet"], "unet")
    assert any("unpickling" in w for w in warned)


def test_prediction_type_overrides_the_folder_and_sets_the_file(sd1_folder, single_file_model):
    folder = families.load_model(sd1_folder, prediction_type="v_prediction")
    assert folder.spec.prediction_type == folder.scheduler_config["prediction_type"] == "v_prediction"
    family, _, path = single_file_model
    model, warned = _load(path, prediction_type="v_prediction")
    assert model.spec.prediction_type == model.scheduler_config["prediction_type"] == "v_prediction"
    assert not warned  # the user said what the model is
    assert model.spec.denoiser.sample_size == (96 if family == "sd2" else 64)


@pytest.mark.parametrize("single_file_model", ["sd2"], indirect=True)
def test_sd2_file_converted_from_diffusers_keeps_every_text_block(single_file_model, tmp_path):
    """A file written back from diffusers holds only the OpenCLIP blocks SD 2.x uses (no last
    block, no text_projection): all of them are the text encoder."""
    _, folder, _ = single_file_model
    path = save_original(to_original(folder, "sd2", whole_text_tower=False), str(tmp_path / "back.safetensors"))
    got, want = _load(path)[0], families.load_model(folder)
    assert got.spec == want.spec
    _assert_same_weights(got.params["text_encoder"], want.params["text_encoder"], "text_encoder")


@pytest.mark.parametrize("single_file_model", ["sd2"], indirect=True)
def test_a_single_file_saves_as_a_diffusers_folder(single_file_model, tmp_path):
    """--save_as_full_pipeline from a single file: a folder that loads as the same model."""
    _, _, path = single_file_model
    model, _ = _load(path, prediction_type="v_prediction")
    families.of(model.spec).save_pipeline(model, np.zeros((0, model.spec.hidden_size), np.float32), str(tmp_path))
    again = families.load_model(str(tmp_path))
    assert again.spec == model.spec and again.tokenizer.pad_token == "!"
    assert again.scheduler_config["prediction_type"] == "v_prediction"
    for part in ("text_encoder", "unet", "vae"):
        _assert_same_weights(again.params[part], model.params[part], part)


def test_prediction_type_and_allow_pickle_flags():
    from ti_flax.config.cli import parse_config

    base = ["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "d", "--placeholder_token", "<x>",
            "--initializer_token", "toy"]
    config = parse_config(base)
    assert (config.prediction_type, config.allow_pickle) == (None, False)
    config = parse_config(base + ["--prediction_type", "v_prediction", "--allow-pickle"])
    assert (config.prediction_type, config.allow_pickle) == ("v_prediction", True)
    assert TrainConfig.from_json(config.to_json()) == config
    with pytest.raises(UserError, match="--prediction_type must be one of epsilon, v_prediction"):
        config.replace(prediction_type="sample").validate()


# --------------------------------------------------------------------------------------------
# What is not an SD 1.x/2.x checkpoint: one line each, nothing written (SDXL's: test_sdxl_single_file.py)


def _tensor(*shape):
    return np.zeros(shape, np.float32)


BAD_FILES = {
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _tensor(4, 32),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": _tensor()}, "a LoRA"),
    "vae-only": ({"encoder.conv_in.weight": _tensor(8, 3, 3, 3), "decoder.conv_in.weight": _tensor(8, 4, 3, 3),
                  "encoder.down.0.block.0.conv1.weight": _tensor(8, 8, 3, 3)}, "a VAE only"),
    "embedding": ({"emb_params": _tensor(2, 768)}, "a textual-inversion embedding"),
    "inpainting": ({"model.diffusion_model.input_blocks.0.0.weight": _tensor(64, 9, 3, 3),
                    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": _tensor(64),
                    "model.diffusion_model.input_blocks.1.0.out_layers.3.weight": _tensor(64, 64, 3, 3),
                    "model.diffusion_model.input_blocks.1.1.proj_in.weight": _tensor(64, 64, 1, 1),
                    "first_stage_model.encoder.conv_in.weight": _tensor(8, 3, 3, 3),
                    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": _tensor(10, 64)},
                   "takes 9 input channels (an inpainting"),
    "other": ({"weight": _tensor(3)}, "not a Stable Diffusion checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_not_a_checkpoint_is_one_line(kind, tmp_path, capsys):
    state, words = BAD_FILES[kind]
    path = save_original(state, str(tmp_path / f"{kind}.safetensors"))
    assert words in _run_train_cli(path, tmp_path, capsys)


def test_damaged_and_pickled_files_are_one_line(tmp_path, capsys):
    good = save_original({"model.diffusion_model.input_blocks.0.0.weight": _tensor(64, 4, 3, 3)},
                         str(tmp_path / "good.safetensors"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(good, "rb").read()[:-100])
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights\n")
    assert "truncated or not a safetensors file" in _run_train_cli(truncated, tmp_path, capsys)
    assert "truncated or not a safetensors file" in _run_train_cli(text, tmp_path, capsys)
    assert "no such file" in _run_train_cli(tmp_path / "missing.safetensors", tmp_path, capsys)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04K\x01.")
    assert "--allow_pickle" in _run_train_cli(pickled, tmp_path, capsys)


def test_mixed_families_are_one_line(tmp_path, capsys):
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": _tensor(64, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": _tensor(64, 64),  # linear: SD 2.x's UNet
        "first_stage_model.encoder.conv_in.weight": _tensor(8, 3, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": _tensor(10, 64),  # CLIP-L
    }
    err = _run_train_cli(save_original(state, str(tmp_path / "mixed.safetensors")), tmp_path, capsys)
    assert "mixes two model families" in err and "SD 1.x" in err and "SD 2.x" in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
