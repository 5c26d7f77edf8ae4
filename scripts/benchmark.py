"""Measure ti_flax's train step, and a reference-style baseline's, in one run.

Usage:
    python scripts/benchmark.py [--model DIR] [--out JSON] [--steps N] [--skip-wallclock] [--skip-cost]

Two kinds of figures (a small model on a CPU is bound by kernel launches, a TPU by FLOPs and bytes):

* Wall clock on `--model` (default: an SD-v1-layout model at small widths, built into a temporary
  folder by make_tiny_model.py): trace + compile time, steady-state seconds per update (median of
  many, each ended by block_until_ready, variants interleaved in blocks so background load hits
  them alike), examples/s, peak host memory and XLA's memory analysis of the compiled step (each
  variant set up in its own process, so peaks do not mix), device memory where the backend
  reports it; on 1 device and on all local devices. Also the loss on a fixed evaluation set of
  the rows trained in float32 and in bf16 for the same updates.
* Work per step of an SD 1.5-shaped model at 512 px (the real SD 1.5 configs below, abstract
  shapes: no weights allocated, nothing downloaded): FLOPs and bytes accessed from XLA's cost
  analysis of the compiled step, activation memory, and the FLOP-bound seconds per step on TPU
  v4 / v5e / v5p chips.

Variants: "baseline" (bench_reference.py: diffusers' Flax script's step), "ours" (ti_flax's
defaults: --attention auto, i.e. chunked on CPU and dense on TPU/GPU), "ours-dense" (dense
attention, as the baseline), and ours with --cache_latents, --mixed_precision bf16,
--gradient_checkpointing (remat), --gradient_accumulation_steps 2. The cost analysis lives in
bench_cost.py.
"""

import argparse
import dataclasses
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_cost import VARIANTS, Variant, abstract_cost, activation_bytes  # noqa: E402, F401 (Variant: bench_gpu's)


WALLCLOCK_VARIANTS = "baseline,ours,ours+cache,ours-dense,ours+bf16,ours-dense+remat"
# The cost analysis is of the TPU program ("auto" attention resolves to dense). XLA counts a
# while loop's body once, so the chunked attention's FLOPs would be undercounted: for it only
# the memory figure is meaningful.
COST_VARIANTS = {
    1: ("baseline", "ours", "ours+cache"),
    8: ("baseline", "ours", "ours+cache", "ours+remat", "ours+chunked", "ours+cache+bf16"),
    # The H200 comparison's setting (4 images per device, bf16): the attention implementations
    # XLA can lower on a CPU (cudnn and flash need their GPU/TPU backends).
    4: ("ours-dense+bf16", "ours+chunked+bf16"),
}
# SDXL 1.0 base at 1024 px, batch 1, bf16: down to the smallest-memory setting (gradient
# checkpointing, cached latents, chunked attention).
SDXL_COST_VARIANTS = ("ours+bf16", "ours+cache+bf16", "ours+remat+cache+bf16", "ours+chunked+remat+cache+bf16")


# --------------------------------------------------------------------------------------------
# Wall clock


def bench_config(model_dir, data_dir, batch, output_dir):
    from ti_flax import TrainConfig

    return TrainConfig(
        pretrained_model_name_or_path=model_dir, train_data_dir=data_dir, output_dir=output_dir,
        placeholder_token="<bench>", initializer_token="toy", resolution=model_resolution(model_dir),
        train_batch_size=batch, repeats=100, learning_rate=5e-4, lr_scheduler="constant", max_train_steps=10_000,
        save_steps=0, checkpointing_steps=0, report_to="none", seed=0,
    )


def model_resolution(model_dir):
    """The resolution a model was built for: UNet sample size x VAE downscaling."""
    with open(os.path.join(model_dir, "unet", "config.json")) as f:
        sample = json.load(f)["sample_size"]
    with open(os.path.join(model_dir, "vae", "config.json")) as f:
        return sample * 2 ** (len(json.load(f)["block_out_channels"]) - 1)


