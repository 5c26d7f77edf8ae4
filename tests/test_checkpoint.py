"""Checkpoints: bitwise-exact resume, preemption by signal, crash safety, limits, NaN guard."""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from ti_flax import TrainConfig, train
from ti_flax.training import checkpoint
from ti_flax.training.actions import TrainingDiverged
from ti_flax.commands.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(model_dir, data_dir, out, **changes):
    base = dict(num_vectors=2, checkpointing_steps=3)
    base.update(changes)
    return TrainConfig.tiny(model_dir, data_dir, str(out), **base)


def embedding_bytes(output_dir):
    with open(os.path.join(output_dir, "learned_embeds.safetensors"), "rb") as f:
        return f.read()


@pytest.mark.parametrize("num_devices", [1, 4])
def test_resume_is_bitwise_identical(num_devices, tiny_model_dir, sample_images_dir, tmp_path):
    # The uninterrupted run's own checkpoint-3, alone in a new folder, resumes to its final rows.
    devices = jax.local_devices()[:num_devices]
    whole = config_for(tiny_model_dir, sample_images_dir, tmp_path / "whole", max_train_steps=6)
    train(whole, devices=devices)
    assert [s for s, _ in checkpoint.list_checkpoints(whole.output_dir)] == [3, 6]
    resumed = whole.replace(output_dir=copy_checkpoint(whole, 3, tmp_path / "half"), resume_from_checkpoint="latest")
    result = train(resumed, devices=devices)
    assert [r["step"] for r in result.history] == [4, 5, 6]
    assert embedding_bytes(resumed.output_dir) == embedding_bytes(whole.output_dir)


def test_checkpoint_contents_and_limit(tiny_model_dir, sample_images_dir, tmp_path):
    config = config_for(
        tiny_model_dir, sample_images_dir, tmp_path / "o", max_train_steps=5, checkpointing_steps=1,
        checkpoints_total_limit=2,
    )
    train(config, devices=jax.local_devices()[:1])
    found = checkpoint.list_checkpoints(config.output_dir)
    assert [s for s, _ in found] == [4, 5]
    path = found[-1][1]
    assert sorted(os.listdir(path)) == ["learned_embeds.safetensors", "meta.json", "state.safetensors"]
    meta = checkpoint.read_meta(path)
    assert meta["step"] == 5 and meta["tokens"] == ["<cat-toy>", "<cat-toy>_1"]
    # A few kilobytes: rows and Adam moments, never the frozen models.
    assert sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) < 16_000


def test_latest_without_checkpoint_starts_fresh(tiny_model_dir, sample_images_dir, tmp_path, capsys):
    config = config_for(
        tiny_model_dir, sample_images_dir, tmp_path / "o", max_train_steps=2, checkpointing_steps=0,
        resume_from_checkpoint="latest",
    )
    result = train(config, devices=jax.local_devices()[:1])
    assert "no checkpoint" in capsys.readouterr().out
    assert [r["step"] for r in result.history] == [1, 2]


@pytest.fixture(scope="module")
def three_step_run(tiny_model_dir, sample_images_dir, tmp_path_factory):
    """3 steps with a checkpoint after each: the run every resume check below starts from."""
    config = config_for(tiny_model_dir, sample_images_dir, tmp_path_factory.mktemp("three"), max_train_steps=3,
                        checkpointing_steps=1)
    return config, train(config, devices=jax.local_devices()[:1])


def copy_checkpoint(config, step, out):
    import shutil

    shutil.copytree(os.path.join(config.output_dir, f"checkpoint-{step}"), os.path.join(out, f"checkpoint-{step}"))
    return str(out)


def fewer_images(sample_images_dir, out):
    import shutil

    os.makedirs(out)
    for name in sorted(os.listdir(sample_images_dir))[:2]:
        shutil.copy(os.path.join(sample_images_dir, name), out)
    return str(out)


