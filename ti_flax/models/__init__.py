"""Loading the frozen Stable Diffusion parts, and running them.

This is the only module that imports diffusers' and transformers' Flax model classes, so
the model code can be replaced later without touching the rest of ti_flax.

A model folder (local, or a Hub snapshot) holds `unet/`, `vae/`, `text_encoder/`,
`tokenizer/` and `scheduler/`. Each component's weights are read, in this order, from
Flax msgpack, PyTorch safetensors (converted without torch), or PyTorch `.bin` (needs torch).
"""

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from .. import files
from ..errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


class _DropFlaxNoise(logging.Filter):
    # diffusers 0.39 logs "Flax classes are deprecated" on every Flax class it builds, and
    # lists the PyTorch-only config keys each time a Flax model is built from a Hub config.
    def filter(self, record):
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


_NOISE = (
    "Flax classes are deprecated",
    "are not expected and will be ignored",
    "You have disabled the safety checker",
)


def _quiet_libraries():
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.get_logger("diffusers")  # make sure the library handler exists
    for handler in logging.getLogger("diffusers").handlers:
        handler.addFilter(_DropFlaxNoise())
    tlogging.set_verbosity_error()


_quiet_libraries()

# Imported after the filter so their import-time messages are dropped too.
import flax.linen as nn  # noqa: E402
from diffusers import FlaxAutoencoderKL, FlaxDDPMScheduler, FlaxUNet2DConditionModel  # noqa: E402
from diffusers.configuration_utils import flax_register_to_config  # noqa: E402
from diffusers.models.attention_flax import FlaxAttention, FlaxGEGLU  # noqa: E402
from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax  # noqa: E402
from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel  # noqa: E402


def _filter_module_loggers():
    # Records also reach handlers other than diffusers' own (pytest's, a notebook's), so
    # filter at each diffusers module logger as well.
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("diffusers"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _DropFlaxNoise) for f in logger.filters):
                logger.addFilter(_DropFlaxNoise())


_filter_module_loggers()


# --------------------------------------------------------------------------------------------
# Locating a model


def resolve_model_dir(name_or_path, revision=None):
    """Local folder for a model path or Hub id (downloaded to the HF cache, or read from it).

    Raises UserError when the model cannot be found. With HF_HUB_OFFLINE=1 only the local
    cache is consulted, so no network call is made.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"--pretrained_model_name_or_path {name_or_path!r}: no such model folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name_or_path,
            revision=revision,
            allow_patterns=["*.json", "*.txt", "*.msgpack", "*.safetensors", "*.bin", "*.model"],
            ignore_patterns=["*.fp16.*", "*.non_ema.*", "*.ckpt", "safety_checker/*", "*/*.onnx"],
        )
    except Exception as err:  # network down, offline mode, unknown repo, wrong revision
        raise UserError(
            f"--pretrained_model_name_or_path {name_or_path!r}: not a local folder and could not be "
            f"fetched from the Hugging Face Hub ({type(err).__name__}); pass a local model folder"
        ) from None


def check_model_dir(model_dir, tokenizer_dir=None):
    """Raise UserError naming every missing component of a Stable Diffusion folder."""
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(model_dir, c))]
    if tokenizer_dir is None and not os.path.isdir(os.path.join(model_dir, "tokenizer")):
        missing.append("tokenizer")
    if missing:
        raise UserError(
            f"{model_dir}: not a Stable Diffusion model folder (missing {', '.join(missing)}/); "
            "expected unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )


# --------------------------------------------------------------------------------------------
# Weights


class _AsNumpy:
    """Gives a numpy array the `.numpy()` that diffusers' converter calls on torch tensors."""

    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array


class _ShapesOnly:
    """Stands in for a Flax model in the diffusers and transformers converters, which only need
    parameter shapes: `jax.eval_shape` gives them without a random-init copy of the model."""

    def __init__(self, model, init_weights, base_model_prefix=None):
        self.shapes = jax.eval_shape(init_weights, jax.random.PRNGKey(0))
        self.base_model_prefix = base_model_prefix

    def init_weights(self, rng):  # diffusers' converter
        return self.shapes

    @property
    def params(self):  # transformers' converter
        return self.shapes


