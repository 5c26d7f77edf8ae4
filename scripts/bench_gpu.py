"""Measure ti_flax's own train step on one accelerator at SD 1.5 or SDXL shapes (built for one NVIDIA GPU).

Usage:
    python scripts/bench_gpu.py [--tiny | --layout sdxl] [--out DIR] [--variants A,B,...] [--deadline SECONDS]

What it measures, per variant, each in its own process (so device memory peaks do not mix):

* compile time: lower + compile of the step as engine.build does it (`Engine.compile_seconds`),
  and the whole engine.build;
* steady-state seconds per update: median of `--steps` updates after `--warmup` more, each
  ended by jax.block_until_ready; images/s from it; and the mean of `--steps` more dispatched
  back to back as the training loop does (host batch preparation overlapping the device);
* peak device memory (`memory_stats()["peak_bytes_in_use"]`) and XLA's memory analysis of the
  compiled step (argument, output, alias, temp, generated-code bytes), for comparing an estimate
  with the measured peak; XLA's FLOP count of the step;
* which attention implementation each UNet/VAE attention call site resolved to (a recorder put
  around ti_flax.models.attention.resolve while the step is traced), and the cuDNN fused-attention
  custom calls in the compiled program;
* time from process start to the first finished step, with its parts (imports, model load,
  engine.build, first update). Every child runs with JAX_COMPILATION_CACHE_DIR set to one
  folder that starts empty and calls ti_flax.training.compile_cache.configure() as `train` does, so the
  first bf16 run is a cold start and "bf16-auto-2nd-start" (the same settings again) is the
  second start with a warm persistent cache.

The model is an SD 1.5-shaped diffusers folder (the real SD 1.5 configs of bench_cost.py: CLIP
ViT-L text encoder, UNet 320/640/1280/1280 with 8 heads, VAE 128/256/512/512; with --layout sdxl,
SDXL 1.0 base's: CLIP-L and OpenCLIP bigG, UNet 320/640/1280 with 64-wide heads) with random
float32 weights and the bundled real CLIP tokenizer, written here with numpy and ti_flax's own
save_pipeline (no diffusers, nothing downloaded), then read back by ti_flax.training.run.prepare like any
model folder: the step measured is the real one (prepare -> engine.build -> Engine.update).
512 px, `--batch` 4 per device, 1 device, the bundled sample images. `--tiny` runs the same
script end to end on a tiny layout (64 px, batch 1, 2 timed updates) to check it on a CPU.

Each record is appended to DIR/results.jsonl as soon as it is known (a child writes a partial
record after its first step and a full one at the end) and the log goes to DIR/log.txt, so a run
cut short still leaves what it measured. `--deadline` stops launching variants that would not
finish in time (the most important run first).
"""

import argparse
import collections
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_cost import SD15_TEXT, SD15_UNET, SD15_VAE, SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET, SDXL_VAE  # noqa: E402
from bench_cost import Variant  # noqa: E402
from benchmark import bench_config  # noqa: E402

# The order is the order of importance: a run cut short by --deadline keeps the first ones.
VARIANTS = {
    v.name: v
    for v in (
        Variant("bf16-auto", mixed_precision="bf16"),
        Variant("fp32-auto"),
        Variant("bf16-dense", mixed_precision="bf16", attention="dense"),
        Variant("bf16-auto-2nd-start", mixed_precision="bf16"),  # bf16-auto again, warm compilation cache
        Variant("bf16-auto+cache_latents", mixed_precision="bf16", cache_latents=True),
        Variant("bf16-auto+remat", mixed_precision="bf16", remat=True),
    )
}
SECOND_START = {"bf16-auto-2nd-start": "bf16-auto"}  # variant -> the run that warmed its cache

# A tiny model with SD 1.x's block structure (make_tiny_model.py's "tiny" layout), for --tiny.
TINY_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=69, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)
TINY_UNET = dict(SD15_UNET, block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, cross_attention_dim=32,
                 sample_size=32)
TINY_VAE = dict(SD15_VAE, block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, sample_size=64)
# layout -> (text encoder, UNet, VAE, second text encoder or None) configs.
LAYOUTS = {"sd15": (SD15_TEXT, SD15_UNET, SD15_VAE, None), "sdxl": (SDXL_TEXT, SDXL_UNET, SDXL_VAE, SDXL_TEXT_2),
           "tiny": (TINY_TEXT, TINY_UNET, TINY_VAE, None)}
# runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json.
SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
    clip_sample=False, prediction_type="epsilon",
)
# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json.
SDXL_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, steps_offset=1, trained_betas=None, clip_sample=False, interpolation_type="linear",
    prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
    timestep_spacing="leading", use_karras_sigmas=False,
)
TARGETS = {"peak_device_bytes": 8e9, "s_per_update": 0.045, "second_start_s": 15.0}  # SD 1.5, 512 px, b4, bf16


# --------------------------------------------------------------------------------------------
# The model folder (numpy only: no diffusers, no torch)


def build_model(out_dir, layout, seed=0):
    """Write a random-init diffusers folder of `layout` ("sd15" or "tiny") with ti_flax's
    save_pipeline; returns (out_dir, number of weights).

    Each weight is a random slice of one pool of standard normals pre-scaled for its kind (norm
    scales near 1, biases near 0, embeddings at CLIP's 0.02, matrices and kernels at
    1 / sqrt(fan_in), as make_tiny_model.reinit_weights draws them): views, not copies, so ~1B
    weights take seconds, and they are streamed to the safetensors files (`_stream_weights`).
    """
    import jax
    import numpy as np

    from ti_flax import families, models
    from ti_flax.models.clip_vocab import write_tokenizer_files
    from ti_flax.formats import pipeline
    from ti_flax.models import schedulers
    from ti_flax.models.weights import flatten, unflatten

    text, unet, vae, text_2 = LAYOUTS[layout]
    family = families.get("sdxl" if text_2 else "sd1")
    spec = family.spec_from_configs(text, unet, vae, text_config_2=text_2)
    abstract = models.abstract_params(spec)
    rng = np.random.default_rng(seed)
    leaves = {}  # (component, name) -> (shape, pool key)
    for component, tree in abstract.items():
        for name, leaf in sorted(flatten(tree).items()):
            shape = tuple(leaf.shape)
            if len(shape) == 1:
                key = (0.1, 1.0) if "norm" in name and name.endswith(".weight") else (0.05, 0.0)
            elif "embedding" in name:
                key = (0.02, 0.0)
            else:
                key = (float(1.0 / np.sqrt(np.prod(shape[1:]))), 0.0)
            leaves[component, name] = shape, key
    sizes = collections.defaultdict(int)  # each pool just larger than its largest weight
    for shape, key in leaves.values():
        sizes[key] = max(sizes[key], int(np.prod(shape)))
    pool = rng.standard_normal(max(sizes.values()) + (1 << 20), dtype=np.float32)
    scaled = {key: pool[:n + (1 << 20)] * np.float32(key[0]) + np.float32(key[1]) for key, n in sizes.items()}
    flat, count = collections.defaultdict(dict), 0
    for (component, name), (shape, key) in leaves.items():
        n = int(np.prod(shape))
        start = int(rng.integers(0, len(scaled[key]) - n + 1))
        flat[component][name] = scaled[key][start:start + n].reshape(shape)
        count += n
    params = {component: unflatten(tree) for component, tree in flat.items()}
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = models.load_tokenizer(write_tokenizer_files(tok_dir))
        # SDXL's second tokenizer: the same vocabulary, padded with "!".
        tokenizer_2 = models.load_tokenizer(write_tokenizer_files(tok_dir, pad_token="!")) if text_2 else None
    scheduler = SDXL_SCHEDULER if text_2 else SD15_SCHEDULER
    model = models.LoadedModel(spec, params, tokenizer, schedulers.alphas_cumprod(dict(scheduler)), out_dir,
                               dict(scheduler), tokenizer_2)
    os.makedirs(out_dir, exist_ok=True)
    # save_pipeline writes the configs, tokenizer, scheduler and index; only its weight writer is
    # swapped for one that streams the arrays (its own builds each file in memory first: ~3x slower).
    write_weights, pipeline._write_weights = pipeline._write_weights, _stream_weights
    try:
        family.save_pipeline(model, np.zeros((0, spec.row_width), np.float32), out_dir)
    finally:
        pipeline._write_weights = write_weights
    return out_dir, count


def _stream_weights(path, params):
    """Write a params tree as a float32 safetensors file, array by array (no copy in memory)."""
    import struct

    import numpy as np

    from ti_flax.models.weights import flatten

    tensors = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in sorted(flatten(params).items())}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, value in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for value in tensors.values():
            f.write(value.reshape(-1).view(np.uint8))


# --------------------------------------------------------------------------------------------
# One variant (a child process)


