"""ti_flax.models.unet against diffusers' PyTorch UNet2DConditionModel (fp32, tiny configs).

One tiny model per family (SD 1.x, SD 2.x, SDXL), built once. The dense runs return the UNet
output and its gradient with respect to the text states (one compile per family and remat
setting serves both the parity and the remat checks); the chunked runs are forward only.
SD 1.x runs at 32x32 latents (1024 tokens: the chunked attention really chunks); the others at
16x16. Compiling dominates the time, so the programs are compiled without LLVM optimisation.
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

import make_tiny_model  # noqa: E402
from ti_flax.errors import UserError  # noqa: E402
from ti_flax.models import attention as attention_lib  # noqa: E402
from ti_flax.models import unet  # noqa: E402
from ti_flax.models.component_weights import load_component  # noqa: E402
from ti_flax.models.weights import check_params, flatten, unflatten  # noqa: E402

TOL = 1e-4
BATCH = 2
TEXT_EMBEDS = 32  # SDXL's pooled text embedding width in the tiny config
TIME_IDS = (64, 64, 0, 0, 64, 64)

FAMILIES = {
    # scripts/make_tiny_model.py's tiny UNet blocks, with two layers per block (the golden layouts')
    "sd1": dict(
        config=dict(make_tiny_model.TINY_UNET, cross_attention_dim=32, norm_num_groups=32, sample_size=32),
        size=32,
    ),
    "sd2": dict(
        config=dict(
            make_tiny_model.TINY_UNET,
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=48,
            norm_num_groups=32,
            sample_size=16,
        ),
        size=16,
    ),
    "sdxl": dict(
        config=dict(
            make_tiny_model.SDXL_UNET,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=64,
            norm_num_groups=32,
            projection_class_embeddings_input_dim=TEXT_EMBEDS + 6 * 8,
            sample_size=16,
        ),
        size=16,
    ),
}

# Every trace of _run and _forward, by static arguments: jit must compile each combination once.
TRACES = []

# LLVM's optimisations cost half the compile time of these tiny programs and change no value
# the tests compare (XLA's HLO passes, fusion included, still run).
_jit = functools.partial(
    jax.jit,
    static_argnames=("config", "attention", "remat"),
    compiler_options={"xla_backend_optimization_level": 0},
)


@_jit
def _forward(params, sample, timesteps, text, added, *, config, attention, remat=False):
    TRACES.append(("forward", config, attention, remat))
    return unet.apply(params, config, sample, timesteps, text, added_cond=added, attention=attention, remat=remat)


@_jit
def _run(params, sample, timesteps, text, added, cotangent, *, config, attention, remat):
    TRACES.append(("vjp", config, attention, remat))

    def forward(text):
        return unet.apply(params, config, sample, timesteps, text, added_cond=added, attention=attention, remat=remat)

    out, vjp = jax.vjp(forward, text)
    return out, vjp(cotangent)[0]


class Family:
    """A tiny torch UNet, its weights as our params, inputs, reference output, cached runs."""

    def __init__(self, name):
        spec = FAMILIES[name]
        torch.manual_seed(0)
        self.model = diffusers.UNet2DConditionModel(**spec["config"]).eval()
        self.state = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}
        self.params = unflatten(self.state)
        self.config = unet.UNetConfig.from_dict(dict(self.model.config))
        rng = np.random.default_rng(0)
        size = spec["size"]
        self.sample = rng.standard_normal((BATCH, size, size, 4), dtype=np.float32)
        self.timesteps = np.array([10, 999], dtype=np.int32)
        self.text = rng.standard_normal((BATCH, 77, self.config.cross_dims[0]), dtype=np.float32)
        self.cotangent = rng.standard_normal((BATCH, size, size, 4), dtype=np.float32)
        self.added = None
        torch_kwargs = {}
        if self.config.addition_embed_type == "text_time":
            self.added = {
                "text_embeds": rng.standard_normal((BATCH, TEXT_EMBEDS), dtype=np.float32),
                "time_ids": np.array([TIME_IDS] * BATCH, dtype=np.float32),
            }
            torch_kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in self.added.items()}
        with torch.no_grad():
            out = self.model(
                torch.from_numpy(self.sample).permute(0, 3, 1, 2),
                torch.from_numpy(self.timesteps).long(),
                torch.from_numpy(self.text),
                **torch_kwargs,
            ).sample
        self.reference = out.permute(0, 2, 3, 1).numpy()
        self._runs = {}

    def run(self, attention="dense", remat=False):
        """(output, d(sum(output * cotangent))/d text states), numpy, cached."""
        key = (attention, remat)
        if key not in self._runs:
            out = _run(
                self.params, self.sample, self.timesteps, self.text, self.added, self.cotangent,
                config=self.config, attention=attention, remat=remat,
            )  # fmt: skip
            self._runs[key] = tuple(np.asarray(x) for x in out)
        return self._runs[key]

    def forward(self, attention, params=None, config=None, sample=None, timesteps=None, text=None):
        """The output alone, for these or replaced params, config or inputs."""
        out = _forward(
            self.params if params is None else params,
            self.sample if sample is None else sample,
            self.timesteps if timesteps is None else timesteps,
            self.text if text is None else text,
            self.added,
            config=self.config if config is None else config,
            attention=attention,
        )
        return np.asarray(out)


_BUILT = {}


def _family(name):
    """Each family's torch model, reference and runs are built once per test session."""
    if name not in _BUILT:
        _BUILT[name] = Family(name)
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return _family(request.param)


