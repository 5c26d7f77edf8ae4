"""Does a run learn a concept, how fast, and does --early_stopping dvar stop when it has?

Usage:
    python scripts/bench_learning.py [--out DIR] [--seeds 0 1 2] [--concepts ring pair away]
        [--steps 3000] [--recipe_steps 1000] [--recipes default snr_gamma ...] [--cache DIR]
        [--no_speed]

1. The models: one planted model per seed (make_tiny_model.py --layout planted: the tiny SD 1.x
   blocks at 16 px, weights drawn with numpy by name, the UNet trained until each concept is
   learned; planted_denoiser.py), cached in --cache (default: ti_flax's cache folder's
   `planted/`): a second run, or the tests with TI_FLAX_PLANTED_CACHE, reuse them. Each has three
   concepts, each with its own rows v* that no token has: ring (one random row), pair (two random
   rows) and away (one row turned away from the initializer's).
2. Each run trains `<concept>` from "toy" on 8 training images of one concept with ti_flax's
   `train` at ti_flax's default learning rate (1e-4), a global batch of 4 and no warm-up, the
   rest ti_flax's defaults plus the recipe's flags. Its rows are scored on 64 held-out images of
   the concept (x 4 timesteps: 256 examples) with the validation loss's fixed draws, prompt "a
   photo of a <concept>":

     gap closed = (L(init) - L(rows)) / (L(init) - L(v*))

   1 where the rows explain the held-out images as well as v*, 0 where nothing was learned.
3. The default recipe runs --steps updates (the full run) with the deterministic loss of
   --early_stopping recorded every step (a threshold no run reaches, so it never stops), its
   rows saved every step. DVAR is replayed on that record (training.early_stopping.DVAR) for
   each window, threshold and interval of KNOBS, and checked live: a run with the defaults must
   stop where the replay says, with the full run's rows there, bit for bit. The other recipes
   run --recipe_steps updates, scored every 25 (then every 100 past 1000).
4. Speed (unless --no_speed): seconds per update of the default recipe on one device, plain and
   with the deterministic loss every 1 and every 5 updates, each the median of 300 updates.

Writes DIR/learning.md (every table), DIR/learning.json (every number) and DIR/learning.png
(the gap closed against steps per recipe; the default recipe's runs with DVAR's stops). Every
number is the mean over concepts and seeds with its standard error (the standard deviation over
the runs / sqrt(runs)); the runs are deterministic, so the same arguments give the same tables
(the speed section aside).
"""

import argparse
import json
import os
import sys
import time

# Score on 4 (CPU) devices: the held-out loss is the same number on any count, and faster on several.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import planted_denoiser  # noqa: E402
from ti_flax import TrainConfig, formats, train  # noqa: E402
from ti_flax.training import compile_cache, step as step_lib  # noqa: E402
from ti_flax.training.early_stopping import DVAR  # noqa: E402

RESOLUTION = planted_denoiser.SIDE
LEARNING_RATE = TrainConfig.learning_rate  # ti_flax's default, 1e-4
BATCH = 4  # per device, on one device
STEPS, RECIPE_STEPS = 3000, 1000  # the full run (the guide's habitual 3,000), and the other recipes'
BUDGETS = (100, 250, 500, 1000, 3000)
NEVER = 1e-9  # a DVAR threshold no run reaches: the full run records its deterministic loss and never stops
# Each recipe: the flags it adds to the default recipe (TrainConfig fields), and their spelling.
RECIPES = {
    "default": ({}, "(ti_flax's defaults)"),
    "snr_gamma": ({"snr_gamma": 5.0}, "`--snr_gamma 5`"),
    "noise_offset": ({"noise_offset": 0.1}, "`--noise_offset 0.1`"),
    "norm_preserve": ({"embedding_norm": "preserve"}, "`--embedding_norm preserve`"),
    "norm_decay": ({"embedding_norm_decay": 0.1}, "`--embedding_norm_decay 0.1`"),
    "use_ema": ({"use_ema": True, "ema_decay": 0.99}, "`--use_ema --ema_decay 0.99`"),
    "num_vectors_2": ({"num_vectors": 2}, "`--num_vectors 2`"),
    # The control: the rows' gradient stopped (AdamW's weight decay alone moves them); nothing is learned.
    "no_gradient": ({}, "(defaults, the rows' gradient stopped: a control)"),
}
# DVAR's knobs replayed on the full runs: (window, threshold, every, min_steps); the first is the default.
KNOBS = ([(200, 0.15, 1, 0)] + [(w, t, 1, 0) for w in (100, 200, 400, 800) for t in (0.02, 0.05, 0.1, 0.15, 0.25)
                                if (w, t) != (200, 0.15)]
         + [(200, 0.15, e, 0) for e in (5, 10, 25)] + [(200, 0.15, 1, m) for m in (500, 1000)])


