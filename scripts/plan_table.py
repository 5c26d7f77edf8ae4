"""The README's table of what fits: `ti_flax.plan` (deviceless) for SD 1.5 at 512 px and SDXL at
1024 px, bf16, with and without --gradient_checkpointing and --cache_latents, on one chip of each
TPU generation. Each row is one compile of the real step from the models' configs (bench_cost.py),
so no weights are needed; answers are cached (~/.cache/ti_flax/plans), so an interrupted run
resumes where it stopped. Needs libtpu (`pip install "jax[tpu]"`, any machine).

    python scripts/plan_table.py                          # everything (SD 1.5: ~20 min a compile on 2 cores)
    python scripts/plan_table.py --model sd15 --batch 4 --target v5e
"""

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_cost  # noqa: E402

MODELS = {"sd15": (512, (1, 4, 8)), "sdxl": (1024, (1, 2, 4))}
VARIANTS = (("", {}), ("--gradient_checkpointing", {"gradient_checkpointing": True}),
            ("--cache_latents", {"cache_latents": True}),
            ("--cache_latents --gradient_checkpointing", {"cache_latents": True, "gradient_checkpointing": True}))


def rows(models, batches, targets):
    from ti_flax import TrainConfig
    from ti_flax.commands import plan as planning
    from ti_flax.training.footprint import GIB

    yield "| model | batch per chip | flags (all bf16) | chip | memory per chip | fits | roofline step |"
    yield "| --- | --- | --- | --- | --- | --- | --- |"
    for model in models:
        resolution, sizes = MODELS[model]
        spec = bench_cost.model_spec(model)
        for batch, (flags, change), target in itertools.product(batches or sizes, VARIANTS, targets):
            config = TrainConfig(pretrained_model_name_or_path=model, resolution=resolution, train_batch_size=batch,
                                 mixed_precision="bf16", **change)
            result = planning.plan(config, target, spec=spec, alternatives=False)
            f, chip = result.run.footprint, result.chip
            seconds = f"{result.run.seconds * 1e3:.0f} ms" if result.run.seconds else "-"
            yield (f"| {model} {resolution} px | {batch} | {flags or '-'} | {target} | {f.total / GIB:.2f} of "
                   f"{chip.memory / GIB:.0f} GiB | {'yes' if result.run.fits else 'no'} | {seconds} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), action="append")
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--target", choices=("v4", "v5e", "v5p", "v6e"), action="append")
    args = parser.parse_args()
    for line in rows(args.model or tuple(MODELS), args.batch, args.target or ("v4", "v5e", "v5p", "v6e")):
        print(line, flush=True)


if __name__ == "__main__":
    main()