class Runner:
    """One variant set up on `run.devices`; `update()` runs one optimizer update and waits for it."""

    def __init__(self, variant, run):
        import jax

        from ti_flax.training import engine as engine_lib
        from ti_flax import models, parallel

        self.variant, self.devices, self.cache_s = variant, run.devices, 0.0
        run = variant_run(variant, run)
        if variant.reference:
            import bench_reference as ref

            spec = ref.grown_spec(run.model.spec, len(run.token_ids))
            params = ref.reference_params(run.model.params["text_encoder"], run.init_rows)
            table = parallel.replicate(models.token_table(params), run.devices)
            frozen = parallel.replicate({**{k: run.model.params[k] for k in ("unet", "vae")},
                                         "alphas_cumprod": run.model.alphas_cumprod}, run.devices)
            self.state = parallel.replicate(jax.device_get(ref.init_state(params, run.opt_spec)), run.devices)
            fn = ref.pmapped_reference_step(spec, run.opt_spec, tuple(run.token_ids), run.devices)
            batches = parallel.prefetch_to_devices(ref.reference_batches(run.data, len(run.devices)), run.devices)
            first = next(batches)
            start = time.perf_counter()
            self.compiled = fn.lower(self.state, table, frozen, first).compile()
            self.compile_s = time.perf_counter() - start
            self.batches = itertools.chain([first], batches)
            self.args = lambda batch: (table, frozen, batch)
            self.engine = None
            self.rows = lambda: parallel.unreplicate(models.token_table(self.state.params))[run.token_ids]
        else:
            self.engine = engine_lib.build(run)
            self.compiled, self.compile_s, self.cache_s = (self.engine.step_fn, self.engine.compile_seconds,
                                                           self.engine.cache_seconds)
            self.rows = self.engine.rows
        self.examples_per_update = run.data.global_batch_size * variant.accumulation

    def update(self):
        import jax

        if self.engine is not None:
            metrics = self.engine.update()
            jax.block_until_ready((self.engine.state, metrics))
            return
        self.state, metrics = self.compiled(self.state, *self.args(next(self.batches)))
        jax.block_until_ready((self.state, metrics))


def variant_run(variant, run):
    """`run` with the variant's settings (precision, attention, remat, cache, accumulation)."""
    from ti_flax.training.optim import OptimizerSpec

    config = run.config.replace(
        gradient_accumulation_steps=variant.accumulation, mixed_precision=variant.mixed_precision,
        gradient_checkpointing=variant.remat, attention=variant.attention, cache_latents=variant.cache_latents,
    )
    opt_spec = OptimizerSpec.from_config(config, len(run.devices), run.total_steps)
    return dataclasses.replace(run, config=config, opt_spec=opt_spec)


def prepare_run(model_dir, data_dir, batch, num_devices):
    import jax

    from ti_flax.training.run import prepare

    out = os.path.join(tempfile.gettempdir(), "ti-bench-unused")  # prepare() writes nothing
    return prepare(bench_config(model_dir, data_dir, batch, out), devices=jax.local_devices()[:num_devices])