def _float32_numpy(params, shapes, folder):
    """Host numpy float32 params; UserError if the checkpoint misses any weight of the model."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat, want = flatten_dict(params), flatten_dict(shapes)
    missing = sorted(".".join(k) for k in set(want) - set(flat))
    if missing:
        raise UserError(f"{folder}: checkpoint lacks {len(missing)} weights of this model, e.g. {missing[0]}")
    wrong = sorted(".".join(k) for k in want if np.shape(flat[k]) != tuple(want[k].shape))
    if wrong:
        k = tuple(wrong[0].split("."))
        raise UserError(
            f"{folder}: weight {wrong[0]} has shape {tuple(np.shape(flat[k]))}, but config.json needs "
            f"{tuple(want[k].shape)} ({len(wrong)} wrong in all); the weights and config.json do not belong together"
        )
    return unflatten_dict({k: np.asarray(flat[k], dtype=np.float32) for k in want})


def _read_config(folder, name="config.json"):
    return files.read_json(os.path.join(folder, name), "a JSON config file")


def _converted(path, convert):
    """`convert()` (a PyTorch -> Flax weight conversion) with a failure named after `path`."""
    with files.reading(path, "weights that fit this folder's config.json",
                       "the weights and config.json must come from the same model; download them again"):
        return convert()


def _load_diffusers_params(cls, folder):
    """(module, float32 numpy params) of a diffusers Flax model from msgpack, safetensors or .bin."""
    config_path = os.path.join(folder, "config.json")
    config = _read_config(folder)
    with files.reading(config_path, f"a {cls.__name__.replace('Flax', '')} config"):
        model = cls.from_config(config)
        shapes = _ShapesOnly(model, model.init_weights)
    msgpack = os.path.join(folder, "diffusion_flax_model.msgpack")
    safetensors = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    bin_file = os.path.join(folder, "diffusion_pytorch_model.bin")
    if os.path.exists(msgpack):
        params = files.read_msgpack(msgpack)
        source = msgpack
    elif os.path.exists(safetensors):
        state = files.read_safetensors(safetensors)
        params = _converted(safetensors, lambda: convert_pytorch_state_dict_to_flax(
            {k: _AsNumpy(v) for k, v in state.items()}, shapes))
        source = safetensors
    elif os.path.exists(bin_file):
        _require_torch(folder)
        state = _state_dict(files.read_torch(bin_file), bin_file)
        params = _converted(bin_file, lambda: convert_pytorch_state_dict_to_flax(
            {k: _AsNumpy(v) for k, v in state.items()}, shapes))
        source = bin_file
    else:
        raise UserError(
            f"{folder}: no weights found (expected diffusion_flax_model.msgpack, "
            "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin)"
        )
    return model, _float32_numpy(params, shapes.shapes, source)


def _state_dict(data, path):
    """A PyTorch state dict {name: array} read from `path`, or DamagedFile."""
    if not isinstance(data, dict) or not all(isinstance(v, np.ndarray) for v in data.values()):
        raise files.DamagedFile(path, "not a PyTorch state dict of tensors")
    return data


def _require_torch(folder):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError(f"{folder}: only PyTorch .bin weights found; reading them needs `pip install torch`") from None


def _load_text_params(folder):
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax as convert_text

    config_path = os.path.join(folder, "config.json")
    data = _read_config(folder)
    if data.get("model_type") == "clip" and isinstance(data.get("text_config"), dict):
        data = data["text_config"]  # a whole CLIPModel's config: its text part
    with files.reading(config_path, "a CLIP text model config"):
        config = CLIPTextConfig.from_dict(data)
        model = FlaxCLIPTextModel(config, _do_init=False)
        shapes = _ShapesOnly(model, lambda rng: model.init_weights(rng, model.input_shape), model.base_model_prefix)
    names = set(files.list_folder(folder))
    if "flax_model.msgpack" in names:
        source = os.path.join(folder, "flax_model.msgpack")
        params = files.read_msgpack(source)
        if "text_model" not in params and isinstance(params.get(model.base_model_prefix), dict):
            params = params[model.base_model_prefix]
    elif "model.safetensors" in names:
        source = os.path.join(folder, "model.safetensors")
        state = files.read_safetensors(source)
        params = _converted(source, lambda: convert_text(state, shapes))
    elif "pytorch_model.bin" in names:
        _require_torch(folder)
        source = os.path.join(folder, "pytorch_model.bin")
        state = _state_dict(files.read_torch(source), source)
        params = _converted(source, lambda: convert_text(state, shapes))
    else:
        raise UserError(f"{folder}: no text encoder weights (flax_model.msgpack, model.safetensors or pytorch_model.bin)")
    return config, _float32_numpy(params, shapes.shapes, source)


# --------------------------------------------------------------------------------------------
# The frozen model, as static definitions plus a pytree of weights


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything static about a model: hashable, so a compiled step can be cached by it.

    Configs are kept as JSON strings; the Flax modules are rebuilt from them where needed
    (building a linen module is cheap, and linen modules themselves are not hashable).
    """

    text_config: str
    unet_config: str
    vae_config: str
    prediction_type: str
    scaling_factor: float
    num_train_timesteps: int
    base_vocab_size: int
    dtype: str = "float32"  # compute dtype of the frozen modules ("bfloat16" for --mixed_precision bf16)
    remat: bool = False  # rematerialise the UNet's blocks in the backward pass (--gradient_checkpointing)
    attention: str = "dense"  # "chunked": the UNet's attention in query chunks (see ATTENTION)

    @property
    def hidden_size(self):
        return json.loads(self.text_config)["hidden_size"]

    @property
    def vae_scale_factor(self):
        return 2 ** (len(json.loads(self.vae_config)["block_out_channels"]) - 1)

    @property
    def pixel_multiple(self):
        """Image sides must be multiples of this: Flax's UNet upsamples by exactly 2, so every
        downsampling of the latents (VAE factor, then each UNet down block) must divide evenly."""
        down = len(json.loads(self.unet_config)["down_block_types"])
        return self.vae_scale_factor * 2 ** (down - 1)


