"""Measure N concepts trained in one run against N single-concept runs one after another.

Usage:
    python scripts/bench_concepts.py [--model DIR] [--concepts 1 4 8] [--steps S] [--batch B] [--no-cache] [--out JSON]

Wall time of whole `python -m ti_flax.train` processes, each a fresh subprocess, so Python's
imports, the model load, the data decode, the compile, the steps and the output files are all
paid, as a user pays them. For each N of `--concepts`:

* N separate runs, one after another: concept i (token <ci>, its own copy of `--data`) trained
  alone with the plain flags, S optimizer steps at B examples per device.
* One run of N concepts: a generated `--concepts` file listing the same N concepts with equal
  weights, S steps at N x B examples per device, each global batch drawn over all concepts.

The comparison is fair in examples: both sides train S x B x devices x N examples in all, and each
concept gets S x B x devices of them (exactly so in a separate run; in the combined run in
expectation, since a batch's concepts are shuffled and only a whole epoch splits exactly).

Compilation cache: each measurement (the N separate runs together, or the one combined run) gets
JAX's persistent cache in a fresh temporary folder, so the first run compiles from scratch and the
separate runs after the first load the step from that cache, as a user's repeated runs would.
`--no-cache` passes `--no_compilation_cache` to every run, so each compiles from scratch.

The default model is the sd1-small layout (SD 1.x's blocks at small widths, make_tiny_model.py)
at its own resolution (256 px), built into a temporary folder. Each run trains on all local
devices, as the trainer does; no checkpoints, step files, validation or metrics files.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from benchmark import model_resolution  # noqa: E402

# The trainer's final summary ("  startup       loaded model in 2.5 s; compiled step in 44.6 s")
# and banner ("  devices    1 (1 local x 1 process(es), cpu)"): see ti_flax.training.logs.startup_text.
STARTUP = re.compile(r"^\s*startup\s+loaded model in ([\d.]+) s(?:; compiled step in ([\d.]+) s)?", re.M)
DEVICES = re.compile(r"^\s*devices\s+(\d+) \(.*?, (\w+)\)", re.M)


def concept_folders(data_dir, n, root):
    """`n` copies of the images in `data_dir` under `root` (c0, c1, ...); returns their paths."""
    folders = []
    for i in range(n):
        folder = os.path.join(root, f"c{i}")
        if not os.path.isdir(folder):
            shutil.copytree(data_dir, folder)
        folders.append(folder)
    return folders


def common_flags(args, output_dir):
    """The flags every run shares: model, resolution, steps, nothing saved but the embeddings."""
    flags = ["--pretrained_model_name_or_path", args.model, "--resolution", str(args.resolution),
             "--max_train_steps", str(args.steps), "--output_dir", output_dir, "--seed", "0",
             "--save_steps", "0", "--checkpointing_steps", "0", "--report_to", "none"]
    return flags + (["--no_compilation_cache"] if args.no_cache else [])


def run_trainer(flags, cache_dir, log_path):
    """Run `python -m ti_flax.train FLAGS` to the end; returns its wall time and startup timings.

    The compilation cache is `cache_dir` (JAX_COMPILATION_CACHE_DIR wins over ti_flax's default
    folder). The run's output goes to `log_path`; a failed run stops the benchmark with its tail.
    """
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    with open(log_path, "w") as log:
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", "ti_flax.train", *flags], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT, check=False).returncode
        wall = time.perf_counter() - start
    with open(log_path, errors="replace") as f:
        text = f.read()
    startup, devices = STARTUP.search(text), DEVICES.search(text)
    if code or not startup:
        raise SystemExit(f"run failed (exit {code}): {' '.join(flags)}\n{text[-3000:]}")
    return {"wall_s": wall, "load_model_s": float(startup.group(1)),
            "compile_step_s": float(startup.group(2)) if startup.group(2) else None,
            "devices": int(devices.group(1)) if devices else None, "backend": devices.group(2) if devices else None}


def separate_runs(args, n, folders, work):
    """N single-concept runs one after another, sharing one fresh compilation cache."""
    cache = tempfile.mkdtemp(prefix="jaxcache-", dir=work)
    runs = []
    for i in range(n):
        flags = common_flags(args, os.path.join(work, f"sep{n}-c{i}")) + [
            "--train_data_dir", folders[i], "--placeholder_token", f"<c{i}>", "--initializer_token", "toy",
            "--train_batch_size", str(args.batch)]
        runs.append(run_trainer(flags, cache, os.path.join(work, f"sep{n}-c{i}.log")))
        print(f"  N={n} separate run {i + 1}/{n}: {describe(runs[-1])}", flush=True)
    return runs


def combined_run(args, n, folders, work):
    """One run of all N concepts (equal weights) at N x --batch per device, with a fresh cache."""
    concepts_file = os.path.join(work, f"concepts{n}.json")
    with open(concepts_file, "w") as f:
        json.dump([{"placeholder_token": f"<c{i}>", "initializer_token": "toy", "train_data_dir": folders[i]}
                   for i in range(n)], f, indent=1)
    flags = common_flags(args, os.path.join(work, f"one{n}")) + [
        "--concepts", concepts_file, "--train_batch_size", str(n * args.batch)]
    run = run_trainer(flags, tempfile.mkdtemp(prefix="jaxcache-", dir=work), os.path.join(work, f"one{n}.log"))
    print(f"  N={n} one run of {n} concepts: {describe(run)}", flush=True)
    return run


def describe(run):
    compile_s = f"{run['compile_step_s']:.1f} s" if run["compile_step_s"] is not None else "-"
    return (f"{run['wall_s']:.1f} s wall (load {run['load_model_s']:.1f} s, compile {compile_s}, "
            f"rest {run['wall_s'] - run['load_model_s'] - (run['compile_step_s'] or 0):.1f} s)")


def report(args, results):
    """A markdown table of the totals, then one line per run."""
    devices = results[0]["combined"]["devices"] if results else None
    cache = "off (--no_compilation_cache)" if args.no_cache else "a fresh folder per measurement"
    lines = [
        f"\nN concepts in one run vs N single-concept runs: {args.steps} steps each; separate runs at "
        f"{args.batch} per device, the combined run at N x {args.batch}; {devices} device(s), "
        f"{args.resolution} px; compilation cache {cache}. Wall time of whole processes "
        "(imports, model load, compile, steps, outputs).\n",
        "| N | N separate runs (s) | one run of N concepts (s) | speed-up |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        sep = sum(run["wall_s"] for run in r["separate"])
        lines.append(f"| {r['n']} | {sep:.1f} | {r['combined']['wall_s']:.1f} | {sep / r['combined']['wall_s']:.2f}x |")
    lines.append("\nPer run (load and compile from the trainer's startup line; rest: imports, data, steps, outputs):")
    for r in results:
        for i, run in enumerate(r["separate"]):
            lines.append(f"  N={r['n']} separate {i + 1}/{r['n']}: {describe(run)}")
        lines.append(f"  N={r['n']} one run:      {describe(r['combined'])}")
    if not args.no_cache:
        lines.append("Separate runs after the first load the step from the cache the first one wrote.")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: build the sd1-small layout into a temporary folder)")
    p.add_argument("--data", default=os.path.join(HERE, "sample_images"), help="images, copied once per concept")
    p.add_argument("--concepts", type=int, nargs="+", default=[1, 4, 8], metavar="N", help="concept counts to compare")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps of every run")
    p.add_argument("--batch", type=int, default=1, help="per-device batch of a single-concept run (combined: N x this)")
    p.add_argument("--resolution", type=int, help="training resolution (default: the model's own)")
    p.add_argument("--no-cache", action="store_true", help="pass --no_compilation_cache to every run")
    p.add_argument("--out", default="bench_concepts.json", help="JSON file for every figure")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.concepts) or args.steps < 1 or args.batch < 1:
        p.error("--concepts, --steps and --batch must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="ti-bench-concepts-")
    try:
        if not args.model:
            import make_tiny_model

            args.model = make_tiny_model.build_tiny_model(os.path.join(work, "model"), "sd1-small")
            model = "sd1-small layout (make_tiny_model.py), built for this run"
        else:
            model = args.model
        args.resolution = args.resolution or model_resolution(args.model)
        folders = concept_folders(args.data, max(args.concepts), os.path.join(work, "data"))
        results = []
        for n in args.concepts:
            print(f"\n== N = {n} ==", flush=True)
            separate = separate_runs(args, n, folders, work)
            results.append({"n": n, "separate": separate, "combined": combined_run(args, n, folders, work)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(args, results)
    print(text)
    meta = {"model": model, "steps": args.steps, "batch_per_device": args.batch, "resolution": args.resolution,
            "compilation_cache": not args.no_cache, "argv": sys.argv[1:]}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results, "table": text}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
