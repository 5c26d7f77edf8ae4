"""What one chip needs to run the train step: memory and work, read from the compiled program.

The step (`step.train_step`, the exact one the engine runs) is compiled from abstract shapes
for ONE chip: this machine's first device, or a TPU generation's chip compiled deviceless
through libtpu (`jax.experimental.topologies`), so a TPU's program can be measured on a laptop.
XLA's memory analysis of that program gives the bytes per chip and its cost analysis the FLOPs
and bytes moved; with the chip's peak bf16 FLOP/s and HBM bandwidth (CHIPS) they bound the step
time from below (the roofline). `ti_flax.plan` (planning.py) prints it; `engine.build` checks the
compiled step of a run against the device's memory with `check_fits` before the first step.

    >>> device, chip = target_device("v5e")  # doctest: +SKIP
    >>> compiled = compile_step(device, spec, compute, opt_spec, step_args(...))  # doctest: +SKIP
    >>> measure(compiled).total  # doctest: +SKIP
"""

import functools
import importlib.util
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import families, models, parallel
from ..config.choices import PLAN_TARGETS
from ..data import batches as data_lib
from ..errors import UserError, first_line
from ..families import Frozen
from ..models.attention import DEFAULT_CHUNK
from . import latents, logs, step as step_lib
from .losses import LossSpec

GIB = 2**30


class Chip(NamedTuple):
    """One accelerator chip: what its device calls itself, its memory and its peak rates.

    Attributes:
      kind: `device.device_kind`. topology: the one-chip topology name for
      `jax.experimental.topologies.get_topology_desc` (None for this machine's device).
      memory: bytes of HBM (nominal; None where unknown). peak_flops: dense bf16 FLOP/s.
      bandwidth: HBM bytes/s. source: where the figures come from.
    """

    kind: str
    topology: Optional[str]
    memory: Optional[float]
    peak_flops: Optional[float] = None
    bandwidth: Optional[float] = None
    source: str = ""


# Google Cloud's system-architecture page of each generation: peak bf16 compute, HBM capacity and
# bandwidth per chip (v4 and v5p run as one megacore device per chip).
CHIPS = {
    "v4": Chip("TPU v4", "v4:1x1x1", 32 * GIB, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5 lite", "v5e:1x1", 16 * GIB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5", "v5p:1x1x1", 95 * GIB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6 lite", "v6e:1x1", 32 * GIB, 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}
# GPUs a `local` target may be (by device_kind): NVIDIA's datasheets, dense bf16 (SXM).
GPUS = {
    "NVIDIA H200": Chip("NVIDIA H200", None, 141e9, 989e12, 4.8e12, "https://www.nvidia.com/en-us/data-center/h200/"),
    "NVIDIA H100 80GB HBM3": Chip("NVIDIA H100 80GB HBM3", None, 80e9, 989e12, 3.35e12,
                                  "https://www.nvidia.com/en-us/data-center/h100/"),
    "NVIDIA A100-SXM4-80GB": Chip("NVIDIA A100-SXM4-80GB", None, 80e9, 312e12, 2.039e12,
                                  "https://www.nvidia.com/en-us/data-center/a100/"),
}


def target_device(target):
    """(device, Chip) of one chip of `target` (one of choices.PLAN_TARGETS).

    "local" is this machine's first device, its memory the backend's limit (None on CPU); a TPU
    generation is a deviceless device of a one-chip topology, which needs libtpu (UserError,
    one line, saying how to install it).
    """
    if target not in PLAN_TARGETS:
        raise UserError(f"--target {target!r}: choose one of {', '.join(PLAN_TARGETS)}")
    if target == "local":
        device = jax.local_devices()[0]
        known = GPUS.get(device.device_kind)
        limit = memory_limit(device)
        if known is not None:
            return device, known._replace(memory=limit or known.memory)
        return device, Chip(device.device_kind, None, limit)
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"--target {target}: compiling for a TPU needs libtpu, which is not installed; "
                        f"pip install \"jax[tpu]=={jax.__version__}\" (it runs on a machine without a TPU too)")
    chip = CHIPS[target]
    try:
        return _tpu_device(chip.topology), chip
    except Exception as err:  # a libtpu that does not match this jax, or does not know the chip
        raise UserError(f"--target {target}: libtpu cannot describe a {chip.kind} chip ({first_line(err)}); "
                        f"install the libtpu of this jax: pip install \"jax[tpu]=={jax.__version__}\"") from None


@functools.lru_cache(maxsize=None)
def _tpu_device(topology):
    from jax.experimental import topologies

    megacore = {"chip_config_name": "megacore"} if topology.startswith("v4") else {}
    return topologies.get_topology_desc(topology, "tpu", chips_per_host_bounds=(1, 1, 1), **megacore).devices[0]


def memory_limit(device):
    """Bytes a program may use on `device` (`memory_stats()["bytes_limit"]`), or None where the
    backend does not say (CPU)."""
    stats = logs.device_memory_stats(device)
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def platform(device):
    """The backend name attention resolves against: "tpu", "gpu" or "cpu"."""
    return "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform


def abstract_frozen(spec, dtype, alphas_cumprod=None, vae=True):
    """Frozen of jax.ShapeDtypeStruct in `dtype` (float32 noise schedule), from the configs alone.

    `alphas_cumprod`: the schedule's shape (default [spec.num_train_timesteps]); `vae`: False
    drops the VAE, as --cache_latents does.
    """
    cast = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)),
                                  models.abstract_params(spec))
    alphas = alphas_cumprod
    if alphas is None:
        alphas = jax.ShapeDtypeStruct((spec.num_train_timesteps,), jnp.float32)
    return Frozen(cast["text_encoder"], cast[spec.denoiser.FOLDER], cast["vae"] if vae else None, alphas,
                           cast.get("text_encoder_2"))