@dataclasses.dataclass
class LoadedModel:
    """A loaded Stable Diffusion model: static spec, host-side weights, tokenizer, noise table."""

    spec: ModelSpec
    params: dict  # {"text_encoder": ..., "unet": ..., "vae": ...}, numpy arrays
    tokenizer: CLIPTokenizer
    alphas_cumprod: np.ndarray  # [num_train_timesteps] float32
    model_dir: str
    scheduler_config: dict


def load_model(name_or_path, revision=None, tokenizer_name=None):
    """Load tokenizer, text encoder, UNet, VAE and noise schedule of a Stable Diffusion model."""
    model_dir = resolve_model_dir(name_or_path, revision)
    tokenizer_dir = resolve_model_dir(tokenizer_name, revision) if tokenizer_name else None
    check_model_dir(model_dir, tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir or os.path.join(model_dir, "tokenizer"))
    text_config, text_params = _load_text_params(os.path.join(model_dir, "text_encoder"))
    unet, unet_params = _load_diffusers_params(FlaxUNet2DConditionModel, os.path.join(model_dir, "unet"))
    vae, vae_params = _load_diffusers_params(FlaxAutoencoderKL, os.path.join(model_dir, "vae"))
    scheduler_file = os.path.join(model_dir, "scheduler", "scheduler_config.json")
    scheduler_config = files.read_json(scheduler_file, "a JSON config file")
    with files.reading(scheduler_file, "a noise scheduler config"):
        alphas_cumprod = noise_schedule(scheduler_config)
    if text_config.vocab_size != len(tokenizer):
        raise UserError(
            f"{model_dir}: tokenizer has {len(tokenizer)} tokens but the text encoder has "
            f"{text_config.vocab_size} rows; use the tokenizer that belongs to this model"
        )
    spec = ModelSpec(
        text_config=_config_json(text_config.to_dict()),
        unet_config=_config_json(unet.config),
        vae_config=_config_json(vae.config),
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
        scaling_factor=float(vae.config.scaling_factor),
        num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        base_vocab_size=int(text_config.vocab_size),
    )
    if spec.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"{model_dir}: scheduler prediction_type {spec.prediction_type!r} is not supported")
    params = {"text_encoder": text_params, "unet": unet_params, "vae": vae_params}
    return LoadedModel(spec, params, tokenizer, alphas_cumprod, model_dir, dict(scheduler_config))


