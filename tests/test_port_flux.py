"""ti_flax.models.flux (FLUX.1's transformer and latent packing) and the FLUX VAE through
ti_flax.models.vae, against PyTorch diffusers (tiny random-init models, float32).

Two tiny FluxTransformer2DModels, [schnell]-like (no guidance embedding) and [dev]-like
(guidance_embeds), each built once per session: one double- and one single-stream block,
2 heads of 16 dimensions with RoPE axes (4, 6, 6), 64 input channels (16 latent channels packed
2x2, as FLUX). Their RMSNorm weights are perturbed away from 1 so that a q/k norm applied to
the wrong stream shows. Inputs: a batch of 2 with non-square 8x12 latents (a 4x6 token grid), 7
text tokens whose ids count up on the t axis, so all three RoPE axes carry distinct positions.
One jit per config computes the output and its vector-Jacobian product w.r.t. the text states
and the pooled embedding.

What each check would catch:
  outputs within 1e-5 of diffusers   any wrong computation in the forward pass: the 1000x time
        scale, sin/cos order of the time embedding, the (shift, scale, gate) order of
        AdaLayerNormZero against norm_out's (scale, shift), text-before-image in the joint
        sequence and the ids, RoPE's pair layout and axis order (a transposed h/w axis shows on
        the non-square grid), RMSNorm on the wrong stream, tanh vs erf GELU, the single block's
        attention/MLP order in proj_out, the guidance embedder's absence or presence.
  gradients within 1e-4 relative L2   a stop_gradient or float cast on the path textual
        inversion differentiates: text states through context_embedder and every block, the
        pooled embedding through temb and every modulation.
  remat                               jax.checkpoint changing values or gradients, or wrapping
        something other than one checkpoint per block.
  chunked at 288 queries              the chunked attention's padding on a joint text+image
        sequence, and "auto" resolving on CPU as it does for the UNet.
  param_shapes                        a weight name or shape diffusers' loader would reject,
        at tiny size and at FLUX.1 [dev]/[schnell] size (parameter counts).
  pack / unpack / ids                 a wrong patch or channel order, or (row, column) swapped.
  bf16                                bf16 activations and weights running at all, and
        staying near float32 (statistics, modulation, RoPE, softmax in float32).
  config errors                       RoPE axes that do not add up to the head width, and the
        other unusable configs, as one-line UserErrors.
  the FLUX VAE                        vae.py on 16 latent channels without quant convs.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ti_flax.errors import UserError  # noqa: E402
from ti_flax.models import attention as attention_lib  # noqa: E402
from ti_flax.models import flux, vae  # noqa: E402
from ti_flax.models.weights import unflatten  # noqa: E402

TOL = 1e-5  # max abs, float32 outputs
GRAD_TOL = 1e-4  # relative L2, float32 gradients
BATCH, LATENT_CHANNELS, HEIGHT, WIDTH, TEXT_TOKENS = 2, 16, 8, 12, 7
TINY = dict(
    patch_size=1,
    in_channels=4 * LATENT_CHANNELS,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)
VARIANTS = {"schnell": dict(TINY, guidance_embeds=False), "dev": dict(TINY, guidance_embeds=True)}

# The published transformer/config.json of FLUX.1 [dev]; [schnell]'s differs in guidance_embeds.
FLUX_DEV = dict(
    _class_name="FluxTransformer2DModel",
    _diffusers_version="0.30.0.dev0",
    attention_head_dim=128,
    axes_dims_rope=[16, 56, 56],
    guidance_embeds=True,
    in_channels=64,
    joint_attention_dim=4096,
    num_attention_heads=24,
    num_layers=19,
    num_single_layers=38,
    patch_size=1,
    pooled_projection_dim=768,
)
FLUX_SCHNELL = dict(FLUX_DEV, guidance_embeds=False)

# Tiny programs: compile time dominates, and LLVM's optimisations change no value compared here.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnames=("config", "attention", "dtype"), compiler_options=_COMPILER_OPTIONS)
def _forward(params, inputs, *, config, attention="dense", dtype=jnp.float32):
    return flux.apply(params, config, **inputs, attention=attention, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("config", "remat"), compiler_options=_COMPILER_OPTIONS)
def _run(params, inputs, cotangent, *, config, remat):
    """(output, d<output, cotangent>/d encoder_hidden_states, .../d pooled_projections)."""

    def forward(text, pooled):
        return flux.apply(
            params, config, **dict(inputs, encoder_hidden_states=text, pooled_projections=pooled),
            attention="dense", remat=remat,
        )  # fmt: skip

    out, vjp = jax.vjp(forward, inputs["encoder_hidden_states"], inputs["pooled_projections"])
    return (out, *vjp(cotangent))


def _inputs(config, rng, height=HEIGHT, width=WIDTH):
    latents = rng.standard_normal((BATCH, LATENT_CHANNELS, height, width), dtype=np.float32)
    txt_ids = flux.text_ids(TEXT_TOKENS)
    txt_ids[:, 0] = np.arange(TEXT_TOKENS)  # the pipeline's are zeros; counting exercises the t axis
    return dict(
        hidden_states=np.asarray(flux.pack_latents(latents)),
        encoder_hidden_states=rng.standard_normal((BATCH, TEXT_TOKENS, config.joint_attention_dim), dtype=np.float32),
        pooled_projections=rng.standard_normal((BATCH, config.pooled_projection_dim), dtype=np.float32),
        timestep=np.array([0.25, 0.9], np.float32),
        img_ids=flux.latent_image_ids(height, width),
        txt_ids=txt_ids,
        guidance=np.array([3.5, 5.0], np.float32) if config.guidance_embeds else None,
    )


def _torch_forward(model, inputs, cotangent=None):
    """diffusers' output (numpy), and with a cotangent the gradients of <output, cotangent>."""
    tensors = {k: None if v is None else torch.from_numpy(np.array(v)) for k, v in inputs.items()}
    if cotangent is None:
        with torch.no_grad():
            return model(**tensors).sample.numpy()
    text, pooled = tensors["encoder_hidden_states"].requires_grad_(), tensors["pooled_projections"].requires_grad_()
    out = model(**tensors).sample
    (out * torch.from_numpy(cotangent)).sum().backward()
    return out.detach().numpy(), text.grad.numpy(), pooled.grad.numpy()