def scored_steps(steps):
    """The steps whose rows are scored: every 25 to 1000, then every 100."""
    return sorted({s for s in range(25, min(steps, 1000) + 1, 25)} | {s for s in range(1100, steps + 1, 100)})


def config_for(planted, concept, data_dir, out_dir, steps, changes, save_steps, **more):
    """The TrainConfig of a run: the benchmark's settings, then `changes` and `more` (flags)."""
    base = dict(
        pretrained_model_name_or_path=planted.model_dir, train_data_dir=data_dir, output_dir=out_dir,
        placeholder_token=planted_denoiser.BY_NAME[concept].token, initializer_token=planted_denoiser.INITIALIZER,
        resolution=RESOLUTION, max_train_steps=steps, train_batch_size=BATCH, learning_rate=LEARNING_RATE,
        lr_warmup_steps=0, save_steps=save_steps, checkpointing_steps=0, seed=planted.seed, report_to="none")
    return TrainConfig(**{**base, **changes, **more})


def train_one(config, devices, broken=False, callbacks=()):
    """`train(config)` on `devices`; with `broken`, the rows' gradient stopped (the control)."""
    if not broken:
        return train(config, callbacks=list(callbacks), devices=devices)
    original = step_lib.diffusion_loss
    step_lib.diffusion_loss = lambda rows, *a, **k: original(jax.lax.stop_gradient(rows), *a, **k)
    step_lib.pmapped_train_step.cache_clear()
    try:
        return train(config, callbacks=list(callbacks), devices=devices)
    finally:
        step_lib.diffusion_loss = original
        step_lib.pmapped_train_step.cache_clear()


def data_folder(out, seed, concept):
    return os.path.join(out, "data", f"seed{seed}", concept)


def saved_rows(out_dir, step):
    return formats.read_embedding(os.path.join(out_dir, f"learned_embeds-steps-{step}.safetensors")).rows


def run_recipe(planted, concept, out, name, steps, learning_rate=LEARNING_RATE):
    """Train recipe `name` on `concept`; {"gap": {step: gap closed}, "seconds"}; the default
    recipe also {"deterministic": [loss after each update 0..steps]} and its rows every step.
    A run whose record.json is in its folder (a finished run of an earlier call) is read back."""
    changes = {**RECIPES[name][0], "learning_rate": learning_rate}
    data_dir = planted.write_images(concept, data_folder(out, planted.seed, concept))
    out_dir = os.path.join(out, "runs", f"seed{planted.seed}", concept, name)
    done = os.path.join(out_dir, "record.json")
    if os.path.isfile(done):
        with open(done) as f:
            record = json.load(f)
        if (record.get("steps"), record.get("learning_rate", LEARNING_RATE)) == (steps, learning_rate):
            return {**record, "gap": {int(k): v for k, v in record["gap"].items()}}
    full = name == "default"
    more = {"early_stopping": "dvar", "early_stopping_threshold": NEVER} if full else {}
    config = config_for(planted, concept, data_dir, out_dir, steps, changes, 1 if full else 25, **more)
    start = time.perf_counter()
    result = train_one(config, planted.train_devices, broken=name == "no_gradient")
    seconds = time.perf_counter() - start
    gaps = {0: 0.0}
    for step in scored_steps(steps):
        gaps[step] = planted.score(concept, saved_rows(out_dir, step))[0]
    record = {"gap": gaps, "seconds": seconds, "out_dir": out_dir, "steps": steps, "learning_rate": learning_rate}
    if full:
        record["deterministic"] = [r["loss"] for r in result.early_stopping]
        assert [r["step"] for r in result.early_stopping] == list(range(steps + 1))
    with open(done, "w") as f:
        json.dump(record, f)
    return record


