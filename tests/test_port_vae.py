"""Parity of ti_flax.models.vae with diffusers' PyTorch AutoencoderKL (tiny, random weights, fp32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from ti_flax.errors import UserError  # noqa: E402
from ti_flax.models import vae  # noqa: E402
from ti_flax.models.component_weights import load_component  # noqa: E402
from ti_flax.models.weights import flatten  # noqa: E402

TOL = 1e-4
SIZE = 64


def tiny_config(layers_per_block):
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[32, 64],
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=SIZE,
    )


def save_folder(model, folder, state_dict=None):
    """A diffusers-style vae folder: config.json + diffusion_pytorch_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()},
                                str(folder / "diffusion_pytorch_model.safetensors"))
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config["_class_name"] = "AutoencoderKL"
    (folder / "config.json").write_text(json.dumps(config, default=list))
    return str(folder)


@pytest.fixture(scope="module", params=[1, 2], ids=["layers1", "layers2"])
def reference(request, tmp_path_factory):
    """(torch model, folder, pixels NCHW, latents NCHW, torch mean, logvar, decoded) for one config."""
    torch.manual_seed(request.param)
    model = diffusers.AutoencoderKL(**tiny_config(request.param)).eval()
    # Random-init GroupNorm affines are 1 / 0: make them random too, so a transposed scale is caught.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    folder = save_folder(model, tmp_path_factory.mktemp(f"vae{request.param}"))
    rng = np.random.default_rng(request.param)
    pixels = rng.uniform(-1, 1, (2, 3, SIZE, SIZE)).astype(np.float32)
    latents = rng.standard_normal((2, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(pixels)).latent_dist
        decoded = model.decode(torch.from_numpy(latents)).sample
    return model, folder, pixels, latents, dist.mean.numpy(), dist.logvar.numpy(), decoded.numpy()


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def jitted():
    encode = jax.jit(vae.encode, static_argnums=1, static_argnames="dtype")
    decode = jax.jit(vae.decode, static_argnums=1, static_argnames="dtype")
    return encode, decode


def test_param_shapes_match_torch_state_dict(reference):
    model, folder, *_ = reference
    config, _ = load_component(folder, "vae")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert vae.param_shapes(config) == want


def test_param_shapes_without_quant_convs_or_mid_attention():
    kwargs = dict(tiny_config(1), use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    model = diffusers.AutoencoderKL(**kwargs)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert vae.param_shapes(vae.VAEConfig.from_dict(kwargs)) == want


def test_encode_decode_match_diffusers(reference, jitted):
    _, folder, pixels, latents, mean, logvar, decoded = reference
    encode, decode = jitted
    config, params = load_component(folder, "vae")
    our_mean, our_logvar = encode(params, config, jnp.asarray(nhwc(pixels)))
    assert our_mean.shape == (2, SIZE // 2, SIZE // 2, 4)
    assert np.abs(np.asarray(our_mean) - nhwc(mean)).max() <= TOL
    assert np.abs(np.asarray(our_logvar) - nhwc(logvar)).max() <= TOL
    ours = decode(params, config, jnp.asarray(nhwc(latents)))
    assert ours.shape == (2, SIZE, SIZE, 3)
    assert np.abs(np.asarray(ours) - nhwc(decoded)).max() <= TOL


def test_a_perturbed_weight_breaks_parity(reference, jitted):
    """The parity check can fail: one changed weight in the mid-block attention or an up block is caught."""
    _, folder, pixels, latents, mean, _, decoded = reference
    encode, decode = jitted
    config, params = load_component(folder, "vae")
    bad = jax.tree_util.tree_map(np.array, params)
    bad["encoder"]["mid_block"]["attentions"]["0"]["to_v"]["weight"][0, 0] += 0.5
    bad["decoder"]["up_blocks"]["1"]["resnets"]["0"]["conv1"]["weight"][0, 0, 1, 1] += 0.5
    our_mean, _ = encode(bad, config, jnp.asarray(nhwc(pixels)))
    assert np.abs(np.asarray(our_mean) - nhwc(mean)).max() > TOL
    ours = decode(bad, config, jnp.asarray(nhwc(latents)))
    assert np.abs(np.asarray(ours) - nhwc(decoded)).max() > TOL


def test_old_attention_names_load(reference, tmp_path, jitted):
    """Files from before diffusers 0.14 (query/key/value/proj_attn) load under today's names."""
    model, folder, pixels, _, mean, _, _ = reference
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for name, value in model.state_dict().items():
        for new_name, old_name in renames.items():
            name = name.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        old[name] = value
    assert any(".query.weight" in k for k in old) and not any(".to_q." in k for k in old)
    old_folder = save_folder(model, tmp_path / "old", old)
    # diffusers itself still reads it (so this is a real old-format file) ...
    with torch.no_grad():
        ref = diffusers.AutoencoderKL.from_pretrained(old_folder).encode(torch.from_numpy(pixels)).latent_dist.mean
    np.testing.assert_allclose(ref.numpy(), mean, atol=1e-6)
    # ... and so do we, to the same tree as the new-format file.
    config, params = load_component(old_folder, "vae")
    _, new_params = load_component(folder, "vae")
    assert flatten(params).keys() == flatten(new_params).keys()
    our_mean, _ = jitted[0](params, config, jnp.asarray(nhwc(pixels)))
    assert np.abs(np.asarray(our_mean) - nhwc(mean)).max() <= TOL


def test_weights_of_another_config_are_user_errors(reference, tmp_path):
    model, folder, *_ = reference
    config = json.loads(open(f"{folder}/config.json").read())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(config, latent_channels=8)))
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(
        open(f"{folder}/diffusion_pytorch_model.safetensors", "rb").read())
    with pytest.raises(UserError, match="shape"):
        load_component(str(bad), "vae")
    (bad / "config.json").write_text(json.dumps(dict(config, layers_per_block=config["layers_per_block"] + 1)))
    with pytest.raises(UserError, match="missing"):
        load_component(str(bad), "vae")


@pytest.mark.parametrize("change", [
    {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
    {"up_block_types": ["UpDecoderBlock2D"]},
    {"norm_num_groups": 24},
    {"act_fn": "tanh"},
])
def test_unsupported_configs_are_user_errors(change):
    with pytest.raises(UserError):
        vae.VAEConfig.from_dict(dict(tiny_config(1), **change))


def test_config_round_trip_and_hashable():
    config = vae.VAEConfig.from_dict(dict(tiny_config(2), some_future_key=1, _class_name="AutoencoderKL"))
    assert vae.VAEConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(vae.VAEConfig.from_dict(tiny_config(2)))
    assert config.block_out_channels == (32, 64) and config.scale_factor == 2
    assert config.shift_factor is None and config.scaling_factor == 0.18215


def test_bfloat16_runs_close(reference, jitted):
    """dtype=bfloat16 with bf16 params runs and stays near the float32 result (norm stats in float32)."""
    model, folder, pixels, _, mean, _, _ = reference
    if model.config.layers_per_block != 1:
        pytest.skip("checked once (layers_per_block=1): compiling costs ~10 s")
    config, params = load_component(folder, "vae")
    params16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    our_mean, _ = jitted[0](params16, config, jnp.asarray(nhwc(pixels)), dtype=jnp.bfloat16)
    assert our_mean.dtype == jnp.bfloat16
    err = np.abs(np.asarray(our_mean, np.float32) - nhwc(mean)).max()
    assert err < 0.1 * np.abs(mean).max() + 0.05
