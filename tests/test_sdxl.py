"""The tiny SDXL-layout model (scripts/make_tiny_model.py --layout tiny-sdxl) and the owned text
encoders on it: both encoders' penultimate states, concatenated, and the second encoder's pooled
projection are the conditioning PyTorch diffusers' StableDiffusionXLPipeline computes."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ti_flax import families, models
from ti_flax.errors import UserError
from ti_flax.models import clip
from ti_flax.models.component_weights import load_component

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdxl_dir(tiny_sdxl_model_dir):
    return tiny_sdxl_model_dir


@pytest.fixture(scope="module")
def torch_pipe(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_dir)


def test_owned_encoders_give_the_pipelines_prompt_embeddings(sdxl_dir, torch_pipe):
    import torch

    prompt = "a photo of a small toy cat"
    with torch.no_grad():
        want, _, want_pooled, _ = torch_pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert tuple(want.shape) == (1, 77, 32 + 48) and tuple(want_pooled.shape) == (1, 16)
    states, pooled = [], None
    for folder, tokenizer in (("text_encoder", torch_pipe.tokenizer), ("text_encoder_2", torch_pipe.tokenizer_2)):
        config, params = load_component(f"{sdxl_dir}/{folder}", "text_encoder")
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        out = clip.encode(params, config, jnp.asarray(ids))
        states.append(out.penultimate)
        pooled = out.text_embeds
    assert torch_pipe.tokenizer_2.pad_token == "!" and torch_pipe.tokenizer.pad_token == "<|endoftext|>"
    np.testing.assert_allclose(np.concatenate(states, axis=-1), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), want_pooled.numpy(), atol=1e-5)


def test_an_sdxl_folder_loads_both_encoders_and_tokenizers(sdxl_dir):
    model = families.load_model(sdxl_dir)
    spec = model.spec
    assert spec.family == "sdxl" and spec.text_widths == (32, 48) and spec.row_width == 80
    assert sorted(model.params) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert [t.shape for t in models.token_tables(model.params)] == [(49408, 32), (49408, 48)]
    assert model.tokenizers == (model.tokenizer, model.tokenizer_2)
    assert model.tokenizer_2.pad_token == "!" and spec.pad_token_id_2 == model.tokenizer_2.convert_tokens_to_ids("!")
    assert model.tokenizer.pad_token == "<|endoftext|>" and spec.eos_token_id == model.tokenizer.eos_token_id
    assert model.tokenizer_2.get_vocab() == model.tokenizer.get_vocab()


@pytest.mark.parametrize("missing", ["tokenizer_2", "text_encoder_2"])
def test_an_sdxl_folder_without_its_second_part_is_refused_in_one_line(missing, sdxl_dir, tmp_path):
    # model_index.json says StableDiffusionXLPipeline; every other part is there (linked).
    folder = tmp_path / "sdxl"
    folder.mkdir()
    for name in os.listdir(sdxl_dir):
        if name != missing:
            os.symlink(os.path.join(sdxl_dir, name), folder / name)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    with pytest.raises(UserError) as err:
        families.load_model(str(folder))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{folder}: an SDXL model folder without {missing}/")