def replay(losses, window, threshold, every, min_steps=0):
    """The update at which DVAR (window, threshold, every, min_steps) stops a run whose
    deterministic loss after each update is `losses`, or None where it never does."""
    criterion = DVAR(window, threshold, min_steps)
    for step in range(0, len(losses), every):
        criterion.add(step, losses[step])
        if criterion.stop is not None:
            return step
    return None


def mean_se(values):
    values = np.asarray([v for v in values if v is not None], np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), 0
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se), len(values)


def cell(values, digits=2):
    mean, se, _ = mean_se(values)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def steps_to(gaps, level=0.9):
    """The first step where the gap closed reaches `level` (linear between scored steps), or None."""
    steps = sorted(gaps)
    for before, after in zip(steps, steps[1:]):
        if gaps[after] >= level:
            g0, g1 = gaps[before], gaps[after]
            return after if g1 == g0 else before + (after - before) * (level - g0) / (g1 - g0)
    return None


def gap_at(record, planted_by_seed, seed, concept, step):
    """The gap closed at `step` of a full default run (scored now if it was not)."""
    if step not in record["gap"]:
        record["gap"][step] = planted_by_seed[seed].score(concept, saved_rows(record["out_dir"], step))[0]
    return record["gap"][step]


def speed(planted, concept, out, learning_rate=LEARNING_RATE):
    """Median seconds per update of the default recipe (300 updates on one device, the first 20
    left out): plain, and with the deterministic loss every 1 and every 5 updates."""
    data_dir = planted.write_images(concept, data_folder(out, planted.seed, concept))
    timings = {}
    for label, more in (("plain", {}), ("dvar every 1", {"early_stopping": "dvar", "early_stopping_threshold": NEVER}),
                        ("dvar every 5", {"early_stopping": "dvar", "early_stopping_threshold": NEVER,
                                          "early_stopping_every": 5})):
        config = config_for(planted, concept, data_dir, os.path.join(out, "speed", label.replace(" ", "_")), 320,
                            {"learning_rate": learning_rate}, 0, **more)
        history = train(config, devices=planted.train_devices).history
        timings[label] = float(np.median([1.0 / r["steps_per_sec"] for r in history[20:]]))
    return timings


