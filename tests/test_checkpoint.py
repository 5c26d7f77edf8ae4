"""Checkpoints: bitwise-exact resume, preemption by signal, crash safety, limits, NaN guard."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ti_flax import TrainConfig, checkpoint, train
from ti_flax.train import TrainingDiverged, main

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
    devices = jax.local_devices()[:num_devices]
    whole = config_for(tiny_model_dir, sample_images_dir, tmp_path / "whole", max_train_steps=6)
    train(whole, devices=devices)
    half = config_for(tiny_model_dir, sample_images_dir, tmp_path / "half", max_train_steps=3)
    train(half, devices=devices)
    assert [s for s, _ in checkpoint.list_checkpoints(half.output_dir)] == [3]
    resumed = half.replace(max_train_steps=6, resume_from_checkpoint="latest")
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


@pytest.mark.parametrize(
    "changes, named",
    [({"num_vectors": 3}, "tokens"), ({"seed": 5}, "--seed"), ({"resolution": 16}, "--resolution")],
)
def test_incompatible_resume_says_what_differs(changes, named, tiny_model_dir, sample_images_dir, tmp_path):
    out = tmp_path / "o"
    train(config_for(tiny_model_dir, sample_images_dir, out, max_train_steps=3), devices=jax.local_devices()[:1])
    changed = config_for(tiny_model_dir, sample_images_dir, out, max_train_steps=6, resume_from_checkpoint="latest")
    with pytest.raises(checkpoint.UserError, match=named):
        train(changed.replace(**changes), devices=jax.local_devices()[:1])


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
    from ti_flax.optim import OptimizerSpec
    from ti_flax.step import init_state

    return init_state(np.zeros((config.num_vectors, 32), np.float32), OptimizerSpec.from_config(config, 1, 6))


def cli_args(model_dir, data_dir, out, steps, *extra):
    return [
        "--pretrained_model_name_or_path", model_dir, "--train_data_dir", data_dir, "--output_dir", str(out),
        "--placeholder_token", "<cat-toy>", "--initializer_token", "toy", "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", "5e-3",
        "--lr_warmup_steps", "0", "--save_steps", "0", "--seed", "0", "--num_vectors", "2",
        "--repeats", "10", "--report_to", "none", *extra,
    ]


def start_training(args, **env):
    return subprocess.Popen(
        [sys.executable, "-m", "ti_flax.train", *args],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for the training subprocess")


def test_sigterm_checkpoints_and_resume_matches(tiny_model_dir, sample_images_dir, tmp_path):
    out = tmp_path / "o"
    metrics = out / "logs" / "metrics.jsonl"
    proc = start_training(cli_args(tiny_model_dir, sample_images_dir, out, 100000, "--checkpointing_steps", "0"))
    with proc:
        try:
            wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "--resume_from_checkpoint latest" in output
    (stopped, _), = checkpoint.list_checkpoints(str(out))
    target = stopped + 2
    assert main(cli_args(tiny_model_dir, sample_images_dir, out, target, "--resume_from_checkpoint", "latest")) == 0
    assert main(cli_args(tiny_model_dir, sample_images_dir, tmp_path / "whole", target)) == 0
    assert embedding_bytes(out) == embedding_bytes(tmp_path / "whole")


def test_sigkill_during_save_leaves_previous_checkpoint(tiny_model_dir, sample_images_dir, tmp_path):
    out = tmp_path / "o"
    args = cli_args(tiny_model_dir, sample_images_dir, out, 6, "--checkpointing_steps", "2")
    proc = start_training(args, TI_FLAX_TEST_PAUSE_IN_SAVE_AT="4")
    lines = []

    def paused():
        lines.append(proc.stdout.readline())
        return "pausing inside the save of step 4" in lines[-1]

    with proc:
        try:
            wait_for(paused, proc)
        finally:
            proc.kill()
            proc.wait(timeout=60)
    assert any(name.startswith(".checkpoint-4") for name in os.listdir(out))  # the half-written save
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert checkpoint.latest_checkpoint(str(out)).endswith("checkpoint-2")
    with pytest.warns(UserWarning):
        assert main(args + ["--resume_from_checkpoint", "latest"]) == 0
    assert [s for s, _ in checkpoint.list_checkpoints(str(out))] == [2, 4, 6]
