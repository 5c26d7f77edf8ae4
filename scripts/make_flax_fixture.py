"""Write tests/fixtures/flax-pipeline (an old Flax pipeline folder) and its PyTorch twin.

ti_flax's --save_as_full_pipeline used to save diffusers' `FlaxStableDiffusionPipeline`; such
folders must keep loading after diffusers (0.40) and transformers (5) dropped their Flax classes.
This script made the committed fixture ONCE, with the libraries that still had them:

  tests/fixtures/flax-pipeline/     FlaxStableDiffusionPipeline.save_pretrained of the model:
                                    unet/ and vae/diffusion_flax_model.msgpack,
                                    text_encoder/flax_model.msgpack, tokenizer/, scheduler/
  tests/fixtures/flax-pipeline-pt/  the same model as scripts/make_tiny_model.py wrote it
                                    (PyTorch safetensors), which the Flax weights came from

The model is make_tiny_model's "flax-fixture" layout (numpy-drawn weights, so a rerun writes the
same values). The Flax weights are made by diffusers' and transformers' own converters
(`from_pretrained(..., from_pt=True)`), so tests/test_flax_layout.py checks ti_flax's inverse
against the libraries, not against itself.

Needs diffusers 0.39 (the last with Flax classes), transformers < 5, torch and flax (the CLIP
vocabulary comes with ti_flax). Rerunning it rewrites both folders.

Usage:
    python scripts/make_flax_fixture.py [OUTPUT_FIXTURES_DIR]   (default tests/fixtures)
"""

import contextlib
import os
import shutil
import sys
import tempfile

import make_tiny_model

LAYOUT = "flax-fixture"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def unet_norm_groups(groups):
    """diffusers' Flax UNet hard-codes 32 groups in every GroupNorm (its config's norm_num_groups
    is ignored), so a UNet narrower than 32 channels cannot be initialised. The group count
    changes no parameter name or shape, so build it with the config's group count instead."""
    import flax.linen as nn

    real = nn.GroupNorm
    nn.GroupNorm = lambda num_groups=32, **kwargs: real(num_groups=groups, **kwargs)
    try:
        yield
    finally:
        nn.GroupNorm = real


def _with_bin_weights(pt_dir, tmp):
    """A copy of `pt_dir` whose unet/ and vae/ also hold diffusion_pytorch_model.bin: diffusers'
    Flax `from_pretrained(from_pt=True)` reads only .bin files."""
    import torch
    from safetensors.torch import load_file

    copy = shutil.copytree(pt_dir, os.path.join(tmp, "pt"))
    for component in ("unet", "vae"):
        folder = os.path.join(copy, component)
        state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        torch.save(state, os.path.join(folder, "diffusion_pytorch_model.bin"))
    return copy


def _check_complete(model, params, init_shapes):
    """from_pretrained only warns about missing weights: make them an error here."""
    from flax.traverse_util import flatten_dict

    got, want = flatten_dict(params), flatten_dict(init_shapes)
    assert set(got) == set(want), (type(model).__name__, set(got) ^ set(want))
    assert all(got[k].shape == want[k].shape for k in want), type(model).__name__


def save_flax_pipeline(pt_dir, out_dir, tmp):
    """Convert the PyTorch folder `pt_dir` with diffusers' and transformers' Flax loaders and save
    it the way ti_flax's --save_as_full_pipeline did (safety_checker None)."""
    import jax
    from diffusers import FlaxAutoencoderKL, FlaxPNDMScheduler, FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel
    from transformers import CLIPTokenizer, FlaxCLIPTextModel

    groups = make_tiny_model.LAYOUTS[LAYOUT]["unet"]["norm_num_groups"]
    bin_dir = _with_bin_weights(pt_dir, tmp)
    key = jax.random.PRNGKey(0)
    text = FlaxCLIPTextModel.from_pretrained(os.path.join(pt_dir, "text_encoder"), from_pt=True)
    _check_complete(text, text.params, jax.eval_shape(lambda k: text.init_weights(k, text.input_shape), key))
    with unet_norm_groups(groups):
        unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(bin_dir, subfolder="unet", from_pt=True)
        _check_complete(unet, unet_params, jax.eval_shape(unet.init_weights, key))
    vae, vae_params = FlaxAutoencoderKL.from_pretrained(bin_dir, subfolder="vae", from_pt=True)
    _check_complete(vae, vae_params, jax.eval_shape(vae.init_weights, key))
    scheduler, _ = FlaxPNDMScheduler.from_pretrained(pt_dir, subfolder="scheduler")
    pipe = FlaxStableDiffusionPipeline(
        text_encoder=text,
        vae=vae,
        unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(pt_dir, "tokenizer")),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
    )
    params = {"text_encoder": text.params, "unet": unet_params, "vae": vae_params}
    pipe.save_pretrained(out_dir, params=params)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    fixtures = argv[0] if argv else os.path.join(ROOT, "tests", "fixtures")
    flax_dir, pt_dir = os.path.join(fixtures, "flax-pipeline"), os.path.join(fixtures, "flax-pipeline-pt")
    for folder in (flax_dir, pt_dir):
        shutil.rmtree(folder, ignore_errors=True)
    make_tiny_model.build_tiny_model(pt_dir, layout=LAYOUT, seed=0)
    with tempfile.TemporaryDirectory() as tmp:  # save_pretrained into an empty folder, then move
        save_flax_pipeline(pt_dir, os.path.join(tmp, "flax"), tmp)
        shutil.move(os.path.join(tmp, "flax"), flax_dir)
    for folder in (flax_dir, pt_dir):
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(folder) for f in names)
        print(f"{folder}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(main())
