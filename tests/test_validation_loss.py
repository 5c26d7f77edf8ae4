"""--validation_loss_steps and --validation_split: a validation loss that means something.

The number is the plain MSE of fixed examples (each validation image unflipped with its first
template, at kohya's timesteps 200/400/600/800, noises keyed by example id), the same on any
device count, with cached latents, and after a resume; the held-out images never train.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ti_flax import TrainConfig, families, models, parallel, train
from ti_flax.training import checkpoint, step as step_lib
from ti_flax.config import cli
from ti_flax.data import batches as data, prompts
from ti_flax.errors import UserError
from ti_flax.training.run import prepare
from ti_flax.training.validation_loss import Evaluator
from draws import ddpm_draws

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = jax.local_devices()[:1]
FOUR_DEVICES = jax.local_devices()[:4]
KOHYA_TIMESTEPS = [200, 400, 600, 800]  # sd-scripts train_network.py: linspace(0, 1000, 6)[1:-1]


def tiny(model_dir, data_dir, out, **changes):
    return TrainConfig.tiny(model_dir, data_dir, str(out), **{"validation_loss_steps": 2, **changes})


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, sample_images_dir):
    """A prepared run whose validation images are the 4 training images, and rows off the initializer's."""
    run = prepare(tiny(tiny_model_dir, sample_images_dir, "unused", num_vectors=2), devices=ONE_DEVICE)
    rows = run.init_rows + 0.1 * np.random.default_rng(0).standard_normal(run.init_rows.shape).astype(np.float32)
    return run, rows


def evaluate(run, rows, devices, images=None, cached=False):
    """Per-example validation losses of `rows` on `devices`."""
    frozen = parallel.replicate(families.Frozen.from_model(run.model), devices)
    evaluator = Evaluator(run.model.spec, models.Compute(), images or run.validation_images, run.config.seed, devices,
                          frozen.vae if cached else None)
    return evaluator.per_example(parallel.replicate(rows, devices), frozen._replace(vae=None) if cached else frozen)


def test_loss_is_the_plain_mse_of_the_fixed_draws(prepared):
    run, rows = prepared
    spec, params, compute = run.model.spec, run.model.params, models.Compute()
    images = run.validation_images
    # Every training image, unflipped, with the first object template ("a photo of a {}").
    np.testing.assert_array_equal(images.images, run.data.images)
    template = prompts.templates_for("object")[0].format("<cat-toy> <cat-toy>_1")
    want_ids = prompts.encode_prompt(run.model.tokenizer, template, [["<cat-toy>", "<cat-toy>_1"]], overflow=prompts.CUT)
    assert (images.prompt_ids == np.asarray(want_ids).reshape(1, -1)).all()
    # Written out from the primitives: example e is image e // 4 at KOHYA_TIMESTEPS[e % 4], its
    # noises from fold_in(fold_in(PRNGKey(seed), 2**32 - 1), e).
    key = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), 2**32 - 1)
    ids = np.arange(4 * len(images.images))
    image, t = ids // 4, np.asarray(KOHYA_TIMESTEPS, np.int32)[ids % 4]
    mean, logvar = step_lib.encode_pixels(spec, compute, params["vae"], images.images[image])
    eps, noise, _ = ddpm_draws(key, jnp.asarray(ids), mean.shape[1:], spec.num_train_timesteps)
    latents = (mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * eps) * spec.scaling_factor
    a = np.asarray(run.model.alphas_cumprod)[t][:, None, None, None]
    noisy = np.sqrt(a) * latents + np.sqrt(1 - a) * noise
    hidden = models.encode_text(spec, compute, params["text_encoder"], images.prompt_ids[image], rows)
    pred = models.predict_noise(spec, compute, params["unet"], noisy, t, hidden)
    want = np.mean(np.square(np.asarray(pred, np.float64) - np.asarray(noise, np.float64)), axis=(1, 2, 3))
    got = evaluate(run, rows, ONE_DEVICE)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert len(set(np.round(got, 6))) == len(got)  # 16 different draws, not one repeated


def test_the_same_on_one_and_four_devices_and_from_cached_latents(prepared):
    run, rows = prepared
    three = run.validation_images._replace(**{k: getattr(run.validation_images, k)[:3]
                                              for k in ("images", "prompt_ids", "concept_ids")})
    # 12 examples: one device computes 3 calls of 4, four devices one call of 16 with 4 padded.
    one = evaluate(run, rows, ONE_DEVICE, three)
    np.testing.assert_array_equal(evaluate(run, rows, FOUR_DEVICES, three), one)
    np.testing.assert_allclose(evaluate(run, rows, FOUR_DEVICES, three, cached=True), one, rtol=1e-5)


