"""Parity of ti_flax.models.t5 with transformers' T5EncoderModel (FLUX.1's text_encoder_2).

A tiny random-init gated-GELU T5 v1.1 encoder (T5-XXL's shape in small: 2 blocks, 32 buckets, max
distance 128) whose table (160 rows) is larger than the tokenizer (`BASE` = 150), as T5-XXL's
32128 rows are larger than its 32100 tokens; q/k/v are 24 wide against d_model 32, so a mix-up of
num_heads * d_kv with d_model fails. Sequences are 150 long, so the exact, log and clamped
(distance >= 128) relative-position buckets are all used. What each test catches:

- test_relative_position_buckets: a wrong bucket formula (direction swapped, exact/log split
  off by one, missing clamp at max_distance) against transformers' own, up to 600 positions.
- test_forward_parity: fp32 last_hidden_state within 1e-5 of transformers, no mask (as FLUX):
  a wrong RMSNorm (mean subtracted, eps misplaced), a 1/sqrt(d_kv) scale T5 does not have, the
  erf GELU instead of gelu_new, the bias recomputed per block or transposed, a missing final norm.
  The perturbation check shows the comparison can fail and that the bias is read at all.
- test_attention_mask_parity: the optional padding mask applied to the wrong axis (queries).
- test_learned_rows_parity_and_gradient: ids in [BASE, table rows) reading the frozen table's
  unused rows instead of `rows`, ids past the table failing, a gradient leaking into other rows or
  missing (torch autograd through a copy of the table with the rows put at those ids, 1e-4 rel L2).
- test_param_shapes_match_state_dict: a weight name or shape that T5EncoderModel (and the file
  save_pretrained writes) does not have, and the tied-table handling of `canonical_names`.
- test_relu_variant_parity: the original T5's ungated ReLU feed-forward.
- test_bf16_close_to_fp32: a bf16 run that overflows, NaNs or loses the softmax.
- test_config_round_trip_and_errors: an unsupported config accepted, or its error not one line.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ti_flax.errors import UserError  # noqa: E402
from ti_flax.models import t5  # noqa: E402
from ti_flax.models.weights import flatten, unflatten  # noqa: E402

TABLE_ROWS = 160  # the model's vocab_size (T5-XXL: 32128)
BASE = 150  # the tokenizer's length (T5-XXL: 32100): learned ids start here, inside the table
PAD, EOS = 0, 1  # T5's tokenizer pads with 0 and ends with 1
LENGTH = 150  # > max_distance 128: exact, log and clamped buckets
NUM_ROWS = 12  # learned ids BASE..BASE+11: some inside the table (150..159), some past it (160, 161)
LEARNED_IDS = (BASE, BASE + 5, BASE + 11)
TOL = 1e-5
GRAD_TOL = 1e-4

TINY = dict(vocab_size=TABLE_ROWS, d_model=32, d_kv=6, num_heads=4, d_ff=64, num_layers=2,
            relative_attention_num_buckets=32, relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu")

ENCODE = jax.jit(t5.encode, static_argnums=(1,), static_argnames=("base_vocab_size", "dtype"))


@functools.lru_cache(maxsize=None)
def tiny_model(**overrides):
    """(torch model, our config, our params): built once per test session."""
    torch.manual_seed(0)
    tconfig = transformers.T5Config(**{**TINY, **overrides})
    model = transformers.T5EncoderModel(tconfig).eval()
    config = t5.T5Config.from_dict(tconfig.to_dict())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model, config, unflatten(t5.canonical_names(state))


def prompt_ids(seed, learned=False):
    """[2, LENGTH] FLUX-style ids: words, EOS, then padding to the full length (no mask)."""
    rng = np.random.default_rng(seed)
    ids = np.full((2, LENGTH), PAD, dtype=np.int64)
    for b, n_words in enumerate((20, 100)):
        ids[b, :n_words] = rng.integers(2, BASE, n_words)
        ids[b, n_words] = EOS
    if learned:
        ids[0, 3], ids[0, 4], ids[1, 60] = LEARNED_IDS
        ids[1, 90] = LEARNED_IDS[0]
    return ids


def learned_rows(config, seed):
    return np.random.default_rng(seed).normal(0, 1.0, (NUM_ROWS, config.d_model)).astype(np.float32)


def with_rows(model, rows):
    """A copy of the torch model whose table reads `rows` at ids BASE.. (grown past its 160 rows as
    needed), and that table's weight: what a PyTorch trainer would put in place of our `rows`."""
    edited = copy.deepcopy(model)
    old = edited.get_input_embeddings().weight.detach()
    table = torch.nn.Embedding(BASE + len(rows), old.shape[1])
    table.weight = torch.nn.Parameter(torch.cat([old[:BASE], torch.tensor(rows)]))
    edited.set_input_embeddings(table)
    return edited, table.weight