@pytest.fixture(scope="module")
def sd1():
    return _family("sd1")


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --------------------------------------------------------------------------------------------
# Values


def test_dense_and_chunked_match_diffusers(family):
    assert np.abs(family.reference).max() > 0.5  # a real signal, not a degenerate zero output
    chunks = family.sample.shape[1] * family.sample.shape[2] > attention_lib.DEFAULT_CHUNK
    for attention in ("dense", "chunked"):
        if attention == "chunked" and chunks:
            out = family.forward("chunked")
        else:  # where nothing chunks, "chunked" is dense's program: its compile is a cache hit
            out = family.run(attention)[0]
        assert out.shape == family.reference.shape
        diff = _max_diff(out, family.reference)
        print(f"{family.config.block_out_channels} {attention}: max abs diff {diff:.2e}")
        assert diff <= TOL, (attention, diff)


def test_remat_gives_the_same_values_and_gradients(family):
    out, grad = family.run("dense", remat=False)
    out_remat, grad_remat = family.run("dense", remat=True)
    assert np.abs(grad).max() > 1e-3  # the text states do reach the output
    assert _max_diff(out_remat, out) <= 1e-5
    assert _max_diff(grad_remat, grad) <= 1e-5


def test_a_perturbed_cross_attention_weight_moves_the_output(sd1):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    state = dict(sd1.state)
    state[name] = state[name] + np.random.default_rng(1).standard_normal(state[name].shape).astype(np.float32) * 0.5
    out = sd1.forward("chunked", params=unflatten(state))
    assert _max_diff(out, sd1.reference) > 100 * TOL


def test_chunking_happens_where_there_are_more_queries_than_a_chunk(sd1):
    """At 1024 tokens each self- and cross-attention chunks its queries (a scan); at 256 none does."""

    def count(jaxpr, primitive):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == primitive
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        n += count(sub, primitive)
        return n

    def jaxpr(attention, remat=False):
        return jax.make_jaxpr(
            lambda p, x, t, e: unet.apply(p, sd1.config, x, t, e, attention=attention, remat=remat)
        )(sd1.params, sd1.sample, sd1.timesteps, sd1.text).jaxpr

    # down block 0 has 2 transformers and up block 1 has 3, all at 32x32 (a self- and a
    # cross-attention each); the rest run at 16x16.
    assert count(jaxpr("chunked"), "scan") == 2 * 5
    assert count(jaxpr("dense"), "scan") == 0
    # remat: one checkpoint per down, mid and up block at the top level ("remat2" in jax 0.10).
    remat_names = ("checkpoint", "remat", "remat2")
    top = [e.primitive.name for e in jaxpr("dense", remat=True).eqns]
    assert sum(top.count(n) for n in remat_names) == 2 + 1 + 2
    assert not set(remat_names) & {e.primitive.name for e in jaxpr("dense").eqns}


