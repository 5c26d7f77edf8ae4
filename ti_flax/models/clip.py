"""The CLIP text encoders of Stable Diffusion as pure functions over PyTorch-named weights.

Covers what transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` compute for the
encoders SD uses: CLIP ViT-L/14 (SD 1.x, SDXL `text_encoder`), OpenCLIP ViT-H in transformers
layout (SD 2.x) and OpenCLIP bigG with `text_projection` (SDXL `text_encoder_2`).

Weights are the transformers state dict as a nested dict (`params["text_model"]["encoder"]
["layers"]["0"]["self_attn"]["q_proj"]["weight"]`, Linear weights [out, in]); see weights.py.
The forward pass is a pre-LayerNorm transformer with a causal mask over all positions (SD passes
no padding mask), returning every output an SD pipeline reads (see `TextOutputs`).

Learned tokens (textual inversion) never grow the frozen table: `embed_tokens` reads ids at or
above `base_vocab_size` from a separate `rows` array, so a gradient is taken w.r.t. `rows` only.
"""

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ..errors import UserError
from . import layers

# config.json "architectures" entry that means the model carries `text_projection`.
_PROJECTION_ARCHITECTURE = "CLIPTextModelWithProjection"

# transformers' ACT2FN names that CLIP text configs use, as jnp functions.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP (SD 1.x, SDXL encoder 1)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf GELU (OpenCLIP: SD 2.x, bigG)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The static description of one text encoder; hashable, so it can be a jit static argument.

    Defaults are transformers' `CLIPTextConfig` constructor defaults. `with_projection` is True for
    `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`), which adds `text_projection.weight`.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407
    with_projection: bool = False

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise UserError(
                f"text encoder config: hidden_act {self.hidden_act!r} is not supported "
                f"(supported: {', '.join(sorted(_ACTIVATIONS))})"
            )
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"text encoder config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_hidden_layers < 1:
            raise UserError("text encoder config: num_hidden_layers must be at least 1")

    @classmethod
    def from_dict(cls, d):
        """From a transformers text-encoder config.json dict; unknown keys are ignored.

        The projection variant is told by `architectures` (CLIPTextModelWithProjection), or by a
        `with_projection` key if present.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"with_projection"}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        with_projection = d.get("with_projection")
        if with_projection is None:
            with_projection = _PROJECTION_ARCHITECTURE in (d.get("architectures") or [])
        return cls(**kwargs, with_projection=bool(with_projection))

    def to_dict(self):
        """A transformers-readable config.json dict (`from_dict(to_dict())` round-trips)."""
        d = dataclasses.asdict(self)
        del d["with_projection"]
        d["architectures"] = [_PROJECTION_ARCHITECTURE if self.with_projection else "CLIPTextModel"]
        d["model_type"] = "clip_text_model"
        return d


class TextOutputs(NamedTuple):
    """What `encode` returns (a pytree; fields are arrays in the compute dtype, or None).

    last_hidden_state: [B, L, D] after final_layer_norm (SD 1.x / 2.x conditioning).
    penultimate: [B, L, D] output of the second-to-last encoder layer, no final_layer_norm
        (transformers' hidden_states[-2]; SDXL conditioning from both encoders).
    pooled: [B, D] final-LayerNormed state at the EOS position (transformers' pooler_output).
    text_embeds: [B, projection_dim] = pooled @ text_projection.T, or None without projection
        (SDXL's pooled text embedding from text_encoder_2).
    """

    last_hidden_state: jax.Array
    penultimate: jax.Array
    pooled: jax.Array
    text_embeds: Optional[jax.Array]


def param_shapes(config):
    """{"dotted.name": shape} of the transformers state dict, computed from `config` alone.

    The `text_model.embeddings.position_ids` buffer is non-persistent in current transformers
    (not in the state dict, not a weight), so it is not listed; `component_weights.load_component`
    drops it from old files.
    """
    d, f = config.hidden_size, config.intermediate_size
    shapes = {
        "text_model.embeddings.token_embedding.weight": (config.vocab_size, d),
        "text_model.embeddings.position_embedding.weight": (config.max_position_embeddings, d),
        "text_model.final_layer_norm.weight": (d,),
        "text_model.final_layer_norm.bias": (d,),
    }
    for i in range(config.num_hidden_layers):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{p}self_attn.{proj}.bias"] = (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = (d,)
            shapes[f"{p}{norm}.bias"] = (d,)
        shapes[f"{p}mlp.fc1.weight"] = (f, d)
        shapes[f"{p}mlp.fc1.bias"] = (f,)
        shapes[f"{p}mlp.fc2.weight"] = (d, f)
        shapes[f"{p}mlp.fc2.bias"] = (d,)
    if config.with_projection:
        shapes["text_projection.weight"] = (config.projection_dim, d)  # Linear without bias
    return shapes


def token_table(params):
    """The frozen [vocab, hidden] token-embedding table (e.g. to initialise learned rows)."""
    return params["text_model"]["embeddings"]["token_embedding"]["weight"]


def embed_tokens(params, config, input_ids, rows=None, base_vocab_size=None, dtype=jnp.float32):
    """Token embeddings [B, L, D] in `dtype` (position embeddings NOT added; `encode` adds them).

    Ids below `base_vocab_size` (default: the frozen table's length) read the frozen table; ids at
    or above it read `rows[id - base_vocab_size]` ([num_new, D]). The table is never grown or
    copied, so the only gradient a caller can take is w.r.t. `rows`. `rows=None` is a plain lookup.
    """
    del config  # the shapes come from the arrays; kept for the common f(params, config, ...) form
    return layers.embedding_with_rows(token_table(params), input_ids, rows, base_vocab_size, dtype)


def _self_attention(x, attn, config, dtype):
    """Causal multi-head self-attention over [B, L, D]; scores and softmax in float32."""
    b, length, d = x.shape
    heads = config.num_attention_heads
    head_dim = d // heads

    def split(name):
        return layers.linear(attn[name], x).reshape(b, length, heads, head_dim)

    q, k, v = split("q_proj"), split("k_proj"), split("v_proj")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    # CLIP's text transformer is causal: position i sees positions <= i. The diagonal is always
    # visible, so no row is fully masked and the finite fill keeps gradients NaN-free.
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, d)
    return layers.linear(attn["out_proj"], out)


def _encoder_layer(x, layer, config, dtype):
    """One pre-LN block: x + attn(LN1(x)), then + fc2(act(fc1(LN2(x))))."""
    eps = config.layer_norm_eps
    x = x + _self_attention(layers.layer_norm(layer["layer_norm1"], x, eps), layer["self_attn"], config, dtype)
    h = layers.linear(layer["mlp"]["fc1"], layers.layer_norm(layer["layer_norm2"], x, eps))
    h = layers.linear(layer["mlp"]["fc2"], _ACTIVATIONS[config.hidden_act](h))
    return x + h


def eos_positions(config, input_ids):
    """[B] index of the token whose final state is pooled, by transformers' rule.

    Configs with the legacy `eos_token_id == 2` (SD 1.x, SD 2.x and SDXL configs all ship it)
    take `argmax(input_ids)`, i.e. the highest id, which is the EOS token (49407) for the base
    vocabulary. With learned tokens (ids >= 49408) in the prompt that argmax picks the learned
    token's position instead; transformers does the same with a grown table, and we keep parity
    with it. Other configs take the first position equal to `eos_token_id`.
    """
    if config.eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == config.eos_token_id, axis=-1)


def encode(params, config, input_ids, rows=None, *, base_vocab_size=None, dtype=jnp.float32):
    """Run the text encoder on int ids [B, L] (L <= max_position_embeddings); see `TextOutputs`.

    `rows` / `base_vocab_size` as in `embed_tokens`. Activations are in `dtype`; parameters are
    used as given (the caller casts them, e.g. to bf16) and cast per use to `dtype`. Jit with
    `config` (and `base_vocab_size`, `dtype`) static; outputs the caller does not use (e.g. the
    last layer when only `penultimate` is read) are dropped by XLA's dead-code elimination.
    """
    length = input_ids.shape[-1]
    if length > config.max_position_embeddings:
        raise UserError(
            f"text encoder: sequence length {length} exceeds max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    tm = params["text_model"]
    positions = tm["embeddings"]["position_embedding"]["weight"][:length].astype(dtype)
    hidden = embed_tokens(params, config, input_ids, rows, base_vocab_size, dtype) + positions

    encoder_layers = tm["encoder"]["layers"]
    penultimate = hidden  # transformers' hidden_states[-2]: the input of the last layer
    for i in range(config.num_hidden_layers):
        if i == config.num_hidden_layers - 1:
            penultimate = hidden
        hidden = _encoder_layer(hidden, encoder_layers[str(i)], config, dtype)

    last = layers.layer_norm(tm["final_layer_norm"], hidden, config.layer_norm_eps)
    pooled = jnp.take_along_axis(last, eos_positions(config, input_ids)[:, None, None], axis=1)[:, 0]
    text_embeds = None
    if config.with_projection:
        text_embeds = layers.linear(params["text_projection"], pooled)
    return TextOutputs(last, penultimate, pooled, text_embeds)