def _config_json(config):
    # Private keys vary between processes (diffusers' `_use_default_values` is a set's order).
    skip = ("transformers_version", "architectures")
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_") and k not in skip}, sort_keys=True)


def spec_from_configs(text_config, unet_config, vae_config, prediction_type="epsilon", num_train_timesteps=1000):
    """A ModelSpec from config dicts (a model's config.json contents), with no weights anywhere.

    For measuring a model's step (shapes, FLOPs, memory) without downloading it.
    """
    text = CLIPTextConfig.from_dict(dict(text_config))
    unet = FlaxUNet2DConditionModel.from_config(dict(unet_config))
    vae = FlaxAutoencoderKL.from_config(dict(vae_config))
    return ModelSpec(
        text_config=_config_json(text.to_dict()),
        unet_config=_config_json(unet.config),
        vae_config=_config_json(vae.config),
        prediction_type=prediction_type,
        scaling_factor=float(vae.config.scaling_factor),
        num_train_timesteps=int(num_train_timesteps),
        base_vocab_size=int(text.vocab_size),
    )


def abstract_params(spec):
    """{"text_encoder", "unet", "vae"}: float32 jax.ShapeDtypeStruct trees, computed by
    `jax.eval_shape` of the models' initialisers, so nothing is allocated."""
    key = jax.random.PRNGKey(0)
    text = FlaxCLIPTextModel(CLIPTextConfig.from_dict(json.loads(spec.text_config)), _do_init=False)
    unet = FlaxUNet2DConditionModel.from_config(json.loads(spec.unet_config))
    vae = FlaxAutoencoderKL.from_config(json.loads(spec.vae_config))
    return {
        "text_encoder": jax.eval_shape(lambda k: text.init_weights(k, text.input_shape), key),
        "unet": jax.eval_shape(unet.init_weights, key),
        "vae": jax.eval_shape(vae.init_weights, key),
    }


