"""Scaled dot-product attention, with the implementations the UNet can choose between.

One function, `attention(q, k, v, implementation=...)`, for [batch, tokens, heads, head_dim]
inputs (the layout the UNet's projections give without a transpose), and one policy,
`resolve(...)`, that says which implementation a call site of a given shape should use.

    dense    one [Lq, Lk] score matrix per head: few large kernels, what XLA runs best on GPU
             and TPU when memory allows, and what XLA's cost analysis counts exactly.
    chunked  `chunk` queries at a time under `jax.lax.map`, each chunk `jax.checkpoint`ed: a
             score block stays in cache and no score matrix is kept for the backward pass.
             ~1.5x faster than dense on CPU at 1024+ tokens, and less memory on any backend.
    cudnn    cuDNN's fused (flash) attention through `jax.nn.dot_product_attention`: NVIDIA GPU,
             bf16/fp16, head_dim a multiple of 8 and at most 128 (256 on Hopper and later).
    flash    the Pallas TPU flash-attention kernel, for long self-attention on TPU.
    auto     the fastest of these that the backend, dtype and shapes allow (see `resolve`).

Every implementation scales by 1/sqrt(head_dim) and takes the softmax in float32, so bf16
activations do not lose the softmax's small probabilities.
"""

import functools
import math

import jax
import jax.numpy as jnp

from ..config.choices import ATTENTION as IMPLEMENTATIONS
from ..errors import UserError

DEFAULT_CHUNK = 256
FLASH_BLOCK = 128  # the Pallas TPU kernel's block along both sequence axes
_NVIDIA_BACKENDS = ("gpu", "cuda")  # jax.default_backend() says "gpu" for CUDA; ROCm has no cuDNN
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention(q, k, v, *, implementation="dense", chunk=DEFAULT_CHUNK, backend=None):
    """softmax(q k^T / sqrt(D)) v per head.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D], all in the compute dtype.
      implementation: one of IMPLEMENTATIONS. Runs exactly the one named ("chunked" chunks even
        a 77-key cross-attention); only "auto" consults `resolve`. Call sites that want the
        per-shape policy call `resolve` themselves first (the UNet does).
      chunk: queries per chunk for "chunked".
      backend: the platform the program is for (None: jax.default_backend()).
    Returns:
      [B, Lq, H, D] in q's dtype.
    """
    backend = backend or jax.default_backend()
    if implementation == "auto":
        implementation = resolve(
            "auto",
            backend=backend,
            dtype=q.dtype,
            q_len=q.shape[1],
            kv_len=k.shape[1],
            head_dim=q.shape[-1],
            chunk=chunk,
        )
    elif implementation in ("cudnn", "flash"):
        _check_backend(implementation, backend, q.dtype)
    if implementation == "dense":
        return _dense(q, k, v)
    if implementation == "chunked":
        return _chunked(q, k, v, chunk)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if implementation == "flash":
        return _flash(q, k, v)
    raise UserError(f"--attention {implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}")


def resolve(implementation, *, backend, dtype, q_len, kv_len, head_dim, chunk=DEFAULT_CHUNK):
    """The implementation one call site of this shape runs, for an --attention choice.

    "auto" picks, per call:
      NVIDIA GPU, bf16/fp16, head_dim cuDNN supports, even
      query and key lengths                                   -> "cudnn"
      TPU, long self-attention, the Pallas kernel imports     -> "flash"
      CPU, more than `chunk` queries                          -> "chunked"
      anything else                                           -> "dense"
    "Long" means more than `chunk` queries and keys, for "flash" (a self-attention kernel);
    "chunked" chunks any call with more than `chunk` queries, cross-attention over 77 tokens
    included: its [queries, 77] probabilities are then not stored for the backward pass either,
    and on CPU the UNet step is ~30% faster than with dense cross-attention.
    jax's cuDNN attention cannot take gradients through a call with an odd query or key length
    (`jax.nn.dot_product_attention` passes an empty bias, and cuDNN's backward with a bias needs
    even lengths: "Unsupported sequence length Q 4096, KV 77" when the step compiles), so CLIP's
    77-token cross-attention runs dense, under "auto" and under an explicit "cudnn" alike, as
    "flash" leaves short calls dense.
    An explicit choice the backend, dtype or head_dim rules out raises UserError (one line).
    """
    dtype = jnp.dtype(dtype)
    long = q_len > chunk and kv_len > chunk
    if implementation == "auto":
        if (backend in _NVIDIA_BACKENDS and dtype in _HALF and _cudnn_head_dim_ok(head_dim, backend)
                and _cudnn_lengths_ok(q_len, kv_len)):
            return "cudnn"
        if backend == "tpu" and long and _flash_shapes_ok(q_len, kv_len) and _flash_available():
            return "flash"
        if backend == "cpu" and q_len > chunk:
            return "chunked"
        return "dense"
    if implementation == "dense":
        return "dense"
    if implementation == "chunked":
        return "chunked" if q_len > chunk else "dense"
    if implementation == "cudnn":
        _check_backend("cudnn", backend, dtype)
        if not _cudnn_head_dim_ok(head_dim, backend):
            raise UserError(
                f"--attention cudnn: this model has attention heads of size {head_dim}, which cuDNN "
                f"cannot run here (multiples of 8 up to {_cudnn_max_head_dim(backend)}); use --attention auto"
            )
        return "cudnn" if _cudnn_lengths_ok(q_len, kv_len) else "dense"
    if implementation == "flash":
        _check_backend("flash", backend, dtype)
        if not long:
            return "dense"
        if not _flash_shapes_ok(q_len, kv_len):
            raise UserError(
                f"--attention flash: {q_len} image tokens is not a multiple of the kernel's block "
                f"({FLASH_BLOCK}); pick a resolution whose latent sides multiply to a multiple of "
                f"{FLASH_BLOCK}, or use --attention auto"
            )
        return "flash"
    raise UserError(f"--attention {implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}")