def test_the_loss_compiled_ahead_is_the_loss_compiled_on_its_first_call(prepared):
    run, rows = prepared
    frozen = parallel.replicate(families.Frozen.from_model(run.model), ONE_DEVICE)
    evaluator = Evaluator(run.model.spec, models.Compute(), run.validation_images, run.config.seed, ONE_DEVICE)
    replicated = parallel.replicate(rows, ONE_DEVICE)
    evaluator.compile_in_background(replicated, frozen)
    got = evaluator.per_example(replicated, frozen)
    assert isinstance(evaluator.fn, jax.stages.Compiled)  # the program compiled ahead ran
    np.testing.assert_array_equal(got, evaluate(run, rows, ONE_DEVICE))


def test_the_engine_compiles_the_loss_before_the_loop_needs_it(prepared):
    # Not inside the training loop: the first evaluation then only waits for (or reads) the
    # program compiled behind the first steps.
    from ti_flax.training import engine

    run, _ = prepared
    built = engine.build(run)
    assert built.validation_loss()["loss"] > 0
    assert isinstance(built.evaluator.fn, jax.stages.Compiled)


@pytest.fixture(scope="module")
def learning_run(tiny_model_dir, sample_images_dir, tmp_path_factory):
    """test_train.test_learning_is_real's setup (one device, global batch 4, 2 vectors, 40 steps),
    the validation loss every 20 updates and a checkpoint at 20."""
    config = tiny(tiny_model_dir, sample_images_dir, tmp_path_factory.mktemp("learn"), num_vectors=2, train_batch_size=4,
                  max_train_steps=40, validation_loss_steps=20, checkpointing_steps=20, report_to="tensorboard")
    records = []
    return config, train(config, callbacks=[records.append], devices=ONE_DEVICE), records


def test_the_loss_falls_as_the_rows_learn(learning_run, prepared):
    config, result, records = learning_run
    run, _ = prepared
    before = float(np.mean(evaluate(run, run.init_rows, ONE_DEVICE)))
    assert [r["step"] for r in result.validation_losses] == [20, 40]
    assert result.validation_losses[-1]["loss"] < before
    # Logged everywhere: the callbacks, metrics.jsonl, TensorBoard, the summary's timings.
    assert [r for r in records if r["kind"] == "validation_loss"] == result.validation_losses
    lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "logs", "metrics.jsonl"))]
    assert [(x["step"], x["validation_loss"]) for x in lines if "validation_loss" in x] == [
        (r["step"], r["loss"]) for r in result.validation_losses]
    from test_validation import read_event_scalars

    assert "validation_loss" in read_event_scalars(os.path.join(config.output_dir, "logs"))
    assert result.timings["validation_loss_s"] >= result.timings["validation_loss_first_s"] > 0


def test_a_resumed_run_reports_the_same_loss_and_traces_nothing_again(learning_run, tmp_path, traces):
    config, whole, _ = learning_run
    before = traces["validation_losses"]
    out = tmp_path / "half"
    shutil.copytree(os.path.join(config.output_dir, "checkpoint-20"), out / "checkpoint-20")
    resumed = train(config.replace(output_dir=str(out), resume_from_checkpoint="latest"), devices=ONE_DEVICE)
    assert resumed.validation_losses == [whole.validation_losses[-1]]  # bitwise: the same float
    assert before >= 1 and traces["validation_losses"] == before  # compiled by the first run, reused


def held_out_run(model_dir, images_dir, seed=0, split=0.5, **changes):
    return prepare(tiny(model_dir, images_dir, "unused", seed=seed, validation_split=split, **changes),
                   devices=ONE_DEVICE)


def test_validation_split_holds_its_images_out_of_every_batch(tiny_model_dir, sample_images_dir):
    run = held_out_run(tiny_model_dir, sample_images_dir)
    everything = held_out_run(tiny_model_dir, sample_images_dir, split=0.0).data.images
    held, kept = run.validation_images.images, run.data.images
    assert len(held) == 2 and len(kept) == 2  # round(4 x 0.5)
    as_bytes = lambda images: {x.tobytes() for x in images}  # noqa: E731
    assert as_bytes(held) | as_bytes(kept) == as_bytes(everything) and not as_bytes(held) & as_bytes(kept)
    shown = set()
    for step in range(2 * run.data.steps_per_epoch):
        batch = run.data.global_batch(step)
        shown |= as_bytes(batch.pixel_values) | as_bytes(batch.pixel_values[:, :, ::-1])
    assert not shown & as_bytes(held) and as_bytes(kept) <= shown
    # Chosen from the seed: the same images every time, other ones for another seed.
    assert as_bytes(held_out_run(tiny_model_dir, sample_images_dir).validation_images.images) == as_bytes(held)
    other = [as_bytes(held_out_run(tiny_model_dir, sample_images_dir, seed=s).validation_images.images)
             for s in (1, 2, 3)]
    assert any(h != as_bytes(held) for h in other)