def peak_rss_bytes():
    """This process's peak resident memory. VmHWM belongs to the address space, so unlike
    ru_maxrss it does not inherit the parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe(args):
    """Subprocess: set one variant up, run 3 updates, print compile time and memory as JSON."""
    import jax

    from ti_flax.training import footprint

    run = prepare_run(args.model, args.data, args.batch, args.probe_devices)
    runner = Runner(VARIANTS[args.probe], run)
    for _ in range(3):
        runner.update()
    stats = run.devices[0].memory_stats() or {}
    residuals = None
    if runner.engine is not None:
        latent = run.config.resolution // run.model.spec.vae_scale_factor
        residuals = activation_bytes(run.model.spec, runner.engine.compute, run.model.params, args.batch, latent)
    print("PROBE " + json.dumps({
        "activation_residual_bytes": residuals,
        "compile_s": runner.compile_s,
        "cache_latents_s": runner.cache_s,
        "peak_host_rss_bytes": peak_rss_bytes(),
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "xla_memory": footprint.memory_dict(runner.compiled),
        "backend": jax.default_backend(),
    }), flush=True)


def run_probe(args, name, num_devices, cache_dir):
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--data", args.data,
           "--batch", str(args.batch), "--probe", name, "--probe-devices", str(num_devices), "--jax-cache", cache_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    if out.returncode or not lines:
        raise SystemExit(f"probe {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("PROBE "):])


def fixed_eval_loss(model, rows, data, steps=4):
    """Float32 loss of `rows` on fixed (image, noise, timestep) draws of another seed."""
    import jax
    import numpy as np

    from ti_flax import families, models
    from ti_flax.training import step as step_lib

    spec, compute, frozen = model.spec, models.Compute(), families.Frozen.from_model(model)

    @jax.jit
    def loss(rows, batch, key):
        noisy, t, target = step_lib.diffusion_inputs(spec, compute, frozen, batch, key)
        return step_lib.diffusion_loss(rows, spec, compute, frozen, batch.input_ids, noisy, t, target)

    key = jax.random.PRNGKey(2024)
    return float(np.mean([loss(rows, data.global_batch(s), jax.random.fold_in(key, s)) for s in range(steps)]))


def wallclock(args, names, device_counts):
    """Set up, probe and time each variant on each device count; returns one dict per row."""
    import jax

    cache_dir = tempfile.mkdtemp(prefix="ti-bench-jaxcache-")
    jax.config.update("jax_compilation_cache_dir", cache_dir)  # the probes compile, we reuse
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        return _wallclock(args, names, device_counts, cache_dir)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)  # write no more entries
        shutil.rmtree(cache_dir, ignore_errors=True)


def _wallclock(args, names, device_counts, cache_dir):
    import numpy as np

    from ti_flax.data.batches import TrainData

    block, rounds = 5, max(1, args.steps // 5)
    results = []
    for n in device_counts:
        print(f"\n== wall clock: {args.model}, batch {args.batch} per device, {n} device(s) ==", flush=True)
        probes = {}
        for name in names:
            probes[name] = run_probe(args, name, n, cache_dir)
            print(f"  probed {name}: compile {probes[name]['compile_s']:.1f} s, "
                  f"peak host {probes[name]['peak_host_rss_bytes'] / 2**20:.0f} MiB", flush=True)
        run = prepare_run(args.model, args.data, args.batch, n)
        runners = {name: Runner(VARIANTS[name], run) for name in names}
        for runner in runners.values():
            runner.update()  # warm-up
            runner.update()
        # Wall time, and this process's CPU time (all threads), which other processes' load
        # disturbs far less on a shared machine.
        times = {name: [] for name in names}
        cpu = {name: [] for name in names}
        for r in range(rounds):  # interleaved blocks, rotating order: background load hits all alike
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                for _ in range(block):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    runners[name].update()
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
        for name in names:
            sec = statistics.median(times[name])
            results.append({
                "variant": name, "devices": n, "batch_per_device": args.batch, "updates_timed": len(times[name]),
                "s_per_update": sec, "updates_per_s": 1 / sec, "examples_per_s": runners[name].examples_per_update / sec,
                "s_per_update_p10_p90": [float(np.percentile(times[name], 10)), float(np.percentile(times[name], 90))],
                "cpu_s_per_update": statistics.median(cpu[name]),
                **probes[name],
            })
        if "ours" in runners and "ours+bf16" in runners:
            # Train both on to the same number of updates, then score their rows in float32.
            done = 2 + len(times["ours"])
            for _ in range(max(0, args.eval_updates - done)):
                runners["ours"].update()
                runners["ours+bf16"].update()
            eval_data = TrainData(run.data.images, run.data.template_ids, 10, 0.5, 1234, 4)
            losses = {k: fixed_eval_loss(run.model, runners[k].rows(), eval_data) for k in ("ours", "ours+bf16")}
            losses["initial"] = fixed_eval_loss(run.model, run.init_rows, eval_data)
            results.append({"variant": "eval_loss", "devices": n, "updates": max(done, args.eval_updates), **losses,
                            "bf16_vs_fp32": losses["ours+bf16"] / losses["ours"] - 1})
        del runners, run  # free this device count's models before the next one's probes
    return results


# --------------------------------------------------------------------------------------------
# Work per step, from XLA's cost analysis (SD 1.5 shapes, nothing allocated)


def cost(args):
    """The SD 1.5 figures of COST_VARIANTS at each --cost-batches size."""
    import jax

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)  # keep these out of the cache
    results = []
    for batch in args.cost_batches:
        names = args.cost_variants.split(",") if args.cost_variants else COST_VARIANTS.get(batch, COST_VARIANTS[1])
        for name in names:
            results.append(abstract_cost(VARIANTS[name], batch, 512, compile_it=not args.lowered_only))
            r = results[-1]
            print(f"  SD1.5 512px batch {batch} {name}: {r['flops'] / 1e12:.3f} TFLOP, "
                  f"{r['bytes_accessed'] / 1e9:.1f} GB ({r['lower_compile_s']:.0f} s)", flush=True)
    return results


def sdxl_cost(args):
    """SDXL_COST_VARIANTS at 1024 px, batch 1."""
    import jax

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    results = []
    for name in args.sdxl_variants.split(","):
        results.append(abstract_cost(VARIANTS[name], 1, 1024, compile_it=not args.lowered_only, model="sdxl"))
        r = results[-1]
        temp = r.get("xla_memory", {}).get("temp_size_in_bytes")
        print(f"  SDXL 1024px batch 1 {name}: {r['flops'] / 1e12:.3f} TFLOP, XLA temp {_gib(temp)} GiB, "
              f"act {_gib(r.get('activation_residual_bytes'))} GiB ({r['lower_compile_s']:.0f} s)", flush=True)
    return results


# --------------------------------------------------------------------------------------------
# Report


def _gib(n, unit=2**30):
    return f"{n / unit:.2f}" if n is not None else "-"


NOTES = """Notes:
  vs base: baseline's s/update over ours (wall and this process's CPU time); FLOPs and bytes as ours/baseline.
  act: activations the forward pass keeps for the backward pass (JAX residuals, weights excluded);
    remat and chunked attention shrink it. XLA temp: XLA's buffer assignment for the compiled step;
    XLA:CPU does not keep a rematerialised block apart from its forward pass, so on this backend
    remat shows in act but not in XLA temp.
  *: the chunked attention runs under lax.map and XLA's cost analysis counts a loop body once, so
    its FLOPs and bytes are undercounted; only its memory figures are comparable.
  GB moved is XLA:CPU's post-fusion count; TPU fusion differs, so compare ratios, not absolutes."""


