"""The T5 text encoder of FLUX.1 (its `text_encoder_2`, T5-XXL v1.1) as pure functions over PyTorch-named weights.

Covers what transformers' `T5EncoderModel(...).last_hidden_state` computes: token embeddings, then
`num_layers` pre-RMSNorm blocks of bidirectional self-attention with a learned relative-position
bias (computed by block 0, shared by every block) and a feed-forward (gated-GELU for T5 v1.1 /
T5-XXL, ReLU for the original T5), then a final RMSNorm. T5 adds no position embeddings and does
not scale q.k by 1/sqrt(d_kv) (the scale is folded into the init). FLUX passes no attention mask
(diffusers' FluxPipeline calls `text_encoder_2(ids)` on ids padded to max_sequence_length), so no
mask is the default; an optional [B, L] padding mask is supported for parity with transformers.

Weights are the transformers state dict as a nested dict (`params["encoder"]["block"]["0"]
["layer"]["0"]["SelfAttention"]["q"]["weight"]`, Linear weights [out, in], no biases anywhere);
see weights.py and `param_shapes`. The token table is `shared.weight`: transformers ties
`encoder.embed_tokens.weight` to it and does not save the copy, so `canonical_names` folds a file
that carries only the copy (or both) onto `shared.weight`.

Learned tokens (textual inversion) never grow or copy the frozen table: ids at or above
`base_vocab_size` read a separate `rows` array, so the only gradient a caller takes is w.r.t.
`rows`. T5-XXL's table has 32128 rows but its tokenizer only 32100 tokens, so `base_vocab_size`
(the tokenizer's length) may be below the table's length: ids in [base_vocab_size, table rows)
read `rows` too, never the table's unused rows.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError
from . import layers

# feed_forward_proj -> (gated, activation), as transformers' T5Config derives dense_act_fn and
# is_gated_act from it ("gated-gelu" means gelu_new, the tanh approximation, for backwards
# compatibility with T5 v1.1 checkpoints; plain "gelu" would be the erf GELU).
_FEED_FORWARD = {
    "gated-gelu": (True, lambda x: jax.nn.gelu(x, approximate=True)),  # T5 v1.1, T5-XXL (FLUX)
    "relu": (False, jax.nn.relu),  # the original T5
}

# The name of the one token table this module reads, and the tied copy transformers may list.
TABLE = "shared.weight"
TIED_COPY = "encoder.embed_tokens.weight"


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The static description of one T5 encoder; hashable, so it can be a jit static argument.

    Defaults are transformers' `T5Config` constructor defaults (t5-small); FLUX's T5-XXL config.json
    sets d_model 4096, d_kv 64, d_ff 10240, num_layers 24, num_heads 64, gated-gelu.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        if self.feed_forward_proj not in _FEED_FORWARD:
            raise UserError(
                f"T5 encoder config: feed_forward_proj {self.feed_forward_proj!r} is not supported "
                f"(supported: {', '.join(sorted(_FEED_FORWARD))})"
            )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"T5 encoder config: {name} must be a positive integer, not {getattr(self, name)!r}")
        # Bidirectional bucketing halves the buckets per direction and keeps half of those exact;
        # the log buckets need at least one exact bucket and a max distance beyond it.
        exact = self.relative_attention_num_buckets // 4
        if exact < 1 or self.relative_attention_max_distance <= exact:
            raise UserError(
                f"T5 encoder config: relative_attention_num_buckets {self.relative_attention_num_buckets} / "
                f"relative_attention_max_distance {self.relative_attention_max_distance} give no log buckets "
                "(need at least 4 buckets and a max distance above a quarter of them)"
            )

    @classmethod
    def from_dict(cls, d):
        """From a transformers T5 config.json dict (T5EncoderModel or T5 v1.1); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(d[k]) if isinstance(d[k], list) else d[k] for k in names if d.get(k) is not None}
        return cls(**kwargs)

    def to_dict(self):
        """A transformers-readable config.json dict (`from_dict(to_dict())` round-trips)."""
        d = dataclasses.asdict(self)
        d["architectures"] = ["T5EncoderModel"]
        d["model_type"] = "t5"
        return d

    @property
    def hidden_size(self):
        """The encoder's width (d_model), named as the CLIP configs name theirs."""
        return self.d_model

    @property
    def inner_dim(self):
        """Width of q, k, v (num_heads * d_kv; equals d_model for T5-XXL but need not)."""
        return self.num_heads * self.d_kv