def test_jit_compiles_once_for_repeated_calls(sd1):
    first = sd1.forward("chunked")
    before = len(TRACES)
    same_config = unet.UNetConfig.from_dict(json.loads(json.dumps(sd1.config.to_dict())))
    assert same_config == sd1.config and hash(same_config) == hash(sd1.config)
    out = sd1.forward(
        "chunked", config=same_config, sample=sd1.sample + 1.0, timesteps=sd1.timesteps // 2, text=sd1.text * 2.0
    )
    assert len(TRACES) == before
    assert _max_diff(out, first) > TOL  # the new inputs really went in
    assert len(TRACES) == len(set(TRACES))


def test_sdxl_needs_its_added_conditioning():
    config = unet.UNetConfig.from_dict(FAMILIES["sdxl"]["config"])
    params = unflatten({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in unet.param_shapes(config).items()})
    inputs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, 16, 16, 4), (1,), (1, 77, 64))]
    with pytest.raises(UserError, match="added_cond"):
        jax.eval_shape(lambda p, x, t, e: unet.apply(p, config, x, t, e), params, *inputs)


def test_unknown_attention_is_a_user_error(sd1):
    with pytest.raises(UserError, match="choose one of"):
        jax.eval_shape(
            lambda: unet.apply(sd1.params, sd1.config, sd1.sample, sd1.timesteps, sd1.text, attention="sdpa")
        )


# --------------------------------------------------------------------------------------------
# Parameters and loading


def test_param_shapes_equal_the_torch_state_dict(family):
    assert unet.param_shapes(family.config) == {k: tuple(v.shape) for k, v in family.state.items()}


