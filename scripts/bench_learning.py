"""Does a run learn a concept? Plant one in a tiny model and measure how much of it training recovers.

Usage:
    python scripts/bench_learning.py [--out DIR] [--steps S] [--every K] [--images N]
        [--recipes default snr_gamma ...] [--prompt_share]

1. The model: make_tiny_model.py's "planted" layout (the tiny SD 1.x blocks, 64-wide text-encoder
   heads, 16 px), built into DIR/model: its UNet trained to denoise captioned shapes
   ("a photo of a red square", ...) and one concept, a ring in colours no caption names, captioned
   with a row v* that no token has (planted_denoiser.py). The saved token table has no v*.
2. The concept: N training images and N held-out images, other draws of the concept from the
   generator the denoiser was trained on (planted_denoiser.concept_images). The trainer sees v*
   only through the training images.
3. Each recipe trains `<planted>` from the initializer token "toy" with ti_flax's `train` for S
   steps (a learning rate of 5e-3, no warm-up and a batch of 4, the rest ti_flax's defaults plus
   the recipe's flags), saving the rows every K steps. Each saved embedding is scored on the held-out images
   with fixed draws (ti_flax.training.validation_loss.Evaluator: kohya's 4 timesteps, the noises of
   validation_key(0)), prompt "a photo of a <planted>" (the first training template):

     gap closed = (L(init) - L(learned)) / (L(init) - L(v*))
     conditioning distance = |C(learned) - C(v*)| / |C(init) - C(v*)|

   where L is the mean held-out loss with those rows and C the text encoder's output [77, 64] for
   the prompt. 1 and 0 mean v* recovered; 0 and 1 mean nothing learned.

Writes DIR/learning.md (the table), DIR/learning.png (gap closed and distance per step, a line per recipe)
and DIR/learning.json. Deterministic: the same arguments give the same table. --prompt_share also
prints the prompt's share of the noise prediction's variance over the planted model's captions for
the "tiny" (random weights) and "planted" models.
"""

import argparse
import copy
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import make_tiny_model  # noqa: E402
import planted_denoiser  # noqa: E402
from ti_flax import TrainConfig, families, formats, models, parallel, tokens, train  # noqa: E402
from ti_flax.data.batches import ValidationImages  # noqa: E402
from ti_flax.data.prompts import CUT, encode_prompt  # noqa: E402
from ti_flax.families import Frozen  # noqa: E402
from ti_flax.training.validation_loss import Evaluator  # noqa: E402

TOKEN, INITIALIZER, PROMPT = "<planted>", "toy", "a photo of a {}"
RESOLUTION = planted_denoiser.SIDE
SEED = 0
LEARNING_RATE = 5e-3
BATCH = 4  # per device: ti_flax's 16 made a step 1.25 s on this 2-core machine
# Each recipe: the flags it adds to the default recipe (TrainConfig fields).
RECIPES = {
    "default": {},
    "snr_gamma": {"snr_gamma": 5.0},
    "noise_offset": {"noise_offset": 0.1},
    "norm_preserve": {"embedding_norm": "preserve"},
    "norm_decay": {"embedding_norm_decay": 0.1},
    "use_ema": {"use_ema": True, "ema_decay": 0.99},
    "num_vectors_2": {"num_vectors": 2},
}
FLAGS = {  # the command-line spelling of each recipe, for the table
    "default": "", "snr_gamma": "--snr_gamma 5", "noise_offset": "--noise_offset 0.1",
    "norm_preserve": "--embedding_norm preserve", "norm_decay": "--embedding_norm_decay 0.1",
    "use_ema": "--use_ema --ema_decay 0.99", "num_vectors_2": "--num_vectors 2",
}


def prompt_share(model_dir, phrases=planted_denoiser.vocabulary(), seed=0):
    """The prompt's share of the UNet's prediction variance: predictions for "a photo of a X" over
    `phrases` (the planted model's captions) at 4 fixed noisy latents (timesteps 200, 400, 600,
    800), the variance over prompts (averaged over latents and elements) divided by the variance
    over everything."""
    model = families.load_model(model_dir)
    spec, compute = model.spec, models.Compute()
    ids = np.stack([encode_prompt(model.tokenizer, f"a photo of a {p}", overflow=CUT) for p in phrases])
    context = families.of(spec).condition(spec, compute, (model.params["text_encoder"],), ids,
                                          np.zeros((1, spec.row_width), np.float32)).context
    size = spec.denoiser.sample_size
    latents = np.random.default_rng(seed).standard_normal((4, 4, size, size), np.float32)
    k, n = len(phrases), len(latents)
    pred = models.predict_noise(spec, compute, model.params["unet"], np.tile(latents, (k, 1, 1, 1)),
                                np.tile(np.array([200, 400, 600, 800], np.int32), k), np.repeat(context, n, axis=0))
    pred = np.asarray(pred, np.float64).reshape(k, n, -1)
    return float(pred.var(axis=0).mean() / pred.var())