def torch_last(model, ids, mask=None):
    kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return model(torch.tensor(ids), **kwargs).last_hidden_state


def max_diff(ours, theirs):
    return float(np.abs(np.asarray(ours, np.float32) - theirs.detach().numpy()).max())


def loss_weights(config):
    return np.random.default_rng(6).normal(size=(2, LENGTH, config.d_model)).astype(np.float32)


def _ours_loss(rows, params, config, ids, weights):
    last = t5.encode(params, config, ids, rows, base_vocab_size=BASE)
    return jnp.sum((last * weights) ** 2), last


OURS = jax.jit(jax.value_and_grad(_ours_loss, has_aux=True), static_argnums=(2,))


# --------------------------------------------------------------------------------------------
# Relative positions


@pytest.mark.parametrize("buckets,max_distance,length", [(32, 128, 600), (32, 128, LENGTH), (8, 20, 90)])
def test_relative_position_buckets(buckets, max_distance, length):
    from transformers.models.t5.modeling_t5 import T5Attention

    position = torch.arange(length)
    relative = position[None, :] - position[:, None]  # key - query, as T5Attention.compute_bias
    want = T5Attention._relative_position_bucket(relative, True, buckets, max_distance).numpy()
    got = t5.relative_position_buckets(length, buckets, max_distance)
    np.testing.assert_array_equal(got, want)
    if length > max_distance:
        assert got.max() == buckets - 1  # the clamped bucket is reached


# --------------------------------------------------------------------------------------------
# Forward parity


def test_forward_parity():
    model, config, params = tiny_model()
    ids = prompt_ids(seed=1)
    with torch.no_grad():
        theirs = torch_last(model, ids)
    ours = ENCODE(params, config, jnp.asarray(ids))  # rows=None, no mask: FLUX's call
    diff = max_diff(ours, theirs)
    print("fp32 last_hidden_state max abs diff", diff)
    assert ours.shape == (2, LENGTH, config.d_model) and ours.dtype == jnp.float32
    assert diff <= TOL, diff

    # The comparison can fail, and the relative-position bias matters: a small change to it moves
    # the output well past TOL.
    perturbed = unflatten(flatten(params))
    bias = perturbed["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"]
    bias["weight"] = bias["weight"] + np.random.default_rng(0).normal(0, 1e-2, bias["weight"].shape).astype(np.float32)
    moved = max_diff(ENCODE(perturbed, config, jnp.asarray(ids)), theirs)
    assert moved > 100 * TOL, moved


