"""The tiny SDXL-layout model (scripts/make_tiny_model.py --layout tiny-sdxl) and the owned text
encoders on it: both encoders' penultimate states, concatenated, and the second encoder's pooled
projection are the conditioning PyTorch diffusers' StableDiffusionXLPipeline computes."""

import jax.numpy as jnp
import numpy as np
import pytest

import make_tiny_model
from ti_flax import models
from ti_flax.errors import UserError
from ti_flax.models import clip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return make_tiny_model.build_tiny_model(str(tmp_path_factory.mktemp("tiny-sdxl")), layout="tiny-sdxl")


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
        config, params = clip.load_params(f"{sdxl_dir}/{folder}")
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        out = clip.encode(params, config, jnp.asarray(ids))
        states.append(out.penultimate)
        pooled = out.text_embeds
    assert torch_pipe.tokenizer_2.pad_token == "!" and torch_pipe.tokenizer.pad_token == "<|endoftext|>"
    np.testing.assert_allclose(np.concatenate(states, axis=-1), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), want_pooled.numpy(), atol=1e-5)


def test_training_an_sdxl_folder_is_refused_in_one_line(sdxl_dir):
    with pytest.raises(UserError, match=r"an SDXL model .*StableDiffusionXLPipeline.*ti_flax trains Stable Diffusion 1\.x"):
        models.load_model(sdxl_dir)