TOKENIZER_FILES = ("vocab.json", "merges.txt")
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(folder):
    """A CLIP tokenizer from `folder`; DamagedFile naming the file when one of them is damaged."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such tokenizer folder")
    vocab_file = os.path.join(folder, "vocab.json")
    vocab = files.read_json(vocab_file, "a CLIP vocabulary (JSON)")
    bad = [k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)]
    if not vocab or bad:
        raise files.DamagedFile(vocab_file, "not a CLIP vocabulary (expected {token: id} with integer ids)")
    files.read_text(os.path.join(folder, "merges.txt"), "a BPE merges text file")
    for name in TOKENIZER_CONFIGS:
        if os.path.exists(os.path.join(folder, name)):
            files.read_json(os.path.join(folder, name), "a JSON tokenizer config")
    with files.reading(folder, "a CLIP tokenizer folder (vocab.json, merges.txt)"):
        return CLIPTokenizer.from_pretrained(folder)


def noise_schedule(scheduler_config):
    """alphas_cumprod of the model's training noise schedule, as diffusers computes it."""
    scheduler = FlaxDDPMScheduler.from_config(dict(scheduler_config))
    return np.asarray(scheduler.create_state().common.alphas_cumprod, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Modules built from a spec


@functools.lru_cache(maxsize=None)
def _modules(spec):
    dtype = jnp.dtype(spec.dtype)
    text = FlaxCLIPTextModel(CLIPTextConfig.from_dict(json.loads(spec.text_config)), dtype=dtype, _do_init=False)
    unet_class = _RematUNet if spec.remat else FlaxUNet2DConditionModel
    unet = unet_class.from_config(json.loads(spec.unet_config), dtype=dtype)
    vae = FlaxAutoencoderKL.from_config(json.loads(spec.vae_config), dtype=dtype)
    return text.module, unet, vae


# --attention: how the UNet computes attention. Same weights, same result within float rounding.
#   dense    one [tokens, tokens] score matrix per head (diffusers' default): few large kernels,
#            what XLA runs best on TPU and GPU, and what XLA's cost analysis counts exactly.
#   chunked  ATTENTION_CHUNK queries at a time under lax.map, each chunk rematerialised: a score
#            block stays in cache and no score matrix is kept for the backward pass. On a CPU a
#            UNet step at 1024+ tokens is bound by passes over the score matrices, and this is
#            ~1.5x faster there (scripts/benchmark.py); on any backend it cuts activation memory.
#   auto     chunked on CPU, dense on TPU and GPU.
ATTENTION = ("auto", "dense", "chunked")
ATTENTION_CHUNK = 256


def chunked_attention(query, key, value, scale, chunk=ATTENTION_CHUNK):
    """softmax(query key^T * scale) value for [batch * heads, tokens, dim] inputs, `chunk` queries
    at a time; the backward pass recomputes each chunk's scores instead of storing them."""
    batch, num_q, dim = query.shape
    if num_q <= chunk or num_q % chunk:
        chunk = num_q

    @jax.checkpoint
    def attend(q):
        scores = jnp.einsum("bid,bjd->bij", q, key) * scale
        return jnp.einsum("bij,bjd->bid", nn.softmax(scores, axis=-1), value)

    if chunk == num_q:
        return attend(query)
    chunks = jnp.swapaxes(query.reshape(batch, num_q // chunk, chunk, dim), 0, 1)
    out = jax.lax.map(attend, chunks)
    return jnp.swapaxes(out, 0, 1).reshape(batch, num_q, value.shape[-1])


def _chunked_attention_interceptor(next_fun, args, kwargs, context):
    # Runs diffusers' FlaxAttention with its own projections and weights, and chunked_attention
    # in place of its dense score matrix.
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, FlaxAttention):
        return next_fun(*args, **kwargs)
    hidden_states, rest = args[0], dict(zip(("context", "deterministic"), args[1:]), **kwargs)
    context_states = rest.get("context")
    context_states = hidden_states if context_states is None else context_states
    q, k, v = (
        module.reshape_heads_to_batch_dim(proj(x))
        for proj, x in ((module.query, hidden_states), (module.key, context_states), (module.value, context_states))
    )
    out = module.reshape_batch_dim_to_heads(chunked_attention(q, k, v, module.scale))
    return module.dropout_layer(module.proj_attn(out), deterministic=rest.get("deterministic", True))


def _exact_geglu_interceptor(next_fun, args, kwargs, context):
    # diffusers' Flax GEGLU gates with jax.nn.gelu's default tanh approximation; the PyTorch
    # UNet every user samples with uses the exact (erf) GELU. The approximation moved the row
    # gradient 1.3e-4 (relative) away from PyTorch autograd's on the tiny models.
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, FlaxGEGLU):
        return next_fun(*args, **kwargs)
    hidden_linear, hidden_gelu = jnp.split(module.proj(args[0]), 2, axis=2)
    return hidden_linear * nn.gelu(hidden_gelu, approximate=False)


def _unet_interceptor(next_fun, args, kwargs, context):
    return _exact_geglu_interceptor(next_fun, args, kwargs, context)


def _chunked_unet_interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, FlaxGEGLU):
        return _exact_geglu_interceptor(next_fun, args, kwargs, context)
    return _chunked_attention_interceptor(next_fun, args, kwargs, context)