class Planted:
    """The planted model and concept: v*, the images, and the held-out scoring.

    Args: model_dir: a "planted" model folder. num_images: training (and held-out) images.
      vector_counts: the --num_vectors of the runs to be scored (each compiles its evaluation).
    """

    def __init__(self, model_dir, num_images=8, seed=SEED, vector_counts=(1, 2)):
        self.model = families.load_model(model_dir)
        spec = self.model.spec
        self.devices = tuple(jax.local_devices()[:1])
        table = np.asarray(models.token_table(self.model.params["text_encoder"]), np.float32)
        self.target = planted_denoiser.planted_row(table, seed)
        self.init_row = table[tokens.initializer_id(self.model.tokenizer, INITIALIZER)][None]
        self.prompt_ids = {n: self._prompt(n) for n in sorted({1, *vector_counts})}  # by number of vectors
        self.train_images = planted_denoiser.concept_images(num_images, seed, stream=1)
        self.held_out = planted_denoiser.concept_images(num_images, seed, stream=2)
        self.frozen = parallel.replicate(Frozen.from_model(self.model), self.devices)
        self.evaluators = {n: Evaluator(spec, models.Compute(), ValidationImages(
            self.held_out, np.repeat(ids[None], len(self.held_out), 0), np.zeros(len(self.held_out), np.int32)),
            seed, self.devices) for n, ids in self.prompt_ids.items()}
        family = families.of(spec)
        encode = jax.jit(lambda params, ids, rows: family.condition(spec, models.Compute(), (params,), ids, rows).context)
        self._context = lambda rows: np.asarray(encode(self.model.params["text_encoder"],
                                                       self.prompt_ids[len(rows)][None], rows))[0]
        self.target_loss, self.target_context = self.loss(self.target), self._context(self.target)

    def _prompt(self, num_vectors):
        """Ids of "a photo of <planted>" with the token's `num_vectors` rows at ids base + i."""
        tokenizer = copy.deepcopy(self.model.tokenizer)
        names = tokens.placeholder_tokens(TOKEN, num_vectors)
        tokens.add_to_tokenizers((tokenizer,), names)
        return encode_prompt(tokenizer, PROMPT.format(TOKEN), [names], overflow=CUT)

    def write_images(self, folder):
        os.makedirs(folder, exist_ok=True)
        for i, image in enumerate(self.train_images):
            Image.fromarray(image).save(os.path.join(folder, f"{i:02d}.png"))
        return folder

    def per_example(self, rows):
        """float64 [examples]: each held-out example's loss with `rows` [n, 64] as the token's rows."""
        rows = np.asarray(rows, np.float32)
        evaluator = self.evaluators[len(rows)]
        return evaluator.per_example(parallel.replicate(rows, self.devices), self.frozen).astype(np.float64)

    def loss(self, rows):
        """The mean held-out loss with `rows` as the token's rows."""
        return float(np.mean(self.per_example(rows)))

    def planted_gap(self):
        """(L(init) - L(v*), its standard error over the held-out examples): the concept can be
        recovered through the loss only where the gap is positive and several errors wide."""
        differences = self.per_example(self.init_row) - self.per_example(self.target)
        return float(differences.mean()), float(differences.std(ddof=1) / np.sqrt(len(differences)))

    def score(self, rows, init_rows):
        """(gap closed, conditioning distance) of `rows` against the run's starting `init_rows`."""
        init_loss = self.loss(init_rows)
        gap = (init_loss - self.loss(rows)) / (init_loss - self.target_loss)
        init_context = self._context(np.asarray(init_rows, np.float32))
        distance = (np.linalg.norm(self._context(np.asarray(rows, np.float32)) - self.target_context)
                    / np.linalg.norm(init_context - self.target_context))
        return float(gap), float(distance), self.loss(rows)


