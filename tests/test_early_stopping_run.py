"""--early_stopping dvar end to end on the tiny model: where a run stops, what it writes there,
and that a resumed run, another device count and two processes stop at the same update.

On the tiny model at --learning_rate 5e-3 DVAR's ratio with a window of 10 updates falls from
0.28 after 12 updates to 0.15 after 13 and 0.07 after 14: a threshold of 0.2 stops a 40-update run
at 13, with the ratio 0.05 clear of it on both sides. The criterion itself, its flags and the loop are
tested without a model in test_early_stopping.py.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from test_multihost import finish, free_port, start_workers, worker_args
from ti_flax import TrainConfig, formats, models, parallel, train
from ti_flax.families import Frozen
from ti_flax.training import checkpoint, early_stopping, engine as engine_lib
from ti_flax.training.run import prepare
from ti_flax.training.validation_loss import Evaluator

ONE, FOUR = jax.local_devices()[:1], jax.local_devices()[:4]
STEPS, WINDOW, THRESHOLD = 40, 10, 0.2


def dvar_config(model_dir, data_dir, out, **changes):
    return TrainConfig.tiny(model_dir, data_dir, str(out), **{
        "max_train_steps": STEPS, "train_batch_size": 4, "early_stopping": "dvar", "early_stopping_window": WINDOW,
        "early_stopping_threshold": THRESHOLD, "checkpointing_steps": 5, "validation_loss_steps": 100, **changes})


@pytest.fixture(scope="module")
def whole(tiny_model_dir, sample_images_dir, tmp_path_factory):
    """(config, result, printed output) of an uninterrupted run on one device (global batch 4)."""
    import contextlib
    import io

    config = dvar_config(tiny_model_dir, sample_images_dir, tmp_path_factory.mktemp("whole"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train(config, devices=ONE)
    return config, result, printed.getvalue()


def test_the_run_stops_part_way_and_writes_its_files_as_at_its_last_step(whole):
    # Fails if the loop runs past the stop, if the final files are not the rows of the stopping
    # update, or if the actions due "after the last update" (the validation loss) miss it.
    config, result, printed = whole
    stop = result.stopped_early
    assert stop is not None and WINDOW < stop["step"] < STEPS
    s = stop["step"]
    assert [r["step"] for r in result.history] == list(range(1, s + 1))
    assert [r["step"] for r in result.early_stopping] == list(range(s + 1))  # the starting rows' loss first
    assert stop["ratio"] < THRESHOLD <= result.early_stopping[-2]["ratio"]  # the first evaluation under it
    assert [r["step"] for r in result.validation_losses] == [s]  # "after the last update" is the stop
    final = formats.read_embedding(result.files["diffusers"]).rows
    np.testing.assert_array_equal(final, result.rows)
    if s % 5 == 0:  # a checkpoint at the stop holds the same rows
        at_stop = os.path.join(config.output_dir, f"checkpoint-{s}", "learned_embeds.safetensors")
        np.testing.assert_array_equal(formats.read_embedding(at_stop).rows, final)
    assert not os.path.exists(os.path.join(config.output_dir, f"checkpoint-{(s // 5 + 1) * 5}"))
    # Said in the log, the summary, the model card and metrics.jsonl.
    assert f"early stop at step {s} of {STEPS}: DVAR:" in printed
    assert f"done: step {s} of {STEPS}, stopped early" in printed
    card = open(os.path.join(config.output_dir, "README.md")).read()
    assert f"Stopped early at step {s} of {STEPS} (`--early_stopping dvar`): DVAR:" in card
    assert f"| steps | {s} |" in card
    lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "logs", "metrics.jsonl"))]
    assert [x["step"] for x in lines if "early_stopping_loss" in x] == list(range(s + 1))


def test_a_resumed_run_stops_at_the_same_update_with_the_same_rows(whole, tmp_path, traces):
    # Fails if the checkpoint does not carry the criterion's history (the resumed run would count
    # its window from the resume and stop later), or carries it rounded.
    config, result, _ = whole
    s = result.stopped_early["step"]
    resume_at = max(k for k in range(5, s, 5) if k < s)
    saved = checkpoint.read_meta(os.path.join(config.output_dir, f"checkpoint-{resume_at}"))
    assert saved[checkpoint.EARLY_STOPPING]["steps"] == list(range(resume_at + 1))
    out = tmp_path / "resumed"
    shutil.copytree(os.path.join(config.output_dir, f"checkpoint-{resume_at}"), out / f"checkpoint-{resume_at}")
    before = traces["validation_losses"]
    resumed = train(config.replace(output_dir=str(out), resume_from_checkpoint="latest"), devices=ONE)
    assert resumed.stopped_early == result.stopped_early  # bitwise: the same floats
    assert resumed.early_stopping == result.early_stopping[resume_at + 1:]
    np.testing.assert_array_equal(resumed.rows, result.rows)
    assert traces["validation_losses"] == before  # both losses' programs compiled by the first run, reused


def test_four_devices_stop_at_the_same_update(whole, tiny_model_dir, sample_images_dir, tmp_path):
    # The deterministic loss is the same on any device count (as the validation loss): only the
    # rows' own few-ulp differences between 1 and 4 devices reach it. The ratio is checked to be
    # clear of the threshold on both sides of the stop, so those differences cannot move it.
    config, result, _ = whole
    s = result.stopped_early["step"]
    ratios = {r["step"]: r["ratio"] for r in result.early_stopping if "ratio" in r}
    assert abs(ratios[s] - THRESHOLD) > 1e-3 and abs(ratios[s - 1] - THRESHOLD) > 1e-3
    four = train(config.replace(output_dir=str(tmp_path / "four"), train_batch_size=1), devices=FOUR)
    assert four.stopped_early["step"] == s
    np.testing.assert_allclose(four.rows, result.rows, atol=2e-6)
    np.testing.assert_allclose([r["loss"] for r in four.early_stopping], [r["loss"] for r in result.early_stopping],
                               rtol=1e-5)


def test_two_processes_resuming_a_single_process_checkpoint_stop_at_the_same_update(whole, tiny_model_dir,
                                                                                      sample_images_dir, tmp_path):
    # Process 0 reads the checkpoint and must hand the history to process 1 (broadcast exactly):
    # a process without it would stop at another update, or hang at a collective the other left.
    config, result, _ = whole
    s = result.stopped_early["step"]
    resume_at = max(k for k in range(5, s, 5) if k < s)
    outs = [tmp_path / "out0", tmp_path / "out1"]
    shutil.copytree(os.path.join(config.output_dir, f"checkpoint-{resume_at}"), outs[0] / f"checkpoint-{resume_at}")
    port = free_port()
    extra = ("--early_stopping", "dvar", "--early_stopping_window", str(WINDOW), "--early_stopping_threshold",
             str(THRESHOLD), "--resume_from_checkpoint", "latest")
    args = [worker_args(tiny_model_dir, sample_images_dir, outs[i], port, i, steps=STEPS, checkpointing=5,
                        extra=extra) for i in range(2)]
    for a in args:  # worker_args trains 2 vectors at batch 1; this run is the fixture's: 1 vector, global batch 4
        a[a.index("--num_vectors") + 1] = "1"
        a[a.index("--repeats") + 1] = str(config.repeats)
    outputs = finish(start_workers(args))
    assert f"early stop at step {s} of {STEPS}" in outputs[0], outputs
    rows = formats.read_embedding(str(outs[0] / "learned_embeds.safetensors")).rows
    np.testing.assert_allclose(rows, result.rows, atol=2e-6)


def test_the_deterministic_loss_is_the_validation_losses_at_its_examples(tiny_model_dir, sample_images_dir):
    # The same draws: example k of the deterministic loss is the validation loss's example of
    # (image k, timestep k); fails if its ids, images or timesteps are paired otherwise.
    run = prepare(dvar_config(tiny_model_dir, sample_images_dir, "unused", validation_loss_steps=1), devices=ONE)
    frozen = parallel.replicate(Frozen.from_model(run.model), ONE)
    rows = parallel.replicate(run.init_rows + 0.05, ONE)
    every = Evaluator(run.model.spec, models.Compute(), run.validation_images, 0, ONE).per_example(rows, frozen)
    built = engine_lib.build(run)
    mine = built.deterministic.per_example(rows, built.frozen)
    _, _, ids = early_stopping.examples([len(run.data.images)])
    assert len(mine) == 4
    np.testing.assert_allclose(mine, every[ids], rtol=1e-5)  # the VAE encoded once vs in the program
    assert isinstance(built.deterministic.fn, jax.stages.Compiled)  # compiled ahead, beside the step


def test_with_it_off_nothing_is_recorded(tiny_model_dir, sample_images_dir, tmp_path):
    config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(tmp_path / "off"), checkpointing_steps=2,
                              train_batch_size=4)  # the fixture's step: compiled once
    result = train(config, devices=ONE)
    assert result.stopped_early is None and result.early_stopping == []
    meta = checkpoint.read_meta(os.path.join(config.output_dir, "checkpoint-4"))
    assert checkpoint.EARLY_STOPPING not in meta
    assert "early" not in open(os.path.join(config.output_dir, "README.md")).read().lower()