def step_args(spec, compute, opt_spec, batch_size, resolution, num_rows, cache_latents=False):
    """The step's (state, frozen, batch, key) for one chip, as jax.ShapeDtypeStruct trees with the
    leading axis of 1 that `compile_step` maps over: the engine's arguments (engine.step_shapes)
    with one device, made without weights or images."""
    one = (None,)  # one device's leading axis
    frozen = abstract_frozen(spec, compute.dtype)
    family = families.of(spec)
    batch = parallel.shapes(data_lib.blank_batch(batch_size, resolution, family.prompt_length(spec), family.time_ids),
                            one)
    if cache_latents:
        batch = latents.latent_batch_shapes(spec, compute, frozen.vae, batch)
        frozen = frozen._replace(vae=None)
    state = jax.eval_shape(lambda: step_lib.init_state(jnp.zeros((num_rows, spec.row_width)), opt_spec))
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return parallel.shapes(state, one), parallel.shapes(frozen, one), batch, parallel.shapes(key, one)


def compile_step(device, spec, compute, opt_spec, args, num_concepts=1, loss_spec=LossSpec()):
    """`step.train_step` compiled for one `device` (deviceless for a TPU target): the program the
    engine's pmap compiles for one device.

    jax.pmap is jit over shard_map; so is this, on a one-device mesh (which may be a TPU
    topology's device), each argument split along the leading axis as pmap splits it, the state
    donated as the engine donates it. (A jit over jax.vmap computes the same but is another
    program: on an H200 its temporaries were a quarter smaller than the step's.)
    `compute.backend` should be the device's platform, so "auto" attention resolves as it would
    there. Raises whatever XLA raises.
    """
    fn = functools.partial(step_lib.train_step, spec=spec, compute=compute, opt_spec=opt_spec,
                           num_concepts=num_concepts, loss_spec=loss_spec)
    mesh = Mesh(np.array([device]), (parallel.AXIS,))

    def per_device(*device_args):  # pmap's own body: the device's slice in, a leading axis back on
        out = fn(*jax.tree_util.tree_map(lambda x: jax.lax.squeeze(x, [0]), device_args))
        return jax.tree_util.tree_map(lambda x: jax.lax.expand_dims(x, [0]), out)

    split = PartitionSpec(parallel.AXIS)
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(split,) * len(args), out_specs=split, check_vma=False)
    sharding = NamedSharding(mesh, split)
    placed = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jax.dtypes.canonicalize_dtype(x.dtype), sharding=sharding), args)
    return jax.jit(mapped, donate_argnums=(0,)).lower(*placed).compile()


class Footprint(NamedTuple):
    """A compiled step's needs on one chip: bytes, and work per call.

    Attributes:
      frozen, learned, batch: bytes of the frozen weights, the learned state (rows and optimizer
        state) and the batch with its key, as the arguments hold them (0 where not known).
      arguments: XLA's argument bytes (those three, as laid out on the chip). temporaries: XLA's
        temporary buffers. outputs: outputs not written over a donated argument. code: the program.
      total: what the chip must hold while it runs: the arguments (the larger of XLA's count,
        which leaves out those the step never reads, such as the VAE decoder, and the three
        above, which the engine puts on the device whole) + outputs + temporaries + code.
      flops, bytes_accessed: XLA's cost analysis of one call (None when it failed to compile).
    """

    frozen: int
    learned: int
    batch: int
    arguments: int
    temporaries: int
    outputs: int
    code: int
    total: int
    flops: Optional[float] = None
    bytes_accessed: Optional[float] = None