def train_recipe(planted, data_dir, out_dir, steps, every, changes, seed=SEED):
    """Train one recipe; returns {step: (gap closed, conditioning distance)} of its saved rows
    (step 0: the initializer's) and the run's seconds."""
    config = TrainConfig(
        pretrained_model_name_or_path=planted.model.model_dir, train_data_dir=data_dir, output_dir=out_dir,
        placeholder_token=TOKEN, initializer_token=INITIALIZER, resolution=RESOLUTION, max_train_steps=steps,
        train_batch_size=BATCH, learning_rate=LEARNING_RATE, lr_warmup_steps=0, save_steps=every, checkpointing_steps=0,
        seed=seed,
        report_to="none", **changes)
    start = time.perf_counter()
    result = train(config, devices=planted.devices)
    seconds = time.perf_counter() - start
    init_rows = np.repeat(planted.init_row, config.num_vectors, axis=0)
    scores = {0: planted.score(init_rows, init_rows)}
    for step in range(every, steps + 1, every):
        path = os.path.join(out_dir, f"learned_embeds-steps-{step}.safetensors")
        if step == steps and not os.path.exists(path):
            path = result.files["diffusers"]
        scores[step] = planted.score(formats.read_embedding(path).rows, init_rows)
    return scores, seconds


def table(results, steps_shown):
    """The markdown table: gap closed at each of `steps_shown`; at the last step the held-out loss's
    change and the conditioning distance (no timings: the same arguments give the same table)."""
    head = (["recipe", "flags"] + [f"gap closed @{s}" for s in steps_shown]
            + ["L(learned) - L(init)", "cond. distance"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, (scores, _) in results.items():
        last = max(scores)
        cells = [name, f"`{FLAGS[name]}`" if FLAGS[name] else "(ti_flax defaults)"]
        cells += [f"{scores[s][0]:.2f}" for s in steps_shown]
        cells += [f"{scores[last][2] - scores[0][2]:+.5f}", f"{scores[last][1]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """learning.png: per step, the gap closed and the conditioning distance, one line per recipe
    (drawn as model_card.loss_plot draws)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    gap_ax, distance_ax = fig.subplots(1, 2)
    for name, (scores, _) in results.items():
        steps = sorted(scores)
        gap_ax.plot(steps, [scores[s][0] for s in steps], "o-", markersize=3, label=name)
        distance_ax.plot(steps, [scores[s][1] for s in steps], "o-", markersize=3, label=name)
    gap_ax.set(xlabel="step", ylabel="loss gap closed (1: as low as v*)", title="held-out loss")
    distance_ax.set(xlabel="step", ylabel="|C(rows) - C(v*)| / |C(init) - C(v*)|", title="conditioning distance")
    distance_ax.legend(fontsize=8)
    fig.savefig(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_learning")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=25, help="score the rows every K steps")
    parser.add_argument("--images", type=int, default=8, help="training images (as many again held out)")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--prompt_share", action="store_true")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    model_dir = os.path.join(out, "model")
    if not os.path.exists(os.path.join(model_dir, "model_index.json")):
        make_tiny_model.build_tiny_model(model_dir, layout="planted", seed=SEED)
    if args.prompt_share:
        tiny_dir = os.path.join(out, "tiny-model")
        if not os.path.exists(os.path.join(tiny_dir, "model_index.json")):
            make_tiny_model.build_tiny_model(tiny_dir, layout="tiny", seed=SEED)
        print(f"prompt share of the prediction's variance: tiny {prompt_share(tiny_dir):.4f}, "
              f"planted {prompt_share(model_dir):.4f}")
    planted = Planted(model_dir, num_images=args.images)
    data_dir = planted.write_images(os.path.join(out, "data"))
    gap, error = planted.planted_gap()
    summary = (f"held-out loss: L(init) {planted.loss(planted.init_row):.5f}, L(v*) {planted.target_loss:.5f}, "
               f"gap {gap:.5f} +- {error:.5f} (standard error)")
    print(summary)
    if gap < 3 * error:
        print("warning: L(v*) is not clearly below L(init): the images do not single out v* to this model, and "
              "the gap closed is not a measure of learning (the conditioning distance still is one)")
    results = {}
    for name in args.recipes:
        results[name] = train_recipe(planted, data_dir, os.path.join(out, "runs", name), args.steps, args.every,
                                     RECIPES[name])
        print(name, {s: tuple(round(v, 3) for v in sc) for s, sc in results[name][0].items()}, flush=True)
    shown = sorted(s for s in {args.every, args.steps // 2, args.steps} if s % args.every == 0)
    text = f"{summary}\n\n" + table(results, shown)
    with open(os.path.join(out, "learning.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "learning.json"), "w") as f:
        json.dump({name: {"scores": {str(s): v for s, v in scores.items()}, "seconds": sec}
                   for name, (scores, sec) in results.items()}, f, indent=1)
    plot(results, os.path.join(out, "learning.png"))
    print(text)
    print("seconds per recipe (training, compile included):",
          ", ".join(f"{name} {seconds:.0f}" for name, (_, seconds) in results.items()))


if __name__ == "__main__":
    sys.exit(main())