def tables(results, signal, dvar, knobs, speeds, args):
    """learning.md's text."""
    lines = ["## The planted signal", "",
             "Held-out gap L(init) - L(v*) ± its standard error (over 256 held-out examples), and how many errors "
             "wide; the denoiser's steps and the prompt's share of its prediction's variance.", "",
             "| seed | denoiser steps | prompt share | " + " | ".join(args.concepts) + " |",
             "| --- | --- | --- |" + " --- |" * len(args.concepts)]
    for seed, record in signal.items():
        gaps = " | ".join(f"{g:.4f} ± {e:.4f} ({g / e:.0f} σ)" for g, e in (record["gaps"][c] for c in args.concepts))
        lines.append(f"| {seed} | {record['steps']} | {record['prompt_share']:.4f} | {gaps} |")
    runs = len(args.seeds) * len(args.concepts)
    budgets = [b for b in BUDGETS if b <= args.steps]
    lines += ["", f"## Recipes at fixed budgets ({runs} runs each: {len(args.concepts)} concepts x "
              f"{len(args.seeds)} seeds; mean ± standard error)", "",
              "| recipe | flags | " + " | ".join(f"gap closed @{b}" for b in budgets) + " | steps to 90% (runs) |",
              "| --- | --- |" + " --- |" * (len(budgets) + 1)]
    for name, per_run in results.items():
        cells = []
        for b in budgets:
            values = [r["gap"].get(b) for r in per_run.values()]
            cells.append(cell(values) if all(v is not None for v in values) else "")
        reach = [steps_to(r["gap"]) for r in per_run.values()]
        mean, se, n = mean_se(reach)
        reached = f"{mean:.0f} ± {se:.0f} ({n}/{len(reach)})" if n else f"never ({n}/{len(reach)})"
        lines.append(f"| {name} | {RECIPES[name][1]} | " + " | ".join(cells) + f" | {reached} |")
    default = results.get("default", {})
    if default:
        lines += ["", "## The default recipe per concept (mean ± standard error over seeds)", "",
                  "| concept | " + " | ".join(f"gap closed @{b}" for b in budgets) + " | steps to 90% (runs) |",
                  "| --- |" + " --- |" * (len(budgets) + 1)]
        for concept in args.concepts:
            mine = [r for (s, c), r in default.items() if c == concept]
            reach = [steps_to(r["gap"]) for r in mine]
            mean, se, n = mean_se(reach)
            lines.append(f"| {concept} | " + " | ".join(cell([r["gap"][b] for r in mine]) for b in budgets)
                         + f" | {f'{mean:.0f} ± {se:.0f}' if n else 'never'} ({n}/{len(reach)}) |")
    if dvar:
        full = args.steps
        lines += ["", f"## DVAR against fixed budgets (the default recipe; the full run is {full} updates)", "",
                  "Fraction of the full run's gap reached (gap closed at the stop / gap closed at the full run's end) "
                  "and fraction of its updates used; mean ± standard error over the runs.", "",
                  "| stop | updates used | fraction of the updates | fraction of the full run's gap |",
                  "| --- | --- | --- | --- |"]
        for label, rows in dvar.items():
            used = [r["step"] for r in rows]
            lines.append(f"| {label} | {cell(used, 0)} | {cell([u / full for u in used])} | "
                         f"{cell([r['fraction'] for r in rows], 3)} |")
    if knobs:
        lines += ["", "## DVAR's knobs, replayed on the full runs", "",
                  "| window | threshold | every | floor | stopped (runs) | fraction of the updates | fraction of the "
                  "full run's gap | runs under 95% |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (window, threshold, every, floor), rows in knobs.items():
            stopped = sum(r["stopped"] for r in rows)
            lines.append(f"| {window} | {threshold:g} | {every} | {floor} | {stopped}/{len(rows)} | "
                         f"{cell([r['step'] / args.steps for r in rows])} | {cell([r['fraction'] for r in rows], 3)} | "
                         f"{sum(r['fraction'] < 0.95 for r in rows)} |")
    if speeds:
        plain = speeds["plain"]
        lines += ["", "## Time to a learned concept (one CPU device here; the default recipe)", "",
                  "| | seconds per update | overhead |", "| --- | --- | --- |"]
        for label, seconds in speeds.items():
            lines.append(f"| {label} | {seconds:.4f} | {seconds / plain - 1:+.0%} |")
        if default:
            reach = mean_se([steps_to(r["gap"]) for r in default.values()])
            stops = mean_se([r["step"] for r in dvar.get("DVAR (200, 0.15, every 1)", [])])
            lines += ["", f"Steps to 90% of the gap: {reach[0]:.0f} ± {reach[1]:.0f} ({reach[2]} of {runs} runs reach "
                      f"it), x {plain:.4f} s per update = **{reach[0] * plain:.1f} s** to a learned concept. "
                      f"The full run: {args.steps} x {plain:.4f} = {args.steps * plain:.0f} s. With DVAR (every "
                      f"update): {stops[0]:.0f} ± {stops[1]:.0f} updates x {speeds['dvar every 1']:.4f} s = "
                      f"**{stops[0] * speeds['dvar every 1']:.1f} s**."]
    return "\n".join(lines) + "\n"


def plot(results, dvar_runs, path):
    """learning.png: the mean gap closed against steps for each recipe; the default recipe's runs
    with DVAR's stops (default knobs) marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    recipes_ax, dvar_ax = fig.subplots(1, 2)
    for name, per_run in results.items():  # from the first scored step: the axis is logarithmic
        steps = sorted(s for s in set.intersection(*(set(r["gap"]) for r in per_run.values())) if s > 0)
        recipes_ax.plot(steps, [np.mean([r["gap"][s] for r in per_run.values()]) for s in steps], label=name)
    recipes_ax.set(xscale="log", xlabel="step", ylabel="gap closed (1: as low as v*)",
                   title="recipes: mean over concepts and seeds")
    recipes_ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    recipes_ax.legend(fontsize=8)
    for (seed, concept), (record, stop) in sorted(dvar_runs.items()):
        steps = sorted(s for s in record["gap"] if s > 0)
        line, = dvar_ax.plot(steps, [record["gap"][s] for s in steps], linewidth=1, label=f"{concept} seed {seed}")
        if stop is not None:
            dvar_ax.plot([stop], [record["gap"][stop]], "o", color=line.get_color())
    dvar_ax.set(xscale="log", xlabel="step", ylabel="gap closed", title="default recipe; dots: where DVAR stops")
    dvar_ax.legend(fontsize=7, ncol=3)
    fig.savefig(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_learning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--concepts", nargs="+", choices=list(planted_denoiser.BY_NAME),
                        default=list(planted_denoiser.BY_NAME))
    parser.add_argument("--steps", type=int, default=STEPS, help="the default recipe's full run")
    parser.add_argument("--recipe_steps", type=int, default=RECIPE_STEPS, help="the other recipes' runs")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--learning_rate", type=float, default=LEARNING_RATE,
                        help="every recipe's (default: ti_flax's, 1e-4)")
    parser.add_argument("--cache", default=os.path.join(compile_cache.cache_root(), "planted"))
    parser.add_argument("--no_speed", action="store_true")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    devices = jax.local_devices()
    planted, signal = {}, {}
    for seed in args.seeds:
        model_dir = planted_denoiser.cached_build(seed, args.cache, log=print)
        planted[seed] = planted_denoiser.Planted(model_dir, seed, devices=devices)
        planted[seed].train_devices = devices[:1]
        signal[seed] = planted_denoiser.read_record(model_dir)
        print(f"seed {seed}: {model_dir}: {signal[seed]['gaps']}", flush=True)
    results = {}
    for name in args.recipes:
        steps = args.steps if name == "default" else args.recipe_steps
        results[name] = {}
        for seed in args.seeds:
            for concept in args.concepts:
                results[name][seed, concept] = record = run_recipe(planted[seed], concept, out, name, steps,
                                                                   args.learning_rate)
                print(name, seed, concept, f"{record['seconds']:.0f} s",
                      {b: round(record["gap"][b], 3) for b in BUDGETS if b in record["gap"]}, flush=True)
    dvar, knobs, dvar_runs = {}, {}, {}
    default = results.get("default", {})
    for (seed, concept), record in default.items():
        final = record["gap"][args.steps]
        for knob in KNOBS:
            stop = replay(record["deterministic"], *knob)
            step = args.steps if stop is None else stop
            knobs.setdefault(knob, []).append(
                {"step": step, "stopped": stop is not None,
                 "fraction": gap_at(record, planted, seed, concept, step) / final})
        for budget in (args.steps // 10, args.steps // 5, args.steps // 3):
            dvar.setdefault(f"fixed budget {budget}", []).append(
                {"step": budget, "fraction": gap_at(record, planted, seed, concept, budget) / final})
        window, threshold, every, _ = KNOBS[0]
        stop = replay(record["deterministic"], *KNOBS[0])
        dvar_runs[seed, concept] = (record, stop)
        # Live: a run with the defaults stops where the replay says, with the full run's rows there.
        live_dir = os.path.join(out, "runs", f"seed{seed}", concept, "dvar")
        config = config_for(planted[seed], concept, data_folder(out, seed, concept), live_dir, args.steps,
                            {"learning_rate": args.learning_rate}, 0, early_stopping="dvar")
        live = train(config, devices=planted[seed].train_devices)
        live_stop = live.stopped_early["step"] if live.stopped_early else None
        assert live_stop == stop, f"seed {seed} {concept}: the live run stopped at {live_stop}, the replay at {stop}"
        if stop is not None:
            assert np.array_equal(live.rows, saved_rows(record["out_dir"], stop)), "the live run's rows differ"
        step = args.steps if stop is None else stop
        dvar.setdefault(f"DVAR ({window}, {threshold:g}, every {every})", []).insert(
            0, {"step": step, "fraction": gap_at(record, planted, seed, concept, step) / final})
        print("dvar", seed, concept, "stop", stop, flush=True)
    dvar = dict(sorted(dvar.items(), key=lambda item: not item[0].startswith("DVAR")))
    speeds = {} if args.no_speed else speed(planted[args.seeds[0]], args.concepts[0], out, args.learning_rate)
    text = tables(results, signal, dvar, knobs, speeds, args)
    with open(os.path.join(out, "learning.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "learning.json"), "w") as f:
        json.dump({"signal": signal,
                   "runs": {name: {f"{s} {c}": {k: r[k] for k in ("gap", "seconds", "deterministic") if k in r}
                                   for (s, c), r in per_run.items()} for name, per_run in results.items()},
                   "dvar": dvar, "knobs": {" ".join(map(str, knob)): rows for knob, rows in knobs.items()},
                   "speed": speeds}, f, indent=1)
    if results:
        plot(results, dvar_runs, os.path.join(out, "learning.png"))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
