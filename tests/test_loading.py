"""load_model on what users have: old Flax pipelines, other model families (refused in one line)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from ti_flax import families
from ti_flax.errors import UserError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def test_old_flax_pipeline_loads_as_its_pytorch_folder():
    flax = families.load_model(os.path.join(FIXTURES, "flax-pipeline"))
    torch_layout = families.load_model(os.path.join(FIXTURES, "flax-pipeline-pt"))
    assert flax.spec == torch_layout.spec
    np.testing.assert_array_equal(flax.alphas_cumprod, torch_layout.alphas_cumprod)
    a = jax.tree_util.tree_flatten_with_path(flax.params)[0]
    b = jax.tree_util.tree_flatten_with_path(torch_layout.params)[0]
    assert [k for k, _ in a] == [k for k, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("class_name, what", [
    ("StableDiffusionXLInpaintPipeline", "an SDXL inpainting model"),
    ("StableDiffusion3Pipeline", "a Stable Diffusion 3 model"),
    ("AuraFlowPipeline", "an AuraFlow model"),
    ("StableDiffusionControlNetPipeline", "a ControlNet"),
])
def test_other_model_families_are_named(class_name, what, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(UserError) as err:
        families.load_model(str(folder))
    message = str(err.value)
    assert what in message and class_name in message and "Stable Diffusion 1.x and 2.x" in message
    assert "\n" not in message


def test_an_incomplete_flux_folder_is_named(tmp_path):
    # FLUX.1 is trained now: its pipeline class goes to the FLUX.1 family, which names what is missing.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match=r"a FLUX.1 folder without transformer/.*download it again$"):
        families.load_model(str(folder))


def test_a_controlnet_unet_config_is_named(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(os.path.join(FIXTURES, "flax-pipeline-pt"), folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["conditioning_embedding_out_channels"] = [16, 32, 96, 256]
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="belongs to a ControlNet"):
        families.load_model(str(folder))
