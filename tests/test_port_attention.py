"""ti_flax.models.attention: the implementations agree, and `resolve` picks as documented."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ti_flax.errors import UserError
from ti_flax.models import attention as A


def _qkv(lq, lk, heads=2, dim=8, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, lq, heads, dim), dtype=np.float32)
    k = rng.standard_normal((batch, lk, heads, dim), dtype=np.float32)
    v = rng.standard_normal((batch, lk, heads, dim), dtype=np.float32)
    cot = rng.standard_normal((batch, lq, heads, dim), dtype=np.float32)
    return q, k, v, cot


@functools.partial(jax.jit, static_argnames="implementation")
def _value_and_grads(q, k, v, cot, implementation):
    def loss(q, k, v):
        out = A.attention(q, k, v, implementation=implementation)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _count_scans(jaxpr):
    """Number of scan equations (lax.map is a scan) in a jaxpr, nested jaxprs included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "scan"
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    n += _count_scans(sub)
    return n


@pytest.mark.parametrize("lk", [1024, 77], ids=["self", "cross77"])
def test_chunked_equals_dense_values_and_grads(lk):
    q, k, v, cot = _qkv(1024, lk)
    dense, dense_grads = _value_and_grads(q, k, v, cot, "dense")
    chunked, chunked_grads = _value_and_grads(q, k, v, cot, "chunked")
    assert np.abs(np.asarray(dense)).max() > 0.1
    np.testing.assert_allclose(chunked, dense, atol=1e-5, rtol=0)
    for name, a, b in zip("qkv", chunked_grads, dense_grads):
        assert np.abs(np.asarray(b)).max() > 0.1, name
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"grad wrt {name}")


def test_chunked_really_chunks():
    q, k, v, _ = _qkv(1024, 77)
    chunked = jax.make_jaxpr(lambda q, k, v: A.attention(q, k, v, implementation="chunked"))(q, k, v)
    dense = jax.make_jaxpr(lambda q, k, v: A.attention(q, k, v, implementation="dense"))(q, k, v)
    assert _count_scans(chunked.jaxpr) == 1  # 1024 queries in 4 chunks of 256 under lax.map
    assert "checkpoint" in str(chunked) or "remat" in str(chunked)
    assert _count_scans(dense.jaxpr) == 0
    # Few enough queries: nothing to chunk.
    q, k, v, _ = _qkv(256, 256)
    short = jax.make_jaxpr(lambda q, k, v: A.attention(q, k, v, implementation="chunked"))(q, k, v)
    assert _count_scans(short.jaxpr) == 0


def test_chunked_pads_a_token_count_that_is_no_multiple_of_the_chunk():
    q, k, v, _ = _qkv(1000, 1000, batch=1)
    out = A.attention(q, k, v, implementation="chunked")
    assert out.shape == q.shape
    np.testing.assert_allclose(out, A.attention(q, k, v, implementation="dense"), atol=1e-5, rtol=0)


def test_dense_matches_a_numpy_reference():
    q, k, v, _ = _qkv(16, 5, batch=1)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(A.attention(q, k, v), np.einsum("bhqk,bkhd->bqhd", p, v), atol=1e-5, rtol=0)


def test_bf16_keeps_bf16_and_is_close_to_float32():
    q, k, v, _ = _qkv(300, 300, batch=1)
    ref = A.attention(q, k, v, implementation="dense")
    for impl in ("dense", "chunked"):
        out = A.attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), implementation=impl)
        assert out.dtype == jnp.bfloat16
        assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.05


def test_auto_on_cpu_chunks_long_attention():
    assert jax.default_backend() == "cpu"
    q, k, v, _ = _qkv(1024, 1024, batch=1)
    jaxpr = jax.make_jaxpr(lambda q, k, v: A.attention(q, k, v, implementation="auto"))(q, k, v)
    assert _count_scans(jaxpr.jaxpr) == 1


# --------------------------------------------------------------------------------------------
# resolve, with faked backends


BF16, F32 = jnp.bfloat16, jnp.float32