class Variant:
    """A tiny torch FLUX transformer, its weights as our params, inputs, diffusers' results, our runs."""

    def __init__(self, name):
        torch.manual_seed(0)
        self.model = diffusers.FluxTransformer2DModel(**VARIANTS[name]).eval()
        with torch.no_grad():  # RMSNorm weights start at 1: make each norm's its own
            for key, param in self.model.named_parameters():
                if "norm_" in key:
                    param.add_(0.2 * torch.randn_like(param))
        self.state = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}
        self.params = unflatten(self.state)
        self.config = flux.FluxConfig.from_dict(dict(self.model.config))
        rng = np.random.default_rng(0)
        self.inputs = _inputs(self.config, rng)
        self.cotangent = rng.standard_normal((BATCH, HEIGHT * WIDTH // 4, self.config.out_dim), dtype=np.float32)
        self.reference, self.text_grad, self.pooled_grad = _torch_forward(self.model, self.inputs, self.cotangent)
        self._runs = {}

    def run(self, remat=False):
        if remat not in self._runs:
            out = _run(self.params, self.inputs, self.cotangent, config=self.config, remat=remat)
            self._runs[remat] = tuple(np.asarray(x) for x in out)
        return self._runs[remat]


_BUILT = {}


def _variant(name):
    if name not in _BUILT:
        _BUILT[name] = Variant(name)
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return _variant(request.param)


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _relative_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


# --------------------------------------------------------------------------------------------
# The transformer's values and gradients


def test_output_matches_diffusers(variant):
    out = variant.run()[0]
    assert out.shape == variant.reference.shape == (BATCH, HEIGHT * WIDTH // 4, 64)
    assert np.abs(variant.reference).max() > 0.5  # a real signal, not a degenerate output
    diff = _max_diff(out, variant.reference)
    print(f"guidance_embeds={variant.config.guidance_embeds}: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_gradients_match_torch_autograd(variant):
    _, text_grad, pooled_grad = variant.run()
    for name, ours, theirs in (("text", text_grad, variant.text_grad), ("pooled", pooled_grad, variant.pooled_grad)):
        assert np.abs(theirs).max() > 1e-3, name  # the input really reaches the output
        err = _relative_l2(ours, theirs)
        print(f"guidance_embeds={variant.config.guidance_embeds} {name} gradient: relative L2 {err:.2e}")
        assert err <= GRAD_TOL, (name, err)


def test_remat_gives_the_same_values_and_gradients():
    dev = _variant("dev")
    for plain, remat in zip(dev.run(remat=False), dev.run(remat=True)):
        assert _max_diff(remat, plain) <= 1e-6

    def top_level(remat):
        jaxpr = jax.make_jaxpr(lambda p, i: flux.apply(p, dev.config, **i, remat=remat))(dev.params, dev.inputs)
        return [e.primitive.name for e in jaxpr.jaxpr.eqns]

    names = ("checkpoint", "remat", "remat2")
    assert sum(map(top_level(True).count, names)) == dev.config.num_layers + dev.config.num_single_layers
    assert not set(names) & set(top_level(False))


def test_chunked_attention_matches_diffusers_at_more_tokens_than_a_chunk():
    """24x48 latents: 288 image + 7 text tokens, more queries than a chunk, so "auto" on CPU
    chunks them (as it does the UNet's) and pads 295 queries up to two chunks."""
    schnell = _variant("schnell")
    inputs = _inputs(schnell.config, np.random.default_rng(3), height=24, width=48)
    tokens = inputs["hidden_states"].shape[1] + TEXT_TOKENS
    assert tokens > attention_lib.DEFAULT_CHUNK
    assert attention_lib.resolve("auto", backend="cpu", dtype=jnp.float32, q_len=tokens, kv_len=tokens,
                                 head_dim=16) == "chunked"
    out = np.asarray(_forward(schnell.params, inputs, config=schnell.config, attention="auto"))
    assert _max_diff(out, _torch_forward(schnell.model, inputs)) <= TOL


def test_bfloat16_runs_close_to_float32():
    dev = _variant("dev")
    params16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), dev.params)
    out = _forward(params16, dev.inputs, config=dev.config, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    err = _max_diff(np.asarray(out, np.float32), dev.reference)
    print(f"bf16: max abs diff {err:.2e} of max {np.abs(dev.reference).max():.2f}")
    assert err < 0.02 * np.abs(dev.reference).max() + 0.02


def test_guidance_must_match_the_config():
    """[dev] without guidance and [schnell] with it are UserErrors (diffusers fails with a TypeError)."""
    for name, guidance, message in (("dev", None, "embeds guidance"), ("schnell", 3.5, "no guidance embedding")):
        v = _variant(name)
        inputs = dict(v.inputs, guidance=guidance)
        with pytest.raises(UserError, match=message):
            jax.eval_shape(lambda p, i: flux.apply(p, v.config, **i), v.params, inputs)


def test_wrong_ids_are_user_errors():
    schnell = _variant("schnell")
    bad = (
        dict(img_ids=schnell.inputs["img_ids"][:, :2]),  # two columns for three RoPE axes
        dict(img_ids=schnell.inputs["img_ids"][:-1]),  # one id short of the tokens
        dict(timestep=np.zeros(3, np.float32)),  # three timesteps for two examples
    )
    for change in bad:
        with pytest.raises(UserError) as err:
            jax.eval_shape(lambda i: flux.apply(schnell.params, schnell.config, **i), dict(schnell.inputs, **change))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="choose one of"):
        jax.eval_shape(lambda i: flux.apply(schnell.params, schnell.config, **i, attention="sdpa"), schnell.inputs)


# --------------------------------------------------------------------------------------------
# Parameters and config


def test_param_shapes_equal_the_state_dict(variant):
    assert flux.param_shapes(variant.config) == {k: tuple(v.shape) for k, v in variant.state.items()}


@pytest.mark.parametrize("config, num_params", [(FLUX_DEV, 11_901_408_320), (FLUX_SCHNELL, 11_891_178_560)],
                         ids=["dev", "schnell"])
def test_param_shapes_of_the_real_models(config, num_params):
    """Full-size configs against torch modules built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    shapes = flux.param_shapes(flux.FluxConfig.from_dict(config))
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(math.prod(s) for s in shapes.values()) == num_params


def test_config_round_trips_and_is_hashable():
    config = flux.FluxConfig.from_dict(dict(FLUX_DEV, some_future_key=1))
    again = flux.FluxConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)
    assert config.axes_dims_rope == (16, 56, 56) and config.inner_dim == 3072 and config.out_dim == 64
    assert flux.FluxConfig(axes_dims_rope=[16, 56, 56]) == flux.FluxConfig()  # lists become tuples
    assert flux.FluxConfig.from_dict({k: v for k, v in FLUX_SCHNELL.items() if k != "axes_dims_rope"}) == (
        flux.FluxConfig.from_dict(FLUX_SCHNELL))  # an old config.json without the key: diffusers' default


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(axes_dims_rope=[16, 56, 64]), "axes_dims_rope [16, 56, 64] add up to 136, not attention_head_dim 128"),
        (dict(attention_head_dim=64), "add up to 128, not attention_head_dim 64"),
        (dict(axes_dims_rope=[17, 55, 56]), "positive even integers"),
        (dict(patch_size=2), "patch_size 2 is not supported"),
        (dict(num_attention_heads=0), "num_attention_heads 0"),
        (dict(out_channels=-1), "out_channels -1"),
        (dict(guidance_embeds="yes"), "guidance_embeds"),
        (dict(_class_name="SD3Transformer2DModel"), "SD3Transformer2DModel"),
    ],
)
def test_unusable_configs_are_one_line_user_errors(change, message):
    with pytest.raises(UserError) as err:
        flux.FluxConfig.from_dict(dict(FLUX_DEV, **change))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Latent packing and position ids


def test_pack_unpack_and_ids_equal_the_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    rng = np.random.default_rng(1)
    latents = rng.standard_normal((BATCH, LATENT_CHANNELS, HEIGHT, WIDTH), dtype=np.float32)
    theirs = FluxPipeline._pack_latents(torch.from_numpy(latents), BATCH, LATENT_CHANNELS, HEIGHT, WIDTH).numpy()
    tokens = np.array(flux.pack_latents(latents))  # writable, for torch.from_numpy
    assert tokens.shape == (BATCH, HEIGHT * WIDTH // 4, 4 * LATENT_CHANNELS)
    np.testing.assert_array_equal(tokens, theirs)
    vae_scale = 8  # the pipeline's unpack takes pixel sides
    unpacked = FluxPipeline._unpack_latents(torch.from_numpy(tokens), HEIGHT * vae_scale, WIDTH * vae_scale, vae_scale)
    np.testing.assert_array_equal(np.asarray(flux.unpack_latents(tokens, HEIGHT, WIDTH)), unpacked.numpy())
    np.testing.assert_array_equal(np.asarray(flux.unpack_latents(tokens, HEIGHT, WIDTH)), latents)
    ids = FluxPipeline._prepare_latent_image_ids(BATCH, HEIGHT // 2, WIDTH // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(flux.latent_image_ids(HEIGHT, WIDTH), ids)
    assert flux.latent_image_ids(HEIGHT, WIDTH).dtype == np.float32
    np.testing.assert_array_equal(flux.text_ids(5), np.zeros((5, 3), np.float32))
    with pytest.raises(UserError, match="not even"):
        flux.pack_latents(latents[:, :, :7])
    with pytest.raises(UserError, match="not even"):
        flux.latent_image_ids(HEIGHT, 7)
    with pytest.raises(UserError, match="2x2 patches of 8x10"):
        flux.unpack_latents(tokens, HEIGHT, 10)


def test_rope_tables_equal_diffusers_at_flux_sizes():
    """A 1024x1024 image (64x64 token grid) and 512 text tokens: float32 angles stay within 5e-6."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = np.concatenate([flux.text_ids(512), flux.latent_image_ids(128, 128)])
    cos, sin = FluxPosEmbed(flux.ROPE_THETA, [16, 56, 56])(torch.from_numpy(ids))
    ours = flux.rope_tables(ids, (16, 56, 56))
    for mine, theirs in zip(ours, (cos, sin)):  # diffusers stores each pair's value twice
        assert _max_diff(np.repeat(np.asarray(mine), 2, axis=1), theirs.numpy()) <= 5e-6


# --------------------------------------------------------------------------------------------
# The FLUX VAE: vae.py's AutoencoderKL with 16 latent channels and no quant convs

FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def test_flux_vae_encode_decode_match_diffusers():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**FLUX_VAE).eval()
    with torch.no_grad():  # random GroupNorm affines, so a misplaced scale shows
        for key, param in model.named_parameters():
            if "norm" in key:
                param.add_(0.1 * torch.randn_like(param))
    config = vae.VAEConfig.from_dict(dict(model.config))
    assert (config.latent_channels, config.scaling_factor, config.shift_factor) == (16, 0.3611, 0.1159)
    assert not config.use_quant_conv and not config.use_post_quant_conv
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert vae.param_shapes(config) == {k: tuple(v.shape) for k, v in state.items()}
    params = unflatten(state)

    rng = np.random.default_rng(2)
    pixels = rng.uniform(-1, 1, (BATCH, 3, 32, 24)).astype(np.float32)  # non-square
    latents = rng.standard_normal((BATCH, 16, 16, 12)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(pixels)).latent_dist
        decoded = model.decode(torch.from_numpy(latents)).sample.numpy()
    nhwc = lambda x: np.transpose(x, (0, 2, 3, 1))  # noqa: E731
    mean, logvar = jax.jit(vae.encode, static_argnums=1)(params, config, nhwc(pixels))
    assert mean.shape == (BATCH, 16, 12, 16)
    assert _max_diff(mean, nhwc(dist.mean.numpy())) <= TOL
    assert _max_diff(logvar, nhwc(dist.logvar.numpy())) <= TOL
    ours = jax.jit(vae.decode, static_argnums=1)(params, config, nhwc(latents))
    assert _max_diff(ours, nhwc(decoded)) <= TOL