def report(wall, costs, sdxl_costs=()):
    lines = []
    if wall:
        lines.append("\nWall clock (median s per update; peak host RSS, XLA temp and act from a process per variant)")
        lines.append(f"{'variant':17s} {'dev':>3s} {'s/update':>9s} {'ex/s':>6s} {'vs base':>7s} {'cpu s/upd':>9s} "
                     f"{'vs base':>7s} {'compile s':>9s} {'host MiB':>8s} {'XLA temp MiB':>12s} {'act MiB':>8s}")
        base = {r["devices"]: r for r in wall if r["variant"] == "baseline"}
        for r in wall:
            if r["variant"] == "eval_loss":
                lines.append(f"eval loss after {r['updates']} updates ({r['devices']} dev): initial {r['initial']:.5f}, "
                             f"fp32 {r['ours']:.5f}, bf16 {r['ours+bf16']:.5f} (bf16 vs fp32 {100 * r['bf16_vs_fp32']:+.3f}%)")
                continue
            b = base.get(r["devices"])
            ratio = f"{r['updates_per_s'] / b['updates_per_s']:.2f}x" if b else "-"
            cpu_ratio = f"{b['cpu_s_per_update'] / r['cpu_s_per_update']:.2f}x" if b else "-"
            lines.append(
                f"{r['variant']:17s} {r['devices']:3d} {r['s_per_update']:9.4f} {r['examples_per_s']:6.2f} {ratio:>7s} "
                f"{r['cpu_s_per_update']:9.4f} {cpu_ratio:>7s} {r['compile_s']:9.1f} {r['peak_host_rss_bytes'] / 2**20:8.0f} "
                f"{r['xla_memory'].get('temp_size_in_bytes', 0) / 2**20:12.1f} "
                f"{_gib(r.get('activation_residual_bytes'), 2**20):>8s}"
            )
    for title, rows in (("SD 1.5 shapes at 512 px", costs), ("SDXL 1.0 base shapes at 1024 px", sdxl_costs)):
        if rows:
            lines.extend(cost_table(title, rows))
    if wall or costs or sdxl_costs:
        lines.append(NOTES)
    return "\n".join(lines)


