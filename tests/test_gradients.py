"""The loss and its gradient with respect to the learned rows, against PyTorch autograd.

The same weights (the golden SD 1.x and SD 2.x layouts), the same token ids and rows, and the
same explicit noisy latents, timesteps and target: diffusers' PyTorch UNet on transformers'
PyTorch CLIP text encoder, differentiated by torch, is the reference. The inputs are the golden
run's recorded ones (tests/golden/<family>.npz; tests/test_golden.py checks the trainer still
computes them), so this file needs only the model folders, not the golden forward pass.
"""

import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

import golden  # noqa: E402


def torch_loss_and_grad(model_dir, input_ids, rows, noisy, timesteps, target):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder")).eval().double()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).eval().double()
    for p in list(text.parameters()) + list(unet.parameters()):
        p.requires_grad_(False)
    table = text.get_input_embeddings().weight.detach()
    vocab = table.shape[0]
    # The grown table (what a PyTorch trainer trains): torch differentiates through the lookup.
    grown = torch.nn.Embedding(vocab + rows.shape[0], table.shape[1]).double()
    grown.weight = torch.nn.Parameter(torch.cat([table, torch.from_numpy(rows)]))
    text.set_input_embeddings(grown)
    # transformers 4.x builds CLIP's causal mask with torch.full(..., finfo(float64).min) in the
    # default dtype, which overflows float32: the default is float64 while the double model runs.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        hidden = text(torch.from_numpy(input_ids).long()).last_hidden_state
    finally:
        torch.set_default_dtype(default)
    assert (input_ids >= vocab).any()  # the learned rows are really in the prompt
    pred = unet(torch.from_numpy(noisy), torch.from_numpy(timesteps), hidden).sample
    loss = torch.mean((pred - torch.from_numpy(target)) ** 2)
    loss.backward()
    return loss.item(), grown.weight.grad[vocab:].numpy()


@pytest.fixture(scope="module", params=sorted(golden.FAMILIES))
def golden_model(request, tmp_path_factory):
    """(model folder, recorded golden values) of one golden layout."""
    name = request.param
    model_dir = golden.build_model(name, str(tmp_path_factory.mktemp(f"grad-{name}")))
    return model_dir, dict(np.load(golden.golden_path(name)))


def test_loss_and_row_gradient_match_pytorch_autograd(golden_model):
    # Both sides in float64, so the comparison measures the math, not float32 rounding. (This
    # test found diffusers' Flax GEGLU using the tanh GELU: 1.26e-4 relative, in fp32 and fp64.)
    import jax

    from ti_flax import families, models
    from ti_flax.training import step as step_lib
    from ti_flax.training.run import prepare

    model_dir, recorded = golden_model
    run = prepare(golden.run_config(model_dir, "unused"), devices=jax.local_devices()[:1])
    f64 = {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v for k, v in recorded.items() if k != "fingerprint"}
    alphas = np.asarray(run.model.alphas_cumprod, np.float64)
    noisy = f64["noise"] * np.sqrt(1 - alphas[f64["timesteps"]])[:, None, None, None] + _latents(f64, run) * np.sqrt(
        alphas[f64["timesteps"]])[:, None, None, None]
    ref_loss, ref_grad = torch_loss_and_grad(model_dir, f64["input_ids"], f64["rows"], noisy, f64["timesteps"], f64["target"])
    with jax.enable_x64(True):
        spec, compute = run.model.spec, models.Compute(dtype="float64")
        frozen = families.Frozen.from_model(run.model, "float64")
        # Jitted, as the trainer runs it: one float64 program compiles in ~20 s, where running
        # the same gradient op by op compiles every operation on its own (3-4x slower on 2 cores).
        loss, grad = jax.jit(jax.value_and_grad(
            lambda r, f, ids, x, t, y: step_lib.diffusion_loss(r, spec, compute, f, ids, x, t, y)
        ))(f64["rows"], frozen, f64["input_ids"], noisy, f64["timesteps"], f64["target"])
        assert grad.dtype == np.float64
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss), (float(loss), ref_loss)
    rel = np.linalg.norm(np.asarray(grad) - ref_grad) / np.linalg.norm(ref_grad)
    print(f"loss {float(loss):.9g} vs torch {ref_loss:.9g}; row gradient relative L2 error {rel:.3g}")
    assert rel < 1e-4, rel
    # Each learned row gets its own, non-zero gradient (both vectors are in the prompt).
    assert np.all(np.linalg.norm(ref_grad, axis=-1) > 0)


def _latents(values, run):
    # The scaled latent sample the step diffuses: posterior mean + std * the example's draw.
    mean, logvar = values["vae_mean"], values["vae_logvar"]
    return (mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * values["latent_noise"]) * run.model.spec.scaling_factor
