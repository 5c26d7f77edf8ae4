"""Pivotal tuning on the planted-concept model: the rows alone, the LoRA alone and both.

Two concepts of the planted model (planted_denoiser.py, one model per seed, cached as
bench_learning.py caches them):

- `ring`, which the denoiser learned with a row v* that no token has: reachable through rows.
- `stripes`, a pattern the denoiser never saw (orange and teal horizontal stripes in a square,
  drawn here): no row makes the denoiser draw it well, so only a change of the UNet's response
  (the LoRA) can explain its images.

Each method trains STEPS updates from the initializer's row on the concept's 8 training images,
then is scored on 64 held-out images at the validation loss's fixed draws: the held-out loss L,
and the loss closed from the start, L(start) - L, with its standard error over the paired
held-out examples. For `ring` also the gap closed, (L(start) - L) / (L(start) - L(v*)). And the
drift: how much the LoRA raises the loss of the vocabulary's own captions (fresh draws), which
no row changes. Scores are read from each run's files (`--score_only` rescores runs in --out).

    python scripts/bench_pivotal.py --seeds 0 1 2 --out /tmp/pivotal     # about 15 minutes on 2 cores

Prints a markdown table, and writes results.json to --out.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_learning  # noqa: E402
import planted_denoiser  # noqa: E402
from ti_flax import parallel, train  # noqa: E402
from ti_flax.training import compile_cache  # noqa: E402

STEPS = 1000
RANK = 4
LEARNING_RATE = 2e-3  # the rows': bench_learning.py's docs run (docs/benchmarks.md), where 1,000 updates learn
LORA_LEARNING_RATE = 1e-3
METHODS = {
    "rows alone (TI)": {},
    "LoRA alone": {"lora_rank": RANK, "train_text_encoder_ti_frac": 0.0},
    "pivotal, frac 0.5": {"lora_rank": RANK, "train_text_encoder_ti_frac": 0.5},
    "pivotal, frac 1.0": {"lora_rank": RANK, "train_text_encoder_ti_frac": 1.0},
}
STRIPES = ((240, 140, 20), (20, 160, 160))  # orange and teal: no caption and no concept uses them


def draw_stripes(rng):
    """uint8 [SIDE, SIDE, 3]: a square of 2-pixel horizontal stripes (left-right symmetric, as
    every planted shape) on grey, at the planted shapes' sizes and positions."""
    side = planted_denoiser.SIDE
    size = int(rng.integers(10, 14))
    top, left = ((side - size) // 2 + int(v) for v in rng.integers(-1, 2, 2))
    image = np.empty((side, side, 3), np.uint8)
    image[:] = planted_denoiser.BACKGROUND
    for y in range(top, top + size):
        image[y, left:left + size] = STRIPES[((y - top) // 2) % 2]
    return image


def images_of(planted, name, stream, count):
    if name != "stripes":
        return planted_denoiser.concept_images(name, count, planted.seed, stream)
    rng = np.random.default_rng([planted.seed, 7, stream])
    return np.stack([draw_stripes(rng) for _ in range(count)])


class Scorer:
    """The held-out loss of one concept, with rows and (optionally) a LoRA."""

    def __init__(self, planted, name):
        from ti_flax import models
        from ti_flax.data.batches import ValidationImages
        from ti_flax.data.prompts import CUT, encode_prompt
        from ti_flax.training.validation_loss import Evaluator

        self.planted = planted
        concept = planted_denoiser.BY_NAME.get(name) or planted_denoiser.Concept(name)
        tokenizer, (group,) = planted_denoiser.placeholder_tokenizer(planted.model.tokenizer, [concept], 1)
        ids = encode_prompt(tokenizer, planted_denoiser.PROMPT.format(group[0]), [group], overflow=CUT)
        images = images_of(planted, name, 2, planted_denoiser.HELD_OUT)
        self.evaluator = Evaluator(planted.model.spec, models.Compute(),
                                   ValidationImages(images, np.repeat(ids[None], len(images), 0),
                                                    np.zeros(len(images), np.int32)), planted.seed, planted.devices)

    def per_example(self, rows, lora=None):
        devices = self.planted.devices
        frozen = self.planted.frozen
        if lora is not None:
            factors, scale = lora
            scaled = {m: {"lora_A": p["lora_A"], "lora_B": p["lora_B"] * np.float32(scale)} for m, p in factors.items()}
            frozen = frozen.with_lora(parallel.replicate(scaled, devices), 1.0)
        rows = parallel.replicate(np.asarray(rows, np.float32), devices)
        return self.evaluator.per_example(rows, frozen).astype(np.float64)


class VocabularyScorer(Scorer):
    """The drift: the held-out loss of the vocabulary's own captions ("a photo of a red square", ...,
    fresh draws: 2 per caption), whose prompts have no concept token, so only a LoRA changes it."""

    def __init__(self, planted):
        from ti_flax import models
        from ti_flax.data.batches import ValidationImages
        from ti_flax.data.prompts import CUT, encode_prompt
        from ti_flax.training.validation_loss import Evaluator

        self.planted = planted
        images, phrases = planted_denoiser.captioned_images(2, planted.seed + 1000)
        ids = np.stack([encode_prompt(planted.model.tokenizer, planted_denoiser.PROMPT.format(p), overflow=CUT)
                        for p in phrases])
        self.evaluator = Evaluator(planted.model.spec, models.Compute(),
                                   ValidationImages(images, ids, np.zeros(len(images), np.int32)), planted.seed,
                                   planted.devices)


def outputs(out_dir, planted):
    """(rows, (LoRA factors, 1.0) or None) of a finished run's files: the LoRA's scale is folded
    into pytorch_lora_weights.safetensors."""
    from ti_flax import families, formats
    from ti_flax.formats import lora as lora_files

    rows = formats.read_embedding(os.path.join(out_dir, "learned_embeds.safetensors")).rows
    path = os.path.join(out_dir, lora_files.DIFFUSERS_FILE)
    if not os.path.exists(path):
        return rows, None
    spec = planted.model.spec
    family = families.of(spec)
    shapes = family.lora_targets(spec, ("attn", "ff", "proj"))
    return rows, (lora_files.read(path, shapes, family.kohya_lora_names(spec, shapes)), 1.0)


def run(planted, name, method, out, steps, learning_rate, lora_learning_rate, score_only=False):
    data_dir = planted.write_images(name, bench_learning.data_folder(out, planted.seed, name)) if name != "stripes" \
        else write_stripes(planted, bench_learning.data_folder(out, planted.seed, name))
    out_dir = os.path.join(out, "runs", f"seed{planted.seed}", name, method.replace(" ", "_").replace(",", ""))
    concept = planted_denoiser.BY_NAME.get(name) or planted_denoiser.Concept(name)
    changes = dict(METHODS[method], learning_rate=learning_rate)
    if "lora_rank" in changes:
        changes["lora_learning_rate"] = lora_learning_rate
    config = bench_learning.config_for(planted, "ring", data_dir, out_dir, steps, changes, 0,
                                       placeholder_token=concept.token)
    start = time.perf_counter()
    if not (score_only and os.path.exists(os.path.join(out_dir, "learned_embeds.safetensors"))):
        train(config, devices=planted.train_devices)
    seconds = time.perf_counter() - start
    return (*outputs(out_dir, planted), seconds)


def write_stripes(planted, folder):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images_of(planted, "stripes", 1, planted.num_images)):
        Image.fromarray(image).save(os.path.join(folder, f"{i:02d}.png"))
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--out", default="/tmp/pivotal")
    p.add_argument("--cache", default=None, help="planted models' folder (default: bench_learning's)")
    p.add_argument("--concepts", nargs="+", default=["ring", "stripes"])
    p.add_argument("--learning_rate", type=float, default=LEARNING_RATE, help="the rows' (default 2e-3)")
    p.add_argument("--lora_learning_rate", type=float, default=LORA_LEARNING_RATE, help="the LoRA's (default 1e-3)")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--score_only", action="store_true", help="score the runs already in --out; train the missing")
    args = p.parse_args()
    compile_cache.configure(enabled=True)
    cache = args.cache or os.path.join(compile_cache.cache_root(), "planted")
    devices = jax.local_devices()
    records = []
    for seed in args.seeds:
        model_dir = planted_denoiser.cached_build(seed, cache, log=print)
        planted = planted_denoiser.Planted(model_dir, seed, devices=devices)
        planted.train_devices = devices[:1]
        vocabulary = VocabularyScorer(planted)
        base_vocabulary = vocabulary.per_example(planted.start(1))
        for name in args.concepts:
            scorer = Scorer(planted, name)
            start_loss = scorer.per_example(planted.start(1))
            target = scorer.per_example(planted.rows[name]) if name in planted.rows else None
            for method in args.methods:
                rows, lora, seconds = run(planted, name, method, args.out, args.steps, args.learning_rate,
                                          args.lora_learning_rate, args.score_only)
                loss = scorer.per_example(rows, lora)
                closed = start_loss - loss
                drift = vocabulary.per_example(planted.start(1), lora) - base_vocabulary
                record = {"seed": seed, "concept": name, "method": method, "loss": float(loss.mean()),
                          "closed": float(closed.mean()), "closed_se": float(closed.std(ddof=1) / np.sqrt(len(closed))),
                          "drift": float(drift.mean()), "drift_se": float(drift.std(ddof=1) / np.sqrt(len(drift))),
                          "start_loss": float(start_loss.mean()), "seconds": seconds}
                if target is not None:
                    record["gap_closed"] = float(closed.mean() / (start_loss - target).mean())
                records.append(record)
                print(json.dumps(record), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    print("\n| concept | method | held-out loss | closed from the start (+- s.e.) | gap closed | drift on the "
          "vocabulary (+- s.e.) | seeds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.concepts:
        for method in args.methods:
            rs = [r for r in records if r["concept"] == name and r["method"] == method]
            closed = np.array([r["closed"] for r in rs])
            se = np.sqrt(np.sum(np.square([r["closed_se"] for r in rs]))) / len(rs)
            gap = np.mean([r["gap_closed"] for r in rs]) if "gap_closed" in rs[0] else float("nan")
            drift = np.mean([r["drift"] for r in rs])
            drift_se = np.sqrt(np.sum(np.square([r["drift_se"] for r in rs]))) / len(rs)
            print(f"| {name} | {method} | {np.mean([r['loss'] for r in rs]):.4f} | {closed.mean():.4f} +- {se:.4f} | "
                  f"{gap:.2f} | {drift:+.4f} +- {drift_se:.4f} | {len(rs)} |")


if __name__ == "__main__":
    main()
