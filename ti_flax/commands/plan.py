"""`ti_flax.plan`: will a run fit on a chip, and how fast can it go, before renting the chip.

`plan(config, target)` compiles the run's exact train step for one chip of `target` from
abstract shapes (the model's config files only: no weights are read or allocated; a TPU's
program is compiled deviceless through libtpu, see footprint.py) and returns a `Plan`: the
memory per chip (frozen weights, learned state, batch, temporaries, code) against the chip's,
the FLOPs and bytes of a step with the roofline's lower bound on its time, which attention each
call site runs and, when it does not fit, the changes that would, found by compiling them
cheapest first. Answers are kept on disk, keyed by the step's shapes, the target and the jax
version, so asking twice is instant. `python -m ti_flax.plan` takes train's flags plus --target.

    >>> from ti_flax import TrainConfig, plan
    >>> print(plan(TrainConfig(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5",
    ...                        train_batch_size=4, mixed_precision="bf16"), target="v5e"))  # doctest: +SKIP
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import time
from typing import Optional

import jax

from .. import families, files
from ..config.choices import PLAN_TARGETS
from ..config.cli import build_parser as train_parser, parse_config
from ..errors import UserError, first_line, run_cli
from ..training import compile_cache, footprint, run as run_lib
from ..training.optim import OptimizerSpec

GIB = footprint.GIB
CACHE_VERSION = 2  # bump when what a cached answer holds changes (2: the engine's program, not a vmap's)


@dataclasses.dataclass
class Tried:
    """One configuration compiled for the chip: its flags (changes from the run's), needs, verdict."""

    flags: str
    footprint: footprint.Footprint
    fits: Optional[bool]  # None: the chip's memory is unknown (a CPU)
    seconds: Optional[float]  # the roofline's lower bound on a step, where the chip's rates are known
    batch_size: int
    compile_seconds: float = 0.0
    cached: bool = False


@dataclasses.dataclass
class Plan:
    """What `plan` found. `run` is the configuration asked about; `alternatives` the changes compiled
    when it does not fit, cheapest first, each on top of the ones before it (except batch splits);
    `suggestion` the flags of the first that fits (None if none does, or it fits as it is)."""

    target: str
    chip: footprint.Chip
    model: str
    resolution: int
    run: Tried
    attention: list
    alternatives: list = dataclasses.field(default_factory=list)
    suggestion: Optional[str] = None

    def __str__(self):
        return report(self)


def plan(config, target="local", *, spec=None, alternatives=True):
    """Compile `config`'s train step for one chip of `target` and say whether and how it fits.

    Args:
      config: a TrainConfig, as for `train`; the data flags (--train_data_dir,
        --placeholder_token, --initializer_token) may be left out: the step's shapes do not
        depend on the images.
      target: one of choices.PLAN_TARGETS: a TPU generation ("v4", "v5e", "v5p", "v6e";
        needs libtpu, on any machine) or "local" (this machine's first device).
      spec: the model's models.ModelSpec, instead of reading
        --pretrained_model_name_or_path's config files.
      alternatives: when it does not fit, compile the changes that lower memory until one fits.
    Returns:
      a Plan (`print` it for the report).
    Raises:
      UserError (one line): bad flags, an unknown target, libtpu missing for a TPU target, a
      model whose configs cannot be read, a step that fails to compile.
    """
    config = plannable(config)
    device, chip = footprint.target_device(target)
    if spec is None:
        spec, _ = families.read_spec(config.pretrained_model_name_or_path, config.revision, config.prediction_type)
    resolution = config.resolution or run_lib.default_resolution(spec)
    run_lib.check_resolution(resolution, spec)
    backend = footprint.platform(device)
    # An explicit --attention the chip cannot run: one line, before compiling.
    family = families.of(spec)
    family.resolve_attention(config.attention, spec, resolution, backend=backend, dtype=config.compute_dtype)
    config = config.replace(resolution=resolution)
    asked = _try(config, spec, target, device, chip, "")
    compute = run_lib.model_compute(config, backend)
    result = Plan(target, chip, _model_name(config, spec), resolution, asked, family.attention_sites(spec, compute,
                                                                                                       resolution))
    if asked.fits is False and alternatives:
        result.alternatives, result.suggestion = _search(config, spec, target, device, chip)
    return result


def plannable(config):
    """`config` validated, with the data flags `plan` does not need filled in where left out."""
    if config.concepts is None:
        fill = {"train_data_dir": config.train_data_dir or ".", "placeholder_token": config.placeholder_token or "<plan>"}
        if not (config.initializer_token or config.initial_embeddings):
            fill["initializer_token"] = "a"
        config = config.replace(**fill)
    return config.validate()


def _search(config, spec, target, device, chip):
    """Compile footprint.lighter_changes in order until one fits: (tried, the fitting flags or None)."""
    backend = footprint.platform(device)
    kept, kept_flags, tried = {}, [], []
    for flags, change in footprint.lighter_changes(config, spec, backend, config.resolution):
        trial = config.replace(**{**kept, **change})
        label = " ".join(kept_flags + [flags])
        try:
            families.of(spec).resolve_attention(trial.attention, spec, trial.resolution, backend=backend,
                                                dtype=trial.compute_dtype)
            result = _try(trial, spec, target, device, chip, label)
        except UserError:
            continue  # a change this chip cannot run (e.g. an attention kernel): the next one
        tried.append(result)
        if result.fits:
            return tried, label
        if "train_batch_size" not in change:  # cheaper changes stay; batch splits replace each other
            kept.update(change)
            kept_flags.append(flags)
    return tried, None


def _try(config, spec, target, device, chip, flags):
    """Compile (or read from the cache) `config`'s step for the chip: a Tried."""
    concepts = config.concept_list()
    num_rows = sum(c.num_vectors for c in concepts)
    backend = footprint.platform(device)
    compute = run_lib.model_compute(config, backend)
    opt_spec = OptimizerSpec.from_config(config, 1, config.max_train_steps or 1000,
                                         lora_shapes=run_lib.lora_shapes(config, spec))
    args = footprint.step_args(spec, compute, opt_spec, config.train_batch_size, config.resolution, num_rows,
                               config.cache_latents)
    loss_spec = run_lib.loss_spec(config, spec)
    key = _cache_key(spec, compute, opt_spec, loss_spec, len(concepts), args, target, chip)
    path = os.path.join(compile_cache.cache_root(), "plans", key + ".json")
    cached = _read_cached(path)
    if cached is not None:
        found, seconds = footprint.Footprint(**cached["footprint"]), cached["compile_seconds"]
    else:
        start = time.perf_counter()
        found = _compile(device, spec, compute, opt_spec, loss_spec, args, len(concepts), chip)
        seconds = time.perf_counter() - start
        _write_cached(path, {"version": CACHE_VERSION, "footprint": found._asdict(), "compile_seconds": seconds})
    fits = None if not chip.memory else found.total <= chip.memory
    return Tried(flags, found, fits, footprint.step_seconds(found, chip), config.train_batch_size, seconds,
                 cached is not None)


def _compile(device, spec, compute, opt_spec, loss_spec, args, num_concepts, chip):
    try:
        return footprint.measure(footprint.compile_step(device, spec, compute, opt_spec, args, num_concepts, loss_spec),
                                 args)
    except UserError:
        raise
    except Exception as err:
        needed = out_of_memory(str(err))
        if needed is None:
            raise UserError(f"the train step does not compile for {chip.kind}: {first_line(err)}") from None
        # The chip's compiler refused it for memory: its temporaries alone, the arguments beside them.
        state, frozen, batch, key = args
        sizes = footprint.tree_bytes(frozen), footprint.tree_bytes(state), footprint.tree_bytes((batch, key))
        return footprint.Footprint(*sizes, sum(sizes), needed, 0, 0, sum(sizes) + needed)


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_OUT_OF_MEMORY = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\) exceeds available HBM"
                            r"|Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm")