@pytest.mark.parametrize(
    "implementation, backend, dtype, q_len, kv_len, head_dim, want",
    [
        ("auto", "gpu", BF16, 4096, 4096, 64, "cudnn"),
        # cuDNN's backward cannot take an odd length (jax passes an empty bias): CLIP's 77 tokens
        # failed the step's compile on an H200 ("Unsupported sequence length Q 4096, KV 77").
        ("auto", "gpu", jnp.float16, 4096, 77, 40, "dense"),
        ("auto", "gpu", BF16, 4096, 78, 40, "cudnn"),
        ("auto", "gpu", BF16, 4095, 4096, 64, "dense"),
        ("auto", "cuda", BF16, 1024, 1024, 128, "cudnn"),
        ("auto", "gpu", F32, 4096, 4096, 64, "dense"),  # cuDNN flash attention is half precision only
        ("auto", "gpu", BF16, 4096, 4096, 160, "dense"),  # SD 1.x's mid block: too wide for pre-Hopper cuDNN here
        ("auto", "gpu", BF16, 4096, 4096, 20, "dense"),  # not a multiple of 8
        ("auto", "rocm", BF16, 4096, 4096, 64, "dense"),
        ("auto", "tpu", BF16, 4096, 4096, 64, "flash"),
        ("auto", "tpu", F32, 1024, 1024, 40, "flash"),
        ("auto", "tpu", BF16, 4096, 77, 64, "dense"),  # cross-attention
        ("auto", "tpu", BF16, 256, 256, 64, "dense"),  # short
        ("auto", "tpu", BF16, 4032, 4032, 64, "dense"),  # not a multiple of the kernel's block
        ("auto", "cpu", F32, 1024, 1024, 8, "chunked"),
        ("auto", "cpu", BF16, 4096, 4096, 64, "chunked"),
        ("auto", "cpu", F32, 1024, 77, 8, "chunked"),  # cross-attention chunks its queries too
        ("auto", "cpu", F32, 256, 256, 8, "dense"),
        ("dense", "gpu", BF16, 4096, 4096, 64, "dense"),
        ("chunked", "gpu", BF16, 4096, 4096, 64, "chunked"),
        ("chunked", "cpu", F32, 4096, 77, 64, "chunked"),
        ("chunked", "cpu", F32, 64, 64, 64, "dense"),
        ("cudnn", "gpu", BF16, 4096, 4096, 64, "cudnn"),
        ("cudnn", "gpu", BF16, 4096, 77, 64, "dense"),  # odd length: as under auto
        ("flash", "tpu", BF16, 4096, 4096, 64, "flash"),
        ("flash", "tpu", BF16, 4096, 77, 64, "dense"),  # the kernel is for self-attention
    ],
)
def test_resolve(implementation, backend, dtype, q_len, kv_len, head_dim, want):
    got = A.resolve(implementation, backend=backend, dtype=dtype, q_len=q_len, kv_len=kv_len, head_dim=head_dim)
    assert got == want


def test_resolve_without_the_pallas_kernel(monkeypatch):
    monkeypatch.setattr(A, "_flash_available", lambda: False)
    shape = dict(q_len=4096, kv_len=4096, head_dim=64)
    assert A.resolve("auto", backend="tpu", dtype=BF16, **shape) == "dense"
    with pytest.raises(UserError, match="does not import"):
        A.resolve("flash", backend="tpu", dtype=BF16, **shape)


@pytest.mark.parametrize(
    "implementation, backend, dtype, head_dim, q_len, message",
    [
        ("cudnn", "cpu", F32, 64, 4096, "--attention cudnn needs an NVIDIA GPU and bf16/fp16; this run is cpu float32"),
        ("cudnn", "gpu", F32, 64, 4096, "this run is gpu float32"),
        ("cudnn", "tpu", BF16, 64, 4096, "this run is tpu bfloat16"),
        ("cudnn", "gpu", BF16, 160, 4096, "heads of size 160"),
        ("flash", "cpu", F32, 64, 4096, "needs a TPU"),
        ("flash", "gpu", BF16, 64, 4096, "needs a TPU"),
        ("flash", "tpu", BF16, 64, 4032, "not a multiple"),
        ("xformers", "gpu", BF16, 64, 4096, "choose one of auto, dense, chunked, cudnn, flash"),
    ],
)
def test_impossible_explicit_choices_raise_one_line(implementation, backend, dtype, head_dim, q_len, message):
    with pytest.raises(UserError) as err:
        A.resolve(implementation, backend=backend, dtype=dtype, q_len=q_len, kv_len=q_len, head_dim=head_dim)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_attention_refuses_what_this_backend_cannot_run():
    q, k, v, _ = _qkv(8, 8)
    with pytest.raises(UserError, match="cudnn needs an NVIDIA GPU"):
        A.attention(q, k, v, implementation="cudnn")
    with pytest.raises(UserError, match="needs a TPU"):
        A.attention(q, k, v, implementation="flash")
    with pytest.raises(UserError, match="choose one of"):
        A.attention(q, k, v, implementation="sdpa")


# --------------------------------------------------------------------------------------------
# The accelerator kernels


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU backend")
def test_cudnn_matches_dense_on_gpu():
    q, k, v, _ = _qkv(1024, 77, heads=4, dim=64)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out = A.attention(q, k, v, implementation="cudnn")
    ref = A.attention(q, k, v, implementation="dense")
    assert float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max()) < 2e-2


def _interpret_mode():
    try:
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.force_tpu_interpret_mode
    except (ImportError, AttributeError):
        return None


@pytest.mark.skipif(
    jax.default_backend() != "tpu" and (_interpret_mode() is None or not A._flash_available()),
    reason="the Pallas TPU flash kernel needs a TPU, or a jax with TPU interpret mode",
)
def test_flash_kernel_matches_dense():
    """On CPU the Pallas TPU kernel runs in TPU interpret mode (a few seconds at 256 tokens)."""
    import contextlib

    q, k, v, cot = _qkv(256, 256, heads=2, dim=64, batch=1)
    mode = contextlib.nullcontext() if jax.default_backend() == "tpu" else _interpret_mode()()
    with mode:
        out = A._flash(q, k, v)
        grad = jax.grad(lambda q: jnp.sum(A._flash(q, k, v) * cot))(q)
    np.testing.assert_allclose(out, A._dense(q, k, v), atol=1e-5, rtol=0)
    np.testing.assert_allclose(grad, jax.grad(lambda q: jnp.sum(A._dense(q, k, v) * cot))(q), atol=1e-5, rtol=0)