# --------------------------------------------------------------------------------------------
# What each backend can run


def _check_backend(implementation, backend, dtype):
    dtype = jnp.dtype(dtype)
    if implementation == "cudnn" and not (backend in _NVIDIA_BACKENDS and dtype in _HALF):
        raise UserError(
            f"--attention cudnn needs an NVIDIA GPU and bf16/fp16; this run is {backend} {dtype.name}"
        )
    if implementation == "flash":
        if backend != "tpu":
            raise UserError(f"--attention flash needs a TPU (Pallas TPU kernel); this run is {backend}")
        if not _flash_available():
            raise UserError(
                "--attention flash: jax.experimental.pallas.ops.tpu.flash_attention does not import "
                "with this jax; use --attention auto"
            )


@functools.lru_cache(maxsize=None)
def _cudnn_max_head_dim(backend):
    """128, or 256 on Hopper and later (jax's cuDNN check); 128 for a backend we only name."""
    if backend not in _NVIDIA_BACKENDS or jax.default_backend() not in _NVIDIA_BACKENDS:
        return 128
    try:
        capability = jax.local_devices(backend="gpu")[0].compute_capability
        return 256 if tuple(int(x) for x in str(capability).split(".")) >= (9, 0) else 128
    except Exception:  # no compute_capability attribute: stay with what every GPU runs
        return 128


def _cudnn_head_dim_ok(head_dim, backend):
    return head_dim % 8 == 0 and head_dim <= _cudnn_max_head_dim(backend)


def _cudnn_lengths_ok(q_len, kv_len):
    """cuDNN's attention backward (with the bias jax always passes) needs even lengths."""
    return q_len % 2 == 0 and kv_len % 2 == 0


def _flash_shapes_ok(q_len, kv_len):
    return q_len % FLASH_BLOCK == 0 and kv_len % FLASH_BLOCK == 0


@functools.lru_cache(maxsize=None)
def _flash_available():
    try:
        from jax.experimental.pallas.ops.tpu import flash_attention  # noqa: F401
    except Exception:  # ImportError, or a jaxlib without Mosaic
        return False
    return True


# --------------------------------------------------------------------------------------------
# The implementations


def _dense(q, k, v):
    """One score matrix per head; scores and softmax in float32."""
    return _swap(_dense_heads_first(_swap(q), _swap(k), _swap(v)))


def _swap(x):
    """[B, L, H, D] <-> [B, H, L, D]."""
    return jnp.swapaxes(x, 1, 2)


def _dense_heads_first(q, k, v):
    """`_dense` for [B, H, L, D] inputs: batched matmuls with no transpose inside."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def _chunked(q, k, v, chunk):
    """`_dense` on `chunk` queries at a time under lax.map, each chunk rematerialised.

    Queries are padded up to a multiple of `chunk` (padded rows attend harmlessly and are cut
    off), so odd token counts still chunk instead of falling back to one big score matrix. The
    heads move in front once, outside the loop, so no chunk transposes the keys and values again.
    """
    batch, num_q, heads, dim = q.shape
    if num_q <= chunk:
        return _dense(q, k, v)
    num_chunks = -(-num_q // chunk)
    pad = num_chunks * chunk - num_q
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    k, v = _swap(k), _swap(v)
    # [chunks, B, H, chunk, D]
    chunks = jnp.transpose(q.reshape(batch, num_chunks, chunk, heads, dim), (1, 0, 3, 2, 4))
    # The backward pass recomputes each chunk's scores from (q chunk, k, v) instead of storing them.
    out = jax.lax.map(jax.checkpoint(lambda q_chunk: _dense_heads_first(q_chunk, k, v)), chunks)
    out = jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(batch, num_chunks * chunk, heads, v.shape[-1])
    return out[:, :num_q]


def _flash(q, k, v):
    """The Pallas TPU flash-attention kernel ([B, H, L, D] layout, so transpose in and out)."""
    from jax.experimental.pallas.ops.tpu.flash_attention import BlockSizes, flash_attention

    q_len, kv_len = q.shape[1], k.shape[1]
    bq, bk = min(FLASH_BLOCK, q_len), min(FLASH_BLOCK, kv_len)
    blocks = BlockSizes(
        block_q=bq,
        block_k_major=bk,
        block_k=bk,
        block_b=1,
        block_q_major_dkv=bq,
        block_k_major_dkv=bk,
        block_k_dkv=bk,
        block_q_dkv=bq,
        block_k_major_dq=bk,
        block_k_dq=bk,
        block_q_dq=bq,
    )
    to_bhld = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out = flash_attention(
        to_bhld(q), to_bhld(k), to_bhld(v), sm_scale=1.0 / math.sqrt(q.shape[-1]), block_sizes=blocks
    )
    return jnp.swapaxes(out, 1, 2)