def resolve_attention(name, backend=None):
    """"dense" or "chunked" for an --attention value ("auto" picks by the JAX backend)."""
    if name != "auto":
        return name
    return "chunked" if (backend or jax.default_backend()) == "cpu" else "dense"


@functools.lru_cache(maxsize=None)
def _remat_class(block_class):
    return nn.remat(block_class)


def _remat_block(block):
    """A copy of an (unbound) UNet block whose __call__ is rematerialised: same fields, same params."""
    fields = {f.name: getattr(block, f.name) for f in dataclasses.fields(block) if f.init and f.name not in ("parent", "name")}
    return _remat_class(type(block))(**fields)


@flax_register_to_config
class _RematUNet(FlaxUNet2DConditionModel):
    """diffusers' Flax UNet with each down, mid and up block under `flax.linen.remat`.

    The backward pass recomputes a block's activations from its input instead of keeping them:
    less activation memory for more compute. diffusers' Flax UNet has no such option and builds
    its blocks in `setup()`, so the blocks are swapped as setup assigns them. The remat'ed
    classes subclass the originals (the UNet's isinstance dispatch still works) and keep their
    attribute names, so the parameter tree is the same as the plain UNet's.
    """

    def __setattr__(self, name, value):
        if name in ("down_blocks", "up_blocks"):
            value = [_remat_block(block) for block in value]
        elif name == "mid_block" and value is not None:
            value = _remat_block(value)
        super().__setattr__(name, value)


def cast_params(params, dtype):
    """A copy of a host params tree with every float leaf cast to `dtype` (e.g. "bfloat16")."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        x = np.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree_util.tree_map(cast, params)


def token_table(text_params):
    """The text encoder's [vocab, hidden] token-embedding table."""
    return text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]


def with_token_table(text_params, table):
    """A copy of the text-encoder params with the token table replaced (the rest shared)."""
    out = jax.tree_util.tree_map(lambda x: x, text_params)  # new containers, same leaves
    out["text_model"]["embeddings"]["token_embedding"]["embedding"] = table
    return out


def encode_text(spec, text_params, input_ids, rows):
    """CLIP last hidden state [B, L, D] for ids that may include the learned tokens.

    Ids below `spec.base_vocab_size` read the frozen table; ids at or above it read
    `rows[id - base_vocab_size]`. The table is never copied or grown, so the only gradient
    the caller can take is the one with respect to `rows` ([num_vectors, D]).
    """
    text_module, _, _ = _modules(spec)
    table = token_table(text_params)
    base = spec.base_vocab_size
    is_new = input_ids >= base
    frozen = jnp.take(table, jnp.where(is_new, 0, input_ids), axis=0)
    learned = jnp.take(rows.astype(table.dtype), jnp.where(is_new, input_ids - base, 0), axis=0)
    token_embeds = jnp.where(is_new[..., None], learned, frozen)
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)

    def run(module):
        tm = module.text_model
        hidden = token_embeds + tm.embeddings.position_embedding(positions)
        mask = jnp.ones_like(input_ids)
        out = tm.encoder(inputs_embeds=hidden, attention_mask=mask, deterministic=True, return_dict=False)
        return tm.final_layer_norm(out[0])

    return text_module.apply({"params": text_params}, method=run)


def predict_noise(spec, unet_params, latents, timesteps, encoder_hidden_states):
    """UNet output for NCHW latents (epsilon or v, per the model's prediction_type)."""
    _, unet, _ = _modules(spec)
    interceptor = _chunked_unet_interceptor if spec.attention == "chunked" else _unet_interceptor
    with nn.intercept_methods(interceptor):
        out = unet.apply({"params": unet_params}, latents, jnp.asarray(timesteps), encoder_hidden_states, train=False)
    return out.sample