# The published configs (unet/config.json) of SD 1.5, SD 2.1 and SDXL base, as stored on the Hub.
_SD15 = dict(
    _class_name="UNet2DConditionModel",
    _diffusers_version="0.6.0",
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
_SD21 = dict(
    _SD15,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    dual_cross_attention=False,
    num_class_embeds=None,
    only_cross_attention=False,
    sample_size=96,
    upcast_attention=True,
    use_linear_projection=True,
)
_SDXL = dict(
    _SD15,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    class_embed_type=None,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    num_attention_heads=None,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None,
    use_linear_projection=True,
)


@pytest.mark.parametrize(
    "config, num_params",
    [(_SD15, 859_520_964), (_SD21, 865_910_724), (_SDXL, 2_567_463_684)],
    ids=["sd15", "sd21", "sdxl"],
)
def test_param_shapes_of_the_real_models(config, num_params):
    """Full-size configs against torch modules built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    shapes = unet.param_shapes(unet.UNetConfig.from_dict(config))
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(math.prod(s) for s in shapes.values()) == num_params


def test_check_params_catches_a_wrong_shape(family):
    state = dict(family.state)
    name = "conv_in.weight"
    state[name] = np.zeros((7,) + state[name].shape[1:], np.float32)
    with pytest.raises(UserError, match=f"weight {name} has shape"):
        check_params(unet.param_shapes(family.config), state, "somewhere")


def _write_folder(path, config, state, fmt="safetensors"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
    elif fmt == "bin":
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(path / "diffusion_pytorch_model.bin"))
    return str(path)


def test_load_params(tmp_path):
    model_config = dict(FAMILIES["sd2"]["config"], _class_name="UNet2DConditionModel", _diffusers_version="0.39.0")
    torch.manual_seed(1)
    state = {k: v.numpy() for k, v in diffusers.UNet2DConditionModel(**FAMILIES["sd2"]["config"]).state_dict().items()}
    for fmt in ("safetensors", "bin"):
        config, params = load_component(_write_folder(tmp_path / fmt, model_config, state, fmt), "unet")
        assert config == unet.UNetConfig.from_dict(model_config)
        flat = flatten(params)
        assert set(flat) == set(state)
        assert all(np.array_equal(flat[k], state[k]) and flat[k].dtype == np.float32 for k in state)

    wrong = dict(model_config, cross_attention_dim=40)
    with pytest.raises(UserError, match="attn2.to_k.weight has shape"):
        load_component(_write_folder(tmp_path / "wrong", wrong, state), "unet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(model_config))
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors"):
        load_component(str(tmp_path / "empty"), "unet")
    with pytest.raises(UserError, match="config.json"):
        load_component(str(tmp_path / "nowhere"), "unet")


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "config", [_SD15, _SD21, _SDXL, FAMILIES["sdxl"]["config"]], ids=["sd15", "sd21", "sdxl", "tiny-xl"]
)
def test_config_round_trips_and_is_hashable(config):
    parsed = unet.UNetConfig.from_dict(config)
    again = unet.UNetConfig.from_dict(json.loads(json.dumps(parsed.to_dict())))
    assert again == parsed and hash(again) == hash(parsed)
    assert isinstance(parsed.block_out_channels, tuple)


def test_the_attention_head_dim_quirk():
    """diffusers' attention_head_dim is the number of heads; each head is channels // heads wide."""
    assert unet.UNetConfig.from_dict(_SD15).heads == (8, 8, 8, 8)
    assert unet.UNetConfig.from_dict(_SD21).heads == (5, 10, 20, 20)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(_class_name="ControlNetModel"), "ControlNetModel"),
        (dict(conditioning_embedding_out_channels=[16, 32, 96, 256]), "ControlNet"),
        (dict(_class_name="SD3Transformer2DModel", joint_attention_dim=4096), "SD3Transformer2DModel"),
        (dict(joint_attention_dim=4096), "SD3/Flux"),
        (dict(class_embed_type="timestep"), "class_embed_type"),
        (dict(time_cond_proj_dim=256), "time_cond_proj_dim"),
        (dict(num_attention_heads=8), "num_attention_heads"),
        (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
        (dict(encoder_hid_dim=1024), "encoder_hid_dim"),
        (dict(addition_embed_type="image"), "addition_embed_type"),
        (dict(addition_embed_type="text_time"), "addition_time_embed_dim"),
        (dict(down_block_types=["SimpleCrossAttnDownBlock2D"] * 4), "SimpleCrossAttnDownBlock2D"),
        (dict(up_block_types=["AttnUpBlock2D"] * 4), "AttnUpBlock2D"),
        (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "UNetMidBlock2DSimpleCrossAttn"),
        (dict(only_cross_attention=True), "only_cross_attention"),
        (dict(transformer_layers_per_block=[[1, 2], [1, 2], [1, 2], [1, 2]]), "asymmetric"),
        (dict(attention_head_dim=[5, 10]), "attention_head_dim has 2 entries"),
        (dict(block_out_channels=[320, 640]), "block_out_channels"),
    ],
)
def test_unsupported_configs_are_user_errors(change, message):
    with pytest.raises(UserError) as err:
        config = unet.UNetConfig.from_dict(dict(_SD15, **change))
        unet.param_shapes(config)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_odd_latent_sides_upsample_to_the_skip_size():
    """9x7 latents: the down path rounds 9 -> 5 and 7 -> 4, so the up path must resize to the
    skip connection's size instead of doubling (diffusers' forward_upsample_size)."""
    sd2 = _family("sd2")
    rng = np.random.default_rng(5)
    sample = rng.standard_normal((BATCH, 9, 7, 4), dtype=np.float32)
    with torch.no_grad():
        latents = torch.from_numpy(sample).permute(0, 3, 1, 2)
        out = sd2.model(latents, torch.from_numpy(sd2.timesteps).long(), torch.from_numpy(sd2.text)).sample
    reference = out.permute(0, 2, 3, 1).numpy()
    out = sd2.forward("dense", sample=sample)
    assert out.shape == (BATCH, 9, 7, 4)
    assert _max_diff(out, reference) <= TOL