def cost_table(title, costs):
    """The lines of one cost table (variants vs the baseline of the same batch, where there is one)."""
    lines = []
    if costs:
        kind = "unoptimised HLO" if costs[0].get("analysis") == "lowered" else "compiled step"
        lines.append(f"\n{title}, one device's step (XLA cost analysis of the {kind}); "
                     "TPU bound = FLOPs / bf16 peak")
        lines.append(f"{'variant':17s} {'batch':>5s} {'TFLOP':>8s} {'vs base':>7s} {'GB moved':>9s} {'vs base':>7s} "
                     f"{'temp GiB':>8s} {'act GiB':>7s} {'v4 ms':>7s} {'v5e ms':>7s} {'v5p ms':>7s}")
        base = {r["batch"]: r for r in costs if r["variant"] == "baseline"}
        for r in costs:
            b = base.get(r["batch"])
            star = "*" if VARIANTS[r["variant"]].attention == "chunked" else " "
            f_ratio = f"{r['flops'] / b['flops']:.3f}" if b else "-"
            b_ratio = f"{r['bytes_accessed'] / b['bytes_accessed']:.3f}" if b else "-"
            temp = r.get("xla_memory", {}).get("temp_size_in_bytes")
            tpu = r["tpu_min_s_per_step"]
            lines.append(
                f"{r['variant'] + star:17s} {r['batch']:5d} {r['flops'] / 1e12:8.3f} {f_ratio:>7s} "
                f"{r['bytes_accessed'] / 1e9:9.1f} {b_ratio:>7s} {_gib(temp):>8s} "
                f"{_gib(r.get('activation_residual_bytes')):>7s} {1e3 * tpu['v4']:7.1f} {1e3 * tpu['v5e']:7.1f} "
                f"{1e3 * tpu['v5p']:7.1f}"
            )
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: build the sd1-small layout into a temporary folder)")
    p.add_argument("--data", default=os.path.join(HERE, "sample_images"), help="training images")
    p.add_argument("--out", default="benchmark.json", help="JSON file for every figure")
    p.add_argument("--steps", type=int, default=30, help="timed updates per variant and device count")
    p.add_argument("--eval-updates", type=int, default=60,
                   help="updates of float32 and bf16 training before the fixed-set evaluation")
    p.add_argument("--batch", type=int, default=1, help="per-device batch for the wall clock")
    p.add_argument("--variants", default=WALLCLOCK_VARIANTS, help="comma-separated wall-clock variants")
    p.add_argument("--devices", default="1,all", help="device counts for the wall clock, e.g. 1,all")
    p.add_argument("--cost-batches", default="1,8", help="batch sizes for the SD 1.5 cost analysis")
    p.add_argument("--cost-variants", help="comma-separated variants for the cost analysis at every batch size "
                   "(default: each size's own list), e.g. ours,ours+preserve,ours+normdecay,ours+ema")
    p.add_argument("--lowered-only", action="store_true", help="cost of the unoptimised HLO (fast, no compile)")
    p.add_argument("--skip-wallclock", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--sdxl-cost", action="store_true",
                   help="also the SDXL 1.0 base figures at 1024 px, batch 1 (compiles SDXL's step: minutes, ~10 GB RAM)")
    p.add_argument("--sdxl-variants", default=",".join(SDXL_COST_VARIANTS), help="comma-separated, for --sdxl-cost")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--jax-cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cost_batches = [int(b) for b in args.cost_batches.split(",")]
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.probe:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        return probe(args)
    import jax

    wall, costs, built = [], [], None
    if not args.skip_wallclock:
        names = [n for n in args.variants.split(",") if n]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise SystemExit(f"error: unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
        if not args.model:
            import make_tiny_model

            built = tempfile.mkdtemp(prefix="ti-bench-sd1-small-")
            args.model = make_tiny_model.build_tiny_model(built, "sd1-small")
        local = len(jax.local_devices())
        counts = sorted({local if c == "all" else min(int(c), local) for c in args.devices.split(",")})
        try:
            wall = wallclock(args, names, counts)
        finally:
            if built:
                shutil.rmtree(built, ignore_errors=True)
    if not args.skip_cost:
        print("\n== work per step: SD 1.5 shapes at 512 px ==", flush=True)
        costs = cost(args)
    sdxl_costs = []
    if args.sdxl_cost:
        print("\n== work per step: SDXL 1.0 base shapes at 1024 px ==", flush=True)
        sdxl_costs = sdxl_cost(args)
    text = report(wall, costs, sdxl_costs)
    print(text)
    model = "sd1-small layout (make_tiny_model.py), built for this run" if built else args.model
    meta = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.local_devices()], "jax": jax.__version__,
            "model": model, "argv": sys.argv[1:]}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "wallclock": wall, "cost": costs, "sdxl_cost": sdxl_costs, "table": text}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