def append_record(out_dir, record):
    """Append one JSON line to out_dir/results.jsonl, flushed to disk."""
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def record_resolutions(attention_lib):
    """Wrap attention.resolve so each call (one per traced call site) is counted; returns the Counter."""
    import jax.numpy as jnp

    original, calls = attention_lib.resolve, collections.Counter()

    def resolve(implementation, **kw):
        out = original(implementation, **kw)
        calls[(implementation, kw.get("backend"), jnp.dtype(kw.get("dtype")).name, kw.get("q_len"),
               kw.get("kv_len"), kw.get("head_dim"), out)] += 1
        return out

    attention_lib.resolve = resolve
    return calls


def compiled_analysis(compiled):
    """XLA's memory analysis (every *_in_bytes field), FLOPs and bytes of the compiled step, and
    the cuDNN custom calls in its program."""
    out = {}
    try:
        stats = compiled.memory_analysis()
        stats = stats[0] if isinstance(stats, (list, tuple)) else stats
        out["xla_memory"] = {k: int(getattr(stats, k)) for k in dir(stats)
                             if k.endswith("_in_bytes") and isinstance(getattr(stats, k), int)}
        m = out["xla_memory"]
        out["xla_estimate_bytes"] = (m.get("argument_size_in_bytes", 0) + m.get("output_size_in_bytes", 0)
                                     - m.get("alias_size_in_bytes", 0) + m.get("temp_size_in_bytes", 0)
                                     + m.get("generated_code_size_in_bytes", 0))
    except Exception as err:  # noqa: BLE001 (a backend without it: record why)
        out["xla_memory_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["xla_flops"] = float(cost.get("flops", 0.0))
        out["xla_bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    except Exception as err:  # noqa: BLE001
        out["xla_cost_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    try:
        import re

        text = compiled.as_text()
        targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
        out["custom_calls"] = dict(targets)
        out["cudnn_fmha_calls"] = sum(n for t, n in targets.items() if "fmha" in t.lower())
    except Exception as err:  # noqa: BLE001
        out["hlo_text_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return out


def child(args):
    """Set one variant up as `train` does, time it, append its record; runs in its own process."""
    t_start = time.time()
    name = args.child
    variant = VARIANTS[name]
    record = {"kind": "variant", "variant": name, "complete": False, "batch_per_device": args.batch,
              "resolution": args.resolution, "layout": args.layout, "devices": 1,
              "mixed_precision": variant.mixed_precision, "attention": variant.attention,
              "cache_latents": variant.cache_latents, "gradient_checkpointing": variant.remat,
              "second_start_of": SECOND_START.get(name),
              "compilation_cache_files_before": len(os.listdir(os.environ["JAX_COMPILATION_CACHE_DIR"]))}
    stage = "import"
    try:
        import jax
        import numpy as np

        from ti_flax.training import compile_cache, engine as engine_lib
        from ti_flax.models import attention as attention_lib
        from ti_flax.training.run import prepare

        t_imported = time.time()
        stage = "prepare"
        config = bench_config(args.model, args.data, args.batch, os.path.join(tempfile.gettempdir(), "ti-bench-unused"))
        config = config.replace(mixed_precision=variant.mixed_precision, attention=variant.attention,
                                cache_latents=variant.cache_latents, gradient_checkpointing=variant.remat,
                                resolution=args.resolution)
        config.validate()
        record["compilation_cache_dir"] = compile_cache.configure(enabled=True)
        run = prepare(config, devices=jax.local_devices()[:1])
        device = run.devices[0]
        record.update(backend=jax.default_backend(), device_kind=device.device_kind, jax=jax.__version__,
                      load_model_s=run.load_seconds, ti_flax_file=sys.modules["ti_flax"].__file__)
        t_prepared = time.time()
        print(f"prepared in {t_prepared - t_imported:.1f} s (model loaded in {run.load_seconds:.1f} s; "
              f"imports {t_imported - t_start:.1f} s); {jax.default_backend()} {device.device_kind}", flush=True)
        stage = "build"
        calls = record_resolutions(attention_lib)
        engine = engine_lib.build(run)
        t_built = time.time()
        print(f"engine built in {t_built - t_prepared:.1f} s (step compiled in {engine.compile_seconds:.1f} s)",
              flush=True)
        record["attention_call_sites"] = [
            dict(zip(("asked", "backend", "dtype", "q_len", "kv_len", "head_dim", "resolved", "calls"), k + (n,)))
            for k, n in sorted(calls.items(), key=lambda kv: (-kv[0][3], kv[0][4]))
        ]
        record["attention_resolved"] = sorted({k[-1] for k in calls})
        stage = "first update"
        metrics = engine.update()
        jax.block_until_ready((engine.state, metrics))
        t_first = time.time()
        record.update(
            compile_s=engine.compile_seconds, cache_latents_s=engine.cache_seconds, build_s=t_built - t_prepared,
            import_s=t_imported - t_start, prepare_s=t_prepared - t_imported, first_update_s=t_first - t_built,
            python_start_s=t_start - args.t0, time_to_first_step_s=t_first - args.t0,
        )
        append_record(args.out, record)  # partial: what a cut-short run still has
        print(f"first step {t_first - args.t0:.1f} s after process start (compile {engine.compile_seconds:.1f} s)",
              flush=True)
        stage = "timed updates"
        for _ in range(args.warmup):
            metrics = engine.update()
            jax.block_until_ready((engine.state, metrics))
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            metrics = engine.update()
            jax.block_until_ready((engine.state, metrics))
            times.append(time.perf_counter() - start)
        sec = statistics.median(times)
        # As the training loop runs: updates dispatched back to back, waited for at the end, so
        # the host's batch preparation overlaps the device's work.
        start = time.perf_counter()
        for _ in range(args.steps):
            metrics = engine.update()
        jax.block_until_ready((engine.state, metrics))
        record["s_per_update_pipelined"] = (time.perf_counter() - start) / args.steps
        stats = device.memory_stats() or {}
        record.update(
            updates_timed=len(times), s_per_update=sec, images_per_s=args.batch / sec,
            s_per_update_mean=statistics.fmean(times), s_per_update_min=min(times), s_per_update_max=max(times),
            s_per_update_p10_p90=[float(np.percentile(times, 10)), float(np.percentile(times, 90))],
            loss=float(np.asarray(metrics[-1]["loss"]).reshape(-1)[0]),
            finite=bool(np.asarray(metrics[-1]["finite"]).reshape(-1)[0]),
            peak_device_bytes=stats.get("peak_bytes_in_use"), device_bytes_in_use=stats.get("bytes_in_use"),
            device_bytes_limit=stats.get("bytes_limit"), memory_stats=stats,
            frozen_device_bytes=int(sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.frozen))),
        )
        stage = "analysis"
        record.update(compiled_analysis(engine.step_fn))
        if record.get("xla_flops"):
            record["xla_tflops_per_s"] = record["xla_flops"] / sec / 1e12
        record["engine_estimate_bytes"] = engine.estimated_bytes  # footprint.check_fits's, before the first step
        if not args.no_plan:
            stage = "plan"
            # `python -m ti_flax.plan --target local` for the same flags: its estimate against the peak measured above.
            from ti_flax.commands import plan as planning

            start = time.perf_counter()
            planned = planning.plan(config, "local", alternatives=False)
            record.update(plan_total_bytes=planned.run.footprint.total, plan_step_bound_s=planned.run.seconds,
                          plan_compile_s=planned.run.compile_seconds, plan_cached=planned.run.cached,
                          plan_wall_s=time.perf_counter() - start, plan_report=str(planned))
            print(str(planned), flush=True)
        record["compilation_cache_files_after"] = len(os.listdir(os.environ["JAX_COMPILATION_CACHE_DIR"]))
        record["complete"] = True
        append_record(args.out, record)
        peak = record["peak_device_bytes"]
        print(f"{name}: {sec * 1e3:.1f} ms/update, {args.batch / sec:.1f} images/s, peak "
              f"{peak / 2**30 if peak else float('nan'):.2f} GiB", flush=True)
        return 0
    except BaseException as err:
        import traceback

        lines = str(err).strip().splitlines()
        record.update(error_stage=stage, error=f"{type(err).__name__}: {lines[0] if lines else ''}",
                      traceback=traceback.format_exc()[-4000:])
        append_record(args.out, record)
        traceback.print_exc()
        return 1


# --------------------------------------------------------------------------------------------
# The parent: build the model, run each variant in its own process, report


class Log:
    """Lines to stdout and out_dir/log.txt, flushed each time."""

    def __init__(self, path):
        self.file, self.lock = open(path, "a"), threading.Lock()

    def __call__(self, line):
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()


def versions():
    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "flax", "optax",
                 "numpy", "ml_dtypes", "transformers", "safetensors", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def gpu_info():
    try:
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
        return done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"no nvidia-smi ({type(err).__name__})"


def run_child(args, name, cache_dir, timeout, log):
    """Run one variant's process, streaming its output to the log; returns (rc, seconds, tail)."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("JAX_PLATFORMS", None)
    if args.child_platforms:
        env["JAX_PLATFORMS"] = args.child_platforms
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--model", args.model, "--data", args.data,
           "--out", args.out, "--batch", str(args.batch), "--resolution", str(args.resolution), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--layout", args.layout, "--t0", repr(time.time())]
    cmd += ["--no-plan"] if args.no_plan else []
    start, tail = time.time(), collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            errors="replace")
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(f"[{name}] {line}")
        rc = proc.wait()
    finally:
        timer.cancel()
    return rc, time.time() - start, list(tail)


def latest_records(path):
    """The last record of each variant in results.jsonl, and the other records, in file order."""
    variants, others = {}, []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("kind") == "variant":
                    variants[r["variant"]] = r
                else:
                    others.append(r)
    return variants, others


def plan_vs_peak(record):
    """`plan --target local`'s estimate in GiB, and its ratio to the measured peak."""
    planned, peak = record.get("plan_total_bytes"), record.get("peak_device_bytes")
    if not planned:
        return "-"
    return f"{planned / 2**30:.2f}" + (f" ({planned / peak:.2f})" if peak else "")


def summary(out_dir, args):
    """A markdown table of the variants' figures and the SD 1.5 targets."""
    variants, _ = latest_records(os.path.join(out_dir, "results.jsonl"))
    gib = lambda n: f"{n / 2**30:.2f}" if n else "-"  # noqa: E731
    num = lambda x, f="{:.1f}": f.format(x) if x is not None else "-"  # noqa: E731
    lines = ["| variant | compile s | ms/update | ms/update pipelined | images/s | peak GiB | XLA est GiB "
             "| XLA temp GiB | plan GiB (plan/peak) | first step s | attention | status |", "|" + " --- |" * 12]
    for name, r in variants.items():
        status = "ok" if r.get("complete") else (r.get("error") or "partial")
        ms = r["s_per_update"] * 1e3 if r.get("s_per_update") else None
        piped = r["s_per_update_pipelined"] * 1e3 if r.get("s_per_update_pipelined") else None
        lines.append(
            f"| {name} | {num(r.get('compile_s'))} | {num(ms)} | {num(piped)} | {num(r.get('images_per_s'))} | "
            f"{gib(r.get('peak_device_bytes'))} | {gib(r.get('xla_estimate_bytes'))} | "
            f"{gib(r.get('xla_memory', {}).get('temp_size_in_bytes'))} | {plan_vs_peak(r)} | "
            f"{num(r.get('time_to_first_step_s'))} | "
            f"{'/'.join(r.get('attention_resolved', [])) or '-'} | {status} |")
    main, second = variants.get("bf16-auto", {}), variants.get("bf16-auto-2nd-start", {})
    checks = {
        "peak_device_bytes": main.get("peak_device_bytes"),
        "s_per_update": main.get("s_per_update"),
        "second_start_s": second.get("time_to_first_step_s"),
    }
    lines.append(f"\nTargets for SD 1.5, 512 px, batch 4, bf16 auto (this run: {args.layout}, "
                 f"{args.resolution} px, batch {args.batch}):")
    for key, value in checks.items():
        verdict = "-" if value is None else ("met" if value <= TARGETS[key] else "missed")
        lines.append(f"  {key}: {value} (target <= {TARGETS[key]}): {verdict}")
    return "\n".join(lines)


def parent(args):
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "log.txt"))
    # This process never touches the accelerator: the children get all of its memory.
    os.environ["JAX_PLATFORMS"] = "cpu"
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    meta = {"kind": "meta", "argv": sys.argv[1:], "host": platform.node(), "cpus": os.cpu_count(),
            "gpu": gpu_info(), "versions": versions(), "ti_flax_commit": os.environ.get("TI_FLAX_COMMIT"),
            "layout": args.layout, "batch_per_device": args.batch, "resolution": args.resolution}
    log(f"meta: {json.dumps(meta)}")
    built = None
    if not args.model:
        t = time.time()
        built = args.model = tempfile.mkdtemp(prefix=f"ti-bench-{args.layout}-")
        _, count = build_model(args.model, args.layout)
        meta.update(model_build_s=time.time() - t, model_weights=count)
        log(f"built a random {args.layout} model ({count / 1e6:.1f} M weights) in {time.time() - t:.1f} s "
            f"at {args.model}")
    meta["model_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.model) for f in fs)
    append_record(args.out, meta)
    cache_dir = tempfile.mkdtemp(prefix="ti-bench-jaxcache-")
    pending, durations = list(names), {}
    try:
        while pending:
            left = args.deadline - (time.time() - start) if args.deadline else float("inf")
            name = next((n for n in pending if estimate(n, durations, args) <= left), None)
            if name is None:
                log(f"deadline: {left:.0f} s left, not enough for {pending}")
                append_record(args.out, {"kind": "skipped", "variants": pending, "seconds_left": left})
                break
            if name in SECOND_START and SECOND_START[name] not in durations:
                log(f"{name}: skipped, {SECOND_START[name]} did not finish first (nothing in the cache to start from)")
                append_record(args.out, {"kind": "variant", "variant": name, "complete": False,
                                         "error": f"skipped: {SECOND_START[name]} did not finish"})
                pending.remove(name)
                continue
            pending.remove(name)
            log(f"== {name} ({left:.0f} s left) ==")
            timeout = min(args.child_timeout, left - 5) if args.deadline else args.child_timeout
            rc, seconds, tail = run_child(args, name, cache_dir, timeout, log)
            if rc == 0:
                durations[name] = seconds
            variants, _ = latest_records(os.path.join(args.out, "results.jsonl"))
            if rc != 0 and (name not in variants or "error" not in variants[name]):
                # Killed (timeout, out of memory) or crashed before it could write its error.
                append_record(args.out, {"kind": "variant", "variant": name, "complete": False, "rc": rc,
                                         "error": f"process ended with rc {rc} after {seconds:.0f} s"
                                                  + (" (timeout)" if seconds >= timeout - 1 else ""),
                                         "tail": tail[-15:]})
            log(f"== {name}: rc {rc} in {seconds:.1f} s ==")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        if built:
            shutil.rmtree(built, ignore_errors=True)
    text = summary(args.out, args)
    log(text)
    append_record(args.out, {"kind": "summary", "seconds": time.time() - start, "table": text})
    return 0


def estimate(name, durations, args):
    """Seconds a variant's process is expected to take, from the finished runs so far (0: no idea yet)."""
    if not durations:
        return 0.0
    first = max(durations.values())
    if name in SECOND_START:  # no compile: the first run's time less its compile
        variants, _ = latest_records(os.path.join(args.out, "results.jsonl"))
        compile_s = variants.get(SECOND_START[name], {}).get("compile_s") or 0.0
        return max(10.0, first - compile_s) * 0.8
    return first * (1.0 if VARIANTS[name].mixed_precision == "bf16" else 1.2) * 0.8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny layout at 64 px, batch 1, 2 timed updates (CPU check)")
    p.add_argument("--out", default="bench_gpu_results", help="folder for results.jsonl and log.txt")
    p.add_argument("--model", help="an existing model folder (default: build a random one for this run)")
    p.add_argument("--data", default=os.path.join(HERE, "sample_images"), help="training images")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, help="images per device (default 4; 1 with --tiny)")
    p.add_argument("--steps", type=int, help="timed updates per variant (default 30; 2 with --tiny)")
    p.add_argument("--warmup", type=int, help="untimed updates after the first (default 5; 1 with --tiny)")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds from start after which no variant is started (0: none)")
    p.add_argument("--child-timeout", type=float, default=600.0, help="seconds one variant's process may run")
    p.add_argument("--child-platforms", default="", help="JAX_PLATFORMS for the variants' processes (default: jax's)")
    p.add_argument("--no-plan", action="store_true", help="skip `plan --target local` after each variant's timing "
                   "(it compiles the step once more)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--layout", choices=sorted(LAYOUTS), help="the model's shapes: sd15 (SD 1.5 at 512 px, batch 4; "
                   "the default), sdxl (SDXL 1.0 base at 1024 px, batch 1) or tiny (as --tiny)")
    p.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tiny = args.tiny or args.layout == "tiny"
    args.layout = "tiny" if tiny else (args.layout or "sd15")
    args.batch = args.batch or (4 if args.layout == "sd15" else 1)
    args.steps = args.steps or (2 if tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 5)
    args.resolution = args.resolution or {"tiny": 64, "sd15": 512, "sdxl": 1024}[args.layout]
    args.out = os.path.abspath(args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        return child(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