def out_of_memory(message):
    """Bytes a TPU compiler said a program needs, from its RESOURCE_EXHAUSTED message; None if it is not one.

        >>> out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        ...               "temporaries (26.84G) exceeds available HBM (15.75G).") / 2**30
        26.84
    """
    match = _OUT_OF_MEMORY.search(message)
    if not match:
        return None
    number, unit = [g for g in match.groups() if g is not None][:2]
    return int(float(number) * _UNITS[unit])


def _cache_key(spec, compute, opt_spec, loss_spec, num_concepts, args, target, chip):
    """What the compiled program depends on, hashed: the step's statics and argument shapes, the
    target chip, the compiler (jax, jaxlib, libtpu versions) and ti_flax's own code, which builds
    the program (after a change to the model code a cached answer would repeat the old bytes)."""
    shapes = [(tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(args)]
    structure = str(jax.tree_util.tree_structure(args))
    versions = [_version(name) for name in ("jax", "jaxlib", "libtpu")]
    text = repr((CACHE_VERSION, spec, compute, opt_spec, loss_spec, num_concepts, shapes, structure, target, chip,
                 versions, _code_hash()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _code_hash():
    """A hash of every ti_flax source file's path and text (read once per process)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_cached(path):
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
    except (OSError, ValueError):
        return None
    return cached if cached.get("version") == CACHE_VERSION else None


def _write_cached(path, record):
    try:  # the cache saves time only: an unwritable one is skipped
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.atomic_write(path, json.dumps(record).encode())
    except (OSError, files.WriteFailed):
        pass


def _model_name(config, spec):
    return f"{config.pretrained_model_name_or_path or 'model'} ({families.of(spec).title})"


# --------------------------------------------------------------------------------------------
# The report


def gib(n):
    """Bytes as GiB, or MiB below one GiB: "7.10 GiB", "58.3 MiB"."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def verdict(tried, chip):
    """"fits (X free)", "does not fit by X", or "memory not known" for the chip."""
    if tried.fits is None:
        return "the device reports no memory limit"
    spare = chip.memory - tried.footprint.total
    return f"fits ({gib(spare)} free)" if spare >= 0 else f"does not fit by {gib(-spare)}"


def speed(tried):
    """"11.26 TFLOP, 3.1 GB moved; at least 57.2 ms, at most 70 images/s" for one step."""
    f = tried.footprint
    if f.flops is None or not f.flops:
        return "no cost analysis (the compiler refused it)"
    work = f"{f.flops / 1e12:.2f} TFLOP" if f.flops >= 1e11 else f"{f.flops / 1e9:.2f} GFLOP"
    text = f"{work}, {f.bytes_accessed / 1e9:.2f} GB moved"
    if tried.seconds:
        text += f"; at least {tried.seconds * 1e3:.1f} ms, at most {tried.batch_size / tried.seconds:.1f} images/s"
    return text


def attention_text(sites):
    """One clause per kind of call: "self 4096x4096 (head 40) x10: flash"."""
    return "; ".join(f"{kind} {q}x{kv} (head {d}) x{n}: {impl}" for (kind, q, kv, d, impl), n in sites)


def report(result):
    """The plan as the command prints it."""
    chip, asked, f = result.chip, result.run, result.run.footprint
    memory = gib(chip.memory) if chip.memory else "no limit reported"
    where = f"one {chip.kind} chip ({memory})" if result.target != "local" else f"this machine's {chip.kind} ({memory})"
    lines = [
        f"ti_flax.plan: {result.model} at {result.resolution} px, {asked.batch_size} per chip, on {where}",
        "  memory per chip",
        f"    frozen weights  {gib(f.frozen)}",
        f"    learned state   {gib(f.learned)}",
        f"    batch           {gib(f.batch)}",
        f"    temporaries     {gib(f.temporaries)}",
        f"    code            {gib(f.code)}",
        f"    total           {gib(f.total)}{f' of {memory}' if chip.memory else ''}: {verdict(asked, chip)}",
        f"  work per step     {speed(asked)}",
        f"  attention         {attention_text(result.attention)}",
        f"  compiled in {asked.compile_seconds:.1f} s" + (" (answer from the cache)" if asked.cached else ""),
    ]
    if chip.peak_flops:
        lines.append(f"  chip rates        {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.bandwidth / 1e9:.0f} GB/s "
                     f"({chip.source})")
    if result.alternatives:
        lines.append("  changes, cheapest first (each compiled for the chip):")
        for tried in result.alternatives:
            lines.append(f"    {tried.flags}: {gib(tried.footprint.total)}, {verdict(tried, chip)}; {speed(tried)}")
    if asked.fits is False:
        lines.append(f"  suggested: {result.suggestion}" if result.suggestion else
                     "  nothing tried fits: a chip with more memory, or a lower --resolution")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The command line


def build_parser():
    """train's flags (the data flags optional) plus --target."""
    parser = train_parser()
    parser.prog = "python -m ti_flax.plan"
    parser.description = ("Will a training run fit on a chip, and how fast can it go: compiles the train step for one "
                          "chip of --target from the model's configs alone and prints its memory and work per step.")
    parser.add_argument("--target", choices=PLAN_TARGETS, default="local",
                        help="the chip: a TPU generation (compiled here through libtpu: pip install \"jax[tpu]\"), "
                        "or local, this machine's first device")
    return parser


def main(argv=None):
    """`python -m ti_flax.plan` and `ti-flax-plan`: parse the flags, plan; returns the exit status."""
    def go():
        target = build_parser().parse_args(argv).target
        print(plan(parse_config(argv, build_parser(), validate=False), target), flush=True)

    return run_cli(go)