def test_attention_mask_parity():
    model, config, params = tiny_model()
    ids = prompt_ids(seed=2)
    mask = (np.arange(LENGTH)[None] <= np.array([[20], [100]])).astype(np.int64)  # words and EOS
    with torch.no_grad():
        theirs = torch_last(model, ids, mask)
    ours = ENCODE(params, config, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    diff = max_diff(ours, theirs)
    print("masked fp32 max abs diff", diff)
    assert diff <= TOL, diff
    # The mask matters (FLUX's unmasked call differs), also at the tokens themselves.
    unmasked = np.asarray(ENCODE(params, config, jnp.asarray(ids)))
    assert np.abs(unmasked[0, :21] - np.asarray(ours)[0, :21]).max() > 100 * TOL


def test_learned_rows_parity_and_gradient():
    """Learned ids read `rows`: equal to transformers with the rows put into a copy of its table at
    those ids (grown to 162 rows for the ids past 160), and d(loss)/d(rows) equals torch autograd."""
    model, config, params = tiny_model()
    ids = prompt_ids(seed=3, learned=True)
    rows = learned_rows(config, seed=4)
    weights = loss_weights(config)
    (_, ours), grad = OURS(jnp.asarray(rows), params, config, jnp.asarray(ids), weights)
    grad = np.asarray(grad)

    edited, table = with_rows(model, rows)
    theirs = torch_last(edited, ids)
    torch.sum((theirs * torch.tensor(weights)) ** 2).backward()
    theirs_grad = table.grad[BASE:].numpy()

    diff = max_diff(ours, theirs)
    rel = float(np.linalg.norm(grad - theirs_grad) / np.linalg.norm(theirs_grad))
    print("learned rows max abs diff", diff, "rows gradient relative L2 error", rel)
    assert diff <= TOL, diff
    assert rel < GRAD_TOL, rel
    used = np.isin(np.arange(NUM_ROWS), np.array(LEARNED_IDS) - BASE)
    assert np.abs(grad[used]).min(axis=1).all() and not grad[~used].any()

    # The frozen table's rows 150..159 are not read: the plain lookup (rows=None) of ids 150, 155
    # reads them and differs.
    plain = ENCODE(params, config, jnp.asarray(np.where(ids >= TABLE_ROWS, PAD, ids)))
    assert np.abs(np.asarray(plain)[0] - np.asarray(ours)[0]).max() > 100 * TOL


def test_relu_variant_parity():
    model, config, params = tiny_model(feed_forward_proj="relu", num_layers=1)
    ids = prompt_ids(seed=5)
    with torch.no_grad():
        theirs = torch_last(model, ids)
    diff = max_diff(ENCODE(params, config, jnp.asarray(ids)), theirs)
    assert diff <= TOL, diff


# --------------------------------------------------------------------------------------------
# Weights, configs, bf16


def test_param_shapes_match_state_dict(tmp_path):
    model, config, _ = tiny_model()
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # We require the state dict minus the tied copy of the table, which is what save_pretrained writes.
    assert t5.param_shapes(config) == {k: v for k, v in state.items() if k != t5.TIED_COPY}
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert set(f.keys()) == set(t5.param_shapes(config))
    relu_model, relu_config, _ = tiny_model(feed_forward_proj="relu", num_layers=1)
    assert t5.param_shapes(relu_config) == {
        k: tuple(v.shape) for k, v in relu_model.state_dict().items() if k != t5.TIED_COPY}

    # canonical_names: the copy alone becomes the table; beside the table it is dropped.
    table = np.zeros((2, 3))
    assert t5.canonical_names({t5.TIED_COPY: table, "x": 1}) == {t5.TABLE: table, "x": 1}
    assert t5.canonical_names({t5.TIED_COPY: table, t5.TABLE: table}) == {t5.TABLE: table}


def test_bf16_close_to_fp32():
    model, config, params = tiny_model()
    ids = prompt_ids(seed=7, learned=True)
    rows = learned_rows(config, seed=8)
    fp32 = np.asarray(ENCODE(params, config, jnp.asarray(ids), jnp.asarray(rows), base_vocab_size=BASE))
    bf16_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    bf16 = ENCODE(bf16_params, config, jnp.asarray(ids), jnp.asarray(rows, jnp.bfloat16), base_vocab_size=BASE,
                  dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    bf16 = np.asarray(bf16, np.float32)
    assert np.isfinite(bf16).all()
    diff = float(np.abs(bf16 - fp32).max())
    # transformers' own bf16 model (everything bf16, as FLUX runs it) as the yardstick.
    with torch.no_grad():
        theirs = torch_last(with_rows(model, rows)[0].to(torch.bfloat16), ids).float().numpy()
    theirs_diff = float(np.abs(theirs - fp32).max())
    print("bf16 vs fp32 max abs diff", diff, "transformers bf16 vs fp32", theirs_diff,
          "fp32 max abs", float(np.abs(fp32).max()))
    # Observed 0.035 (transformers' bf16: 0.04) on states up to ~3.4: ~3x margin.
    assert diff < 0.1, diff
    assert diff < 2 * theirs_diff, (diff, theirs_diff)


def test_config_round_trip_and_errors():
    model, config, _ = tiny_model()
    assert t5.T5Config.from_dict(config.to_dict()) == config
    assert hash(t5.T5Config.from_dict(config.to_dict())) == hash(config)
    # transformers reads our to_dict back to the same model.
    tconfig = transformers.T5Config(**config.to_dict())
    assert t5.T5Config.from_dict(tconfig.to_dict()) == config
    # Defaults are transformers' constructor defaults; unknown keys are ignored.
    assert t5.T5Config.from_dict({"some_new_key": [1, 2]}) == t5.T5Config.from_dict(transformers.T5Config().to_dict())
    for bad, match in [({"feed_forward_proj": "gated-silu"}, "feed_forward_proj 'gated-silu'"),
                       ({"num_heads": 0}, "num_heads"),
                       ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets")]:
        with pytest.raises(UserError, match=match) as err:
            t5.T5Config.from_dict({**config.to_dict(), **bad})
        assert "\n" not in str(err.value)