def param_shapes(config):
    """{"dotted.name": shape} of the weights `encode` reads, computed from `config` alone.

    These are `T5EncoderModel`'s state-dict names minus `encoder.embed_tokens.weight`: that is the
    same tensor as `shared.weight` (tied), transformers' save_pretrained writes only
    `shared.weight`, and `canonical_names` maps files carrying the copy onto it.
    """
    d, inner, f = config.d_model, config.inner_dim, config.d_ff
    shapes = {TABLE: (config.vocab_size, d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(config.num_layers):
        attn = f"encoder.block.{i}.layer.0."
        for proj in ("q", "k", "v"):
            shapes[f"{attn}SelfAttention.{proj}.weight"] = (inner, d)
        shapes[f"{attn}SelfAttention.o.weight"] = (d, inner)
        if i == 0:  # only block 0 owns the relative-position bias; the others reuse its output
            shapes[f"{attn}SelfAttention.relative_attention_bias.weight"] = (
                config.relative_attention_num_buckets, config.num_heads)
        shapes[f"{attn}layer_norm.weight"] = (d,)
        ff = f"encoder.block.{i}.layer.1."
        gated, _ = _FEED_FORWARD[config.feed_forward_proj]
        for wi in ("wi_0", "wi_1") if gated else ("wi",):
            shapes[f"{ff}DenseReluDense.{wi}.weight"] = (f, d)
        shapes[f"{ff}DenseReluDense.wo.weight"] = (d, f)
        shapes[f"{ff}layer_norm.weight"] = (d,)
    return shapes


def canonical_names(state_dict):
    """A flat state dict with the token table under `shared.weight` only (see `param_shapes`).

    `encoder.embed_tokens.weight` is dropped when `shared.weight` is present (transformers ties
    them; a file listing both holds the same values) and renamed when it is the only table.
    Decoder weights, which a full T5 checkpoint carries, are not touched: `check_params` reports them.
    """
    state = dict(state_dict)
    copy = state.pop(TIED_COPY, None)
    if copy is not None and TABLE not in state:
        state[TABLE] = copy
    return state


def token_table(params):
    """The frozen [vocab_size, d_model] token-embedding table (e.g. to initialise learned rows)."""
    return params["shared"]["weight"]


def embed_tokens(params, input_ids, rows=None, base_vocab_size=None, dtype=jnp.float32):
    """Token embeddings [B, L, d_model] in `dtype`.

    Ids below `base_vocab_size` (default: the frozen table's length) read the frozen table; ids at
    or above it read `rows[id - base_vocab_size]` ([num_new, d_model]), including ids below the
    table's length (T5-XXL: 32100 tokenizer ids, 32128 table rows). The table is never grown or
    copied, so the only gradient a caller can take is w.r.t. `rows`. `rows=None` is a plain lookup.
    """
    return layers.embedding_with_rows(token_table(params), input_ids, rows, base_vocab_size, dtype)


def relative_position_buckets(length, num_buckets, max_distance):
    """[length, length] int32 bucket of (key - query) for bidirectional attention, as transformers'
    `T5Attention._relative_position_bucket(..., bidirectional=True)`.

    Plain numpy at trace time: the buckets depend only on the (static) length, so jit sees a
    constant. The log term is computed in float32 as PyTorch computes it (no difference from
    float64 was found up to 4096 positions, but a bucket edge could in principle truncate apart).
    """
    position = np.arange(length, dtype=np.int64)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half  # keys after the query use the upper half
    distance = np.abs(relative)
    exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) on the diagonal; those positions take the exact branch
        scaled = (np.log(distance.astype(np.float32) / np.float32(exact))
                  / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = exact + np.where(distance < exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)  # all distances >= max_distance share the last bucket
    buckets = buckets + np.where(distance < exact, distance, large)
    return buckets.astype(np.int32)


def position_bias(params, config, length):
    """[num_heads, L, L] float32 relative-position bias of block 0, which every block adds."""
    buckets = relative_position_buckets(length, config.relative_attention_num_buckets,
                                        config.relative_attention_max_distance)
    table = params["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"]["weight"]
    return jnp.transpose(jnp.take(table.astype(jnp.float32), buckets, axis=0), (2, 0, 1))


def rms_norm(p, x, eps):
    """transformers' T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight, no mean, no bias.

    The statistics are float32; the normalised value is cast to the activations' dtype before the
    scale is applied, which is what T5LayerNorm does in a bf16/fp16 model (it casts to the weight's
    half dtype, then multiplies in it). In float32 the order does not matter.
    """
    variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normalised = (x.astype(jnp.float32) * jax.lax.rsqrt(variance + eps)).astype(x.dtype)
    return p["weight"].astype(x.dtype) * normalised


def _self_attention(x, attn, config, bias, key_mask):
    """Bidirectional multi-head attention over [B, L, d_model]; scores and softmax in float32.

    `bias` is [H, L, L] float32; `key_mask` None or [B, L] bool (True: the key may be attended).
    No 1/sqrt(d_kv): T5 folds it into the weights.
    """
    b, length, _ = x.shape

    def split(name):
        return layers.linear(attn[name], x).reshape(b, length, config.num_heads, config.d_kv)

    q, k, v = split("q"), split("k"), split("v")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    if key_mask is not None:
        # A finite fill: a fully masked row then averages instead of giving NaN (and NaN gradients).
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, config.inner_dim)
    return layers.linear(attn["o"], out)


def _feed_forward(x, ff, config):
    """wo(act(wi_0 x) * wi_1 x) for gated configs, wo(act(wi x)) otherwise."""
    gated, act = _FEED_FORWARD[config.feed_forward_proj]
    if gated:
        h = act(layers.linear(ff["wi_0"], x)) * layers.linear(ff["wi_1"], x)
    else:
        h = act(layers.linear(ff["wi"], x))
    return layers.linear(ff["wo"], h)


def _block(x, block, config, bias, key_mask):
    """One pre-RMSNorm block: x + attn(norm(x)), then + ff(norm(x))."""
    eps = config.layer_norm_epsilon
    attn_layer, ff_layer = block["layer"]["0"], block["layer"]["1"]
    x = x + _self_attention(rms_norm(attn_layer["layer_norm"], x, eps), attn_layer["SelfAttention"], config,
                            bias, key_mask)
    return x + _feed_forward(rms_norm(ff_layer["layer_norm"], x, eps), ff_layer["DenseReluDense"], config)


def encode(params, config, input_ids, rows=None, *, base_vocab_size=None, dtype=jnp.float32,
           attention_mask=None):
    """The encoder's last hidden state [B, L, d_model] in `dtype` for int ids [B, L].

    `rows` / `base_vocab_size` as in `embed_tokens`. `attention_mask`: None (FLUX: every position,
    padding included, is attended) or [B, L] with 1 for tokens and 0 for padding keys, as
    transformers takes it. Activations are in `dtype` (a bf16 run is then what transformers computes
    with a bf16 model); parameters are used as given and cast per use to `dtype`; the norm
    statistics, attention scores, position bias and softmax are float32. Jit with `config` (and
    `base_vocab_size`, `dtype`) static; the relative-position buckets are a constant per length.
    """
    length = input_ids.shape[-1]
    bias = position_bias(params, config, length)
    key_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    hidden = embed_tokens(params, input_ids, rows, base_vocab_size, dtype)
    blocks = params["encoder"]["block"]
    for i in range(config.num_layers):
        hidden = _block(hidden, blocks[str(i)], config, bias, key_mask)
    return rms_norm(params["encoder"]["final_layer_norm"], hidden, config.layer_norm_epsilon)