def tree_bytes(tree):
    """Bytes of every leaf of a tree of arrays or jax.ShapeDtypeStruct, as jax holds them (int64 as int32 unless x64)."""
    return int(sum(x.size * jax.dtypes.canonicalize_dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def memory_dict(compiled):
    """XLA's memory analysis of a compiled program, as a dict of byte counts ({} where it has none)."""
    stats = compiled.memory_analysis()
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k: int(getattr(stats, k)) for k in keys if stats is not None and hasattr(stats, k)}


def cost_dict(cost):
    """{"flops", "bytes_accessed"} from XLA's cost analysis."""
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per device
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def measure(compiled, args=None):
    """The Footprint of a compiled step; `args` (state, frozen, batch, key) splits its arguments."""
    memory = memory_dict(compiled)
    arguments, temporaries = memory.get("argument_size_in_bytes", 0), memory.get("temp_size_in_bytes", 0)
    outputs = max(0, memory.get("output_size_in_bytes", 0) - memory.get("alias_size_in_bytes", 0))
    code = memory.get("generated_code_size_in_bytes", 0)
    state, frozen, batch, key = args if args is not None else (None,) * 4
    cost = cost_dict(compiled.cost_analysis())
    parts = tree_bytes(frozen), tree_bytes(state), tree_bytes((batch, key))
    held = max(arguments, sum(parts))
    return Footprint(*parts, arguments, temporaries, outputs, code, held + outputs + temporaries + code,
                     cost["flops"], cost["bytes_accessed"])


def step_seconds(footprint, chip):
    """The roofline's lower bound on one call's time on `chip`: the longer of its FLOPs at the
    chip's peak and its bytes at the HBM bandwidth; None where the chip's rates are unknown."""
    if not chip.peak_flops or not chip.bandwidth or not footprint.flops:
        return None
    return max(footprint.flops / chip.peak_flops, (footprint.bytes_accessed or 0.0) / chip.bandwidth)


def lighter_changes(config, spec, backend, resolution):
    """The changes that lower a run's memory per chip, cheapest in speed first: a list of
    (flags, TrainConfig field changes). Each is meant on top of the ones before it, except the
    batch splits, which are alternatives to each other.

    Order: bf16 (faster too), --cache_latents (no VAE in the step), --gradient_checkpointing
    (about a third more FLOPs), a lighter attention (where a long self-attention runs dense),
    then a smaller per-chip batch with more accumulation, keeping the global batch.
    """
    changes = []
    if config.mixed_precision == "no":
        changes.append(("--mixed_precision bf16", {"mixed_precision": "bf16"}))
    if not config.cache_latents:
        changes.append(("--cache_latents", {"cache_latents": True}))
    if not config.gradient_checkpointing:
        changes.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
    attention = _lighter_attention(config, spec, backend, resolution)
    if attention:
        changes.append((f"--attention {attention}", {"attention": attention}))
    batch, accumulation = config.train_batch_size, config.gradient_accumulation_steps
    for smaller in (b for b in range(batch - 1, 0, -1) if batch % b == 0):
        changes.append((f"--train_batch_size {smaller} --gradient_accumulation_steps {accumulation * batch // smaller}",
                        {"train_batch_size": smaller, "gradient_accumulation_steps": accumulation * batch // smaller}))
    return changes


def _lighter_attention(config, spec, backend, resolution):
    """"auto" or "chunked" where a long self-attention would run dense and that avoids it; else None."""
    def dense_long(attention):
        compute = models.Compute(dtype=config.compute_dtype, attention=attention, backend=backend)
        return any(kind == "self" and impl == "dense" and q_len > DEFAULT_CHUNK
                   for (kind, q_len, _, _, impl), _ in families.of(spec).attention_sites(spec, compute, resolution))

    if not dense_long(config.attention):
        return None
    for attention in ("auto", "chunked"):
        if attention != config.attention and not dense_long(attention):
            return attention
    return None


def check_fits(compiled, devices, suggestions=list):
    """The compiled step's bytes per device (its Footprint total); UserError (one line) when a
    device's memory limit is below it, naming the shortfall and the flags to try, which
    `suggestions()` lists (called only then: a run that fits never works them out).

    Devices whose backend reports no limit (CPU) pass.
    """
    need = measure(compiled).total
    limits = [(limit, device) for device in devices if (limit := memory_limit(device))]
    if limits:
        limit, device = min(limits, key=lambda pair: pair[0])
        if need > limit:
            changes = suggestions()
            tries = f"; try {', '.join(changes)}" if changes else ""
            raise UserError(
                f"the train step needs {need / GIB:.2f} GiB per device but {device.device_kind} has {limit / GIB:.2f} "
                f"GiB: {(need - limit) / GIB:.2f} GiB short{tries} (python -m ti_flax.plan with these flags shows which fits)")
    return need
