"""Old Flax pipeline folders -> PyTorch state dicts (ti_flax.models.flax_layout), without diffusers.

tests/fixtures/flax-pipeline was written by diffusers 0.39's FlaxStableDiffusionPipeline and
tests/fixtures/flax-pipeline-pt is the PyTorch folder it was converted from (both made once by
scripts/make_flax_fixture.py), so each converted component must equal the PyTorch state dict
bit for bit.
"""

import os

import numpy as np
import pytest
from flax import serialization

from ti_flax import files
from ti_flax.errors import UserError
from ti_flax.models import clip, flax_layout, unet, vae

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FLAX_DIR = os.path.join(FIXTURES, "flax-pipeline")
PT_DIR = os.path.join(FIXTURES, "flax-pipeline-pt")
PT_FILES = {
    "text_encoder": "model.safetensors",
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}
CONFIGS = {"text_encoder": clip.CLIPTextConfig, "unet": unet.UNetConfig, "vae": vae.VAEConfig}
SHAPES = {"text_encoder": clip.param_shapes, "unet": unet.param_shapes, "vae": vae.param_shapes}


def flax_path(kind):
    return os.path.join(FLAX_DIR, kind, flax_layout.FILENAMES[kind])


def expected_shapes(kind):
    """The owned model's param_shapes for the Flax folder's config.json."""
    config = CONFIGS[kind].from_dict(files.read_json(os.path.join(FLAX_DIR, kind, "config.json")))
    return SHAPES[kind](config)


def assert_bitwise_equal(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        a, b = got[name], want[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize("kind", flax_layout.KINDS)
def test_fixture_gives_the_pytorch_state_dict(kind):
    got = flax_layout.read_state_dict(flax_path(kind), kind, expected_shapes(kind))
    assert_bitwise_equal(got, files.read_safetensors(os.path.join(PT_DIR, kind, PT_FILES[kind])))
    assert all(a.flags.c_contiguous for a in got.values())


def test_text_encoder_without_the_text_model_prefix():
    tree = files.read_msgpack(flax_path("text_encoder"))
    assert_bitwise_equal(
        flax_layout.to_state_dict(tree["text_model"], "text_encoder"),
        flax_layout.to_state_dict(tree, "text_encoder"),
    )


def _without(tree, path):
    node = tree
    for key in path[:-1]:
        node = node[key]
    return node.pop(path[-1])


@pytest.mark.parametrize(
    "kind, change, message",
    [
        ("unet", "missing", "weight down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight is missing"),
        ("vae", "missing", "weight decoder.mid_block.attentions.0.to_out.0.bias is missing"),
        ("text_encoder", "shape", "weight text_model.encoder.layers.1.mlp.fc1.weight has shape (20, 8)"),
        ("unet", "extra", "unexpected weight mid_block.resnets.0.norm1.mean"),
    ],
    ids=["unet-missing", "vae-missing", "text-shape", "unet-unknown-leaf"],
)
def test_a_weight_that_does_not_fit_is_named(tmp_path, kind, change, message):
    tree = files.read_msgpack(flax_path(kind))
    if change == "missing" and kind == "unet":
        _without(tree, ["down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel"])
    elif change == "missing":
        _without(tree, ["decoder", "mid_block", "attentions_0", "proj_attn", "bias"])
    elif change == "shape":
        fc1 = tree["text_model"]["encoder"]["layers"]["1"]["mlp"]["fc1"]
        fc1["kernel"] = fc1["kernel"][:, :20]
    else:  # a leaf the rules do not know (a batch-norm statistic) keeps its Flax name
        tree["mid_block"]["resnets_0"]["norm1"]["mean"] = np.zeros(8, np.float32)
    path = tmp_path / flax_layout.FILENAMES[kind]
    path.write_bytes(serialization.msgpack_serialize(tree))
    with pytest.raises(UserError) as err:
        flax_layout.read_state_dict(str(path), kind, expected_shapes(kind))
    assert str(err.value).startswith(f"{path}: {message}")


def test_unknown_kind():
    with pytest.raises(ValueError, match="text_encoder, unet, vae"):
        flax_layout.to_state_dict({}, "controlnet")