def test_validation_split_holds_out_per_concept(tiny_model_dir, sample_images_dir, tmp_path):
    concepts = [{"placeholder_token": tok, "train_data_dir": sample_images_dir, "initializer_token": "toy"}
                for tok in ("<a>", "<b>")]
    config = TrainConfig.tiny(tiny_model_dir, "", str(tmp_path), placeholder_token="", initializer_token="",
                              concepts=concepts, validation_loss_steps=1, validation_split=0.25)
    run = prepare(config, devices=ONE_DEVICE)
    assert run.validation_images.concept_ids.tolist() == [0, 1] and len(run.data.images) == 6


def test_hold_out_is_kohyas_count_and_refuses_none_or_all():
    kept, held = data.hold_out(10, 0.2, seed=0)
    assert len(held) == round(10 * 0.2) and sorted(np.concatenate([kept, held])) == list(range(10))
    with pytest.raises(UserError, match=r"--validation_split 0.1 holds out no image of 4"):
        data.hold_out(4, 0.1, seed=0)
    with pytest.raises(UserError, match="holds out all 4 images; at least one must stay in training"):
        data.hold_out(4, 0.9, seed=0)


@pytest.mark.parametrize("changes, expected", [
    ({"validation_loss_steps": -1}, "--validation_loss_steps must be >= 0"),
    ({"validation_loss_steps": 5, "validation_split": 1.0}, "--validation_split must be a fraction in [0, 1)"),
    ({"validation_loss_steps": 5, "validation_split": -0.1}, "--validation_split must be a fraction in [0, 1)"),
    ({"validation_split": 0.2}, "--validation_split holds images out for the validation loss only"),
])
def test_bad_values_are_one_line(changes, expected):
    config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", placeholder_token="<t>",
                         initializer_token="toy", **changes)
    with pytest.raises(UserError) as err:
        config.validate()
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_flags_parse_and_default_off():
    required = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--placeholder_token", "<t>",
                "--initializer_token", "toy"]
    assert (cli.parse_config(required).validation_loss_steps, cli.parse_config(required).validation_split) == (0, 0.0)
    parsed = cli.parse_config(required + ["--validation_loss_steps", "50", "--validation_split", "0.2"])
    assert (parsed.validation_loss_steps, parsed.validation_split) == (50, 0.2)


def test_resume_refuses_another_split_and_allows_another_interval():
    meta = {"fingerprint_version": 2, "model_fingerprint": "x", "tokens": ["<t>"], "global_batch_size": 1,
            "num_images": 4, "config": json.loads(TrainConfig(validation_loss_steps=5).to_json())}
    current = {**meta, "config": {**meta["config"], "validation_loss_steps": 50}}
    checkpoint.check_compatible(meta, current, "ckpt")  # the interval may change
    split = {**meta, "config": {**meta["config"], "validation_split": 0.5}}
    with pytest.raises(UserError, match=r"--validation_split \(0.0 vs 0.5\)"):
        checkpoint.check_compatible(meta, split, "ckpt")
    old = {**meta, "config": {k: v for k, v in meta["config"].items() if not k.startswith("validation_")}}
    checkpoint.check_compatible(old, meta, "ckpt")  # a checkpoint from before the flags: the split was 0


# Everything a run imports (the commands, the loop, its actions, the outputs), and what runs
# without a plot: prepare, the validation loss, its log lines. The train step itself is left out:
# its compile would only slow the test, and it imports nothing.
NO_PLOT_ON_THE_TRAINING_PATH = """
import sys, jax
from ti_flax import TrainConfig, parallel
from ti_flax.commands import export, generate, plan, train
from ti_flax.config import cli
from ti_flax.families import Frozen
from ti_flax.training import actions, engine, logs, model_card, outputs
from ti_flax.training.run import prepare
from ti_flax.training.validation_loss import Evaluator
devices = jax.local_devices()[:1]
run = prepare(TrainConfig.tiny(sys.argv[1], sys.argv[2], sys.argv[3], num_vectors=2, validation_loss_steps=2,
                               report_to="tensorboard"), devices=devices)
frozen = parallel.replicate(Frozen.from_model(run.model), devices)
evaluator = Evaluator(run.model.spec, run.compute, run.validation_images, 0, devices)
logger = logs.MetricsLogger(sys.argv[3], report_to="tensorboard")
logger.log(2, {"validation_loss": evaluator(parallel.replicate(run.init_rows, devices), frozen)["loss"]}, prefix="")
logger.close()
assert "matplotlib" not in sys.modules, "matplotlib imported on the training path"
model_card.loss_plot([{"step": 1, "loss": 0.5}])
assert "matplotlib" in sys.modules
print("ok")
"""


def test_training_never_imports_matplotlib(tiny_model_dir, sample_images_dir, tmp_path):
    done = subprocess.run([sys.executable, "-c", NO_PLOT_ON_THE_TRAINING_PATH, tiny_model_dir, sample_images_dir,
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