# Every setting the README says must match on resume, each refused on its own, by name.
@pytest.mark.parametrize(
    "changes, named",
    [
        ({"num_vectors": 3}, "tokens"),
        ({"placeholder_token": "<dog-toy>"}, "--placeholder_token"),
        ({"seed": 5}, "--seed"),
        ({"resolution": 16}, "--resolution"),
        ({"center_crop": True}, "--center_crop"),
        ({"interpolation": "bilinear"}, "--interpolation"),  # the default is bicubic
        ({"learnable_property": "style"}, "--learnable_property"),
        ({"repeats": 3}, "--repeats"),
        ({"flip_p": 0.0}, "--flip_p"),
        ({"gradient_accumulation_steps": 2}, "--gradient_accumulation_steps"),
        ({"train_batch_size": 2}, "global_batch_size"),
        ({"train_data_dir": "FEWER"}, "num_images"),
        # Settings newer than some checkpoints: off in them, so turning one on is refused by name.
        ({"embedding_norm": "preserve"}, "--embedding_norm "),
        ({"embedding_norm_decay": 0.5}, "--embedding_norm_decay"),
        ({"use_ema": True}, "--use_ema"),
        ({"enable_bucket": True, "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 8},
         "--enable_bucket"),
    ],
)
def test_resume_refuses_each_must_match_setting(changes, named, three_step_run, sample_images_dir, tmp_path):
    config, _ = three_step_run
    out = copy_checkpoint(config, 3, tmp_path / "o")
    if changes.get("train_data_dir") == "FEWER":
        changes = {"train_data_dir": fewer_images(sample_images_dir, tmp_path / "few")}
    changed = config.replace(output_dir=out, max_train_steps=6, resume_from_checkpoint="latest", **changes)
    with pytest.raises(checkpoint.UserError, match=named) as err:
        train(changed, devices=jax.local_devices()[:1])
    assert "cannot resume" in str(err.value) or named == "tokens"
    assert sorted(os.listdir(out)) == ["checkpoint-3"]  # nothing written


def test_resume_from_an_explicit_checkpoint(three_step_run, tmp_path):
    # checkpoint-2 named by folder name: step 3 again, bitwise the same rows as the first time.
    config, whole = three_step_run
    out = copy_checkpoint(config, 2, tmp_path / "o")
    copy_checkpoint(config, 3, tmp_path / "o")
    result = train(config.replace(output_dir=out, resume_from_checkpoint="checkpoint-2"), devices=jax.local_devices()[:1])
    assert [r["step"] for r in result.history] == [3]
    assert embedding_bytes(out) == embedding_bytes(config.output_dir)
    np.testing.assert_array_equal(result.rows, whole.rows)


def test_max_grad_norm_clips_the_gradient():
    # Adam normalises the update, so clipping shows in its first moment: 0.1 x the clipped gradient.
    from ti_flax.training.optim import OptimizerSpec

    grad = np.full((2, 4), 5.0, np.float32)  # global norm 5 * sqrt(8)
    for max_norm, expected_norm in ((None, np.linalg.norm(grad)), (0.5, 0.5), (1e6, np.linalg.norm(grad))):
        spec = OptimizerSpec.from_config(TrainConfig(max_grad_norm=max_norm), 1, 10)
        tx = spec.build()
        _, state = tx.update(grad, tx.init(np.zeros_like(grad)), np.zeros_like(grad))
        (mu,) = [leaf.mu for leaf in jax.tree_util.tree_leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(leaf, "mu")]
        assert np.linalg.norm(mu) == pytest.approx(0.1 * expected_norm, rel=1e-5), max_norm
        np.testing.assert_allclose(mu / np.linalg.norm(mu), grad / np.linalg.norm(grad), rtol=1e-6)  # direction kept


def test_resume_refuses_other_base_model(tiny_model_dir, tiny_vpred_model_dir, sample_images_dir, tmp_path):
    out = tmp_path / "o"
    train(config_for(tiny_model_dir, sample_images_dir, out, max_train_steps=3), devices=jax.local_devices()[:1])
    other = config_for(tiny_vpred_model_dir, sample_images_dir, out, max_train_steps=6, resume_from_checkpoint="latest")
    with pytest.raises(checkpoint.UserError, match="base model"):
        train(other, devices=jax.local_devices()[:1])


def test_nan_stops_at_the_step_and_keeps_last_good_checkpoint(tiny_model_dir, sample_images_dir, tmp_path):
    config = config_for(
        tiny_model_dir, sample_images_dir, tmp_path / "o", max_train_steps=6, checkpointing_steps=1,
        learning_rate=1e36,
    )
    with pytest.raises(TrainingDiverged, match=r"step \d") as err:
        train(config, devices=jax.local_devices()[:1])
    bad_step = int(str(err.value).split("step ")[1].split(":")[0])
    steps = [s for s, _ in checkpoint.list_checkpoints(config.output_dir)]
    assert steps == list(range(1, bad_step))  # nothing saved from the bad step on
    assert not os.path.exists(os.path.join(config.output_dir, "learned_embeds.safetensors"))
    for _, path in checkpoint.list_checkpoints(config.output_dir):
        state, _ = checkpoint.load_checkpoint(path, _template(config))
        assert np.all(np.isfinite(state.rows))


def _template(config):
    from ti_flax.training.optim import OptimizerSpec
    from ti_flax.training.step import init_state

    return init_state(np.zeros((config.num_vectors, 32), np.float32), OptimizerSpec.from_config(config, 1, 6))


def cli_args(model_dir, data_dir, out, steps, *extra):
    return [
        "--pretrained_model_name_or_path", model_dir, "--train_data_dir", data_dir, "--output_dir", str(out),
        "--placeholder_token", "<cat-toy>", "--initializer_token", "toy", "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", "5e-3",
        "--lr_warmup_steps", "0", "--save_steps", "0", "--seed", "0", "--num_vectors", "2",
        "--repeats", "10", "--report_to", "none", *extra,
    ]


def start_training(args, script=("-m", "ti_flax.train")):
    """The training command in a subprocess; its output lines are collected by a thread into
    `proc.lines`, so no wait in a test can block on a pipe."""
    proc = subprocess.Popen(
        [sys.executable, *script, *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    proc.lines = []
    threading.Thread(target=lambda: proc.lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return proc


def wait_for(predicate, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            time.sleep(0.5)  # let the reader thread take the last lines
            raise AssertionError("training exited early:\n" + "".join(proc.lines))
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for the training subprocess:\n" + "".join(proc.lines[-20:]))


def finish(proc, timeout=120):
    """Wait for the subprocess (killing it past `timeout`) and return all it printed."""
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    time.sleep(0.2)
    return "".join(proc.lines)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resume_matches(signum, tiny_model_dir, sample_images_dir, tmp_path):
    out = tmp_path / "o"
    metrics = out / "logs" / "metrics.jsonl"
    proc = start_training(cli_args(tiny_model_dir, sample_images_dir, out, 100000, "--checkpointing_steps", "0"))
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
        proc.send_signal(signum)
    finally:
        output = finish(proc)
    assert proc.returncode == 128 + signum, output
    assert "--resume_from_checkpoint latest" in output
    (stopped, _), = checkpoint.list_checkpoints(str(out))
    target = stopped + 2
    assert main(cli_args(tiny_model_dir, sample_images_dir, out, target, "--resume_from_checkpoint", "latest")) == 0
    assert main(cli_args(tiny_model_dir, sample_images_dir, tmp_path / "whole", target)) == 0
    assert embedding_bytes(out) == embedding_bytes(tmp_path / "whole")


@pytest.mark.slow
def test_sigkill_during_save_leaves_previous_checkpoint(tiny_model_dir, sample_images_dir, tmp_path):
    out = tmp_path / "o"
    args = cli_args(tiny_model_dir, sample_images_dir, out, 6, "--checkpointing_steps", "2")
    proc = start_training(args, script=(os.path.join(ROOT, "tests", "pause_in_save.py"), "4"))
    try:
        wait_for(lambda: any("paused inside the save of step 4" in line for line in proc.lines), proc)
    finally:
        proc.kill()
        finish(proc)
    assert any(name.startswith(".checkpoint-4") for name in os.listdir(out))  # the half-written save
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert checkpoint.latest_checkpoint(str(out)).endswith("checkpoint-2")
    with pytest.warns(UserWarning):
        assert main(args + ["--resume_from_checkpoint", "latest"]) == 0
    assert [s for s, _ in checkpoint.list_checkpoints(str(out))] == [2, 4, 6]