def vae_moments(spec, vae_params, pixels_nchw):
    """Mean and log-variance (NHWC) of the VAE posterior for pixels in [-1, 1], NCHW."""
    _, _, vae = _modules(spec)
    dist = vae.apply({"params": vae_params}, pixels_nchw, deterministic=True, method=vae.encode).latent_dist
    return dist.mean, dist.logvar


def decode_latents(spec, vae_params, latents_nchw):
    """Pixels in about [-1, 1], NCHW, from NCHW latents scaled the way the UNet sees them."""
    _, _, vae = _modules(spec)
    return vae.apply({"params": vae_params}, latents_nchw / spec.scaling_factor, method=vae.decode).sample


# --scheduler name -> diffusers Flax scheduler class. Each one runs inside jax.lax.fori_loop
# on current jax (FlaxDDPMScheduler's step does not: it calls jnp.clip(a_min=...)).
SAMPLING_SCHEDULERS = {
    "pndm": "FlaxPNDMScheduler",
    "ddim": "FlaxDDIMScheduler",
    "dpm": "FlaxDPMSolverMultistepScheduler",
    "euler": "FlaxEulerDiscreteScheduler",
}
# The timestep_spacing values each Flax scheduler implements (pndm and ddim ignore the key).
_SPACINGS = {"dpm": ("linspace", "leading", "trailing"), "euler": ("linspace", "leading")}


def flax_scheduler(name, scheduler_config):
    """The diffusers Flax scheduler `name` (a key of SAMPLING_SCHEDULERS) for a model's config."""
    import diffusers

    if name not in SAMPLING_SCHEDULERS:
        raise UserError(f"--scheduler {name!r}: choose one of {', '.join(SAMPLING_SCHEDULERS)}")
    spacing = scheduler_config.get("timestep_spacing")
    if name in _SPACINGS and spacing is not None and spacing not in _SPACINGS[name]:
        raise UserError(
            f"--scheduler {name}: this model's scheduler config asks for timestep_spacing {spacing!r}, "
            f"which diffusers' Flax {name} scheduler lacks; use --scheduler pndm or ddim"
        )
    return getattr(diffusers, SAMPLING_SCHEDULERS[name]).from_config(dict(scheduler_config))


# --------------------------------------------------------------------------------------------
# Saving a whole pipeline


def _flax_scheduler(scheduler_config):
    import diffusers

    name = scheduler_config.get("_class_name", "PNDMScheduler").replace("Flax", "")
    cls = getattr(diffusers, "Flax" + name, None) or diffusers.FlaxPNDMScheduler
    return cls.from_config(dict(scheduler_config))


def save_pipeline(model, tokenizer, rows, out_dir):
    """Save a FlaxStableDiffusionPipeline whose tokenizer and text encoder hold the new tokens."""
    from diffusers import FlaxStableDiffusionPipeline

    from ..tokens import merged_table

    spec = model.spec
    table = merged_table(token_table(model.params["text_encoder"]), rows)
    config = CLIPTextConfig.from_dict(json.loads(spec.text_config))
    config.vocab_size = table.shape[0]  # the grown table does not fit the old config
    text = FlaxCLIPTextModel(config, _do_init=False)
    _, unet, vae = _modules(spec)
    pipe = FlaxStableDiffusionPipeline(
        text_encoder=text,
        vae=vae,
        unet=unet,
        tokenizer=tokenizer,
        scheduler=_flax_scheduler(model.scheduler_config),
        safety_checker=None,  # diffusers 0.39's Flax safety checker crashes on current jax
        feature_extractor=None,
    )
    params = {
        "text_encoder": with_token_table(model.params["text_encoder"], table),
        "unet": model.params["unet"],
        "vae": model.params["vae"],
    }
    pipe.save_pretrained(out_dir, params=params)
    return out_dir
