"""Multi-process training on localhost: 2 processes x 2 CPU devices == 1 process x 4 devices."""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ti_flax import TrainConfig, train
from ti_flax.embeddings import read_embedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_args(model_dir, data_dir, out, port, process_id, num_processes=2, timeout=120):
    return [
        sys.executable, "-m", "ti_flax.train",
        "--pretrained_model_name_or_path", model_dir, "--train_data_dir", data_dir, "--output_dir", str(out),
        "--placeholder_token", "<cat-toy>", "--initializer_token", "toy", "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", "4", "--learning_rate", "5e-3", "--lr_warmup_steps", "0",
        "--save_steps", "0", "--checkpointing_steps", "2", "--seed", "0", "--num_vectors", "2", "--repeats", "10",
        "--report_to", "none",
        "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(num_processes),
        "--process_id", str(process_id), "--distributed_timeout", str(timeout),
    ]


def worker_env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def test_two_processes_match_one(tiny_model_dir, sample_images_dir, tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            worker_args(tiny_model_dir, sample_images_dir, tmp_path / f"out{i}", port, i),
            cwd=ROOT, env=worker_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output
    assert "4 (2 local x 2 process(es)" in outputs[0]  # the banner names the layout
    # Only process 0 writes: the embedding, checkpoints, logs.
    assert not (tmp_path / "out1").exists()
    assert (tmp_path / "out0" / "checkpoint-4").is_dir()
    multi = read_embedding(str(tmp_path / "out0" / "learned_embeds.safetensors")).rows

    single = TrainConfig.tiny(
        tiny_model_dir, sample_images_dir, str(tmp_path / "single"), num_vectors=2, max_train_steps=4
    )
    rows = train(single, devices=jax.local_devices()[:4]).rows
    assert np.abs(multi - rows).max() <= 1e-6


def test_unreachable_coordinator_fails_fast(tiny_model_dir, sample_images_dir, tmp_path):
    args = worker_args(tiny_model_dir, sample_images_dir, tmp_path / "out", free_port(), 1, timeout=5)
    start = time.time()
    proc = subprocess.run(args, cwd=ROOT, env=worker_env(1), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert "could not join the distributed run" in proc.stderr
    assert time.time() - start < 120
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["--num_processes", "--process_id"])
def test_partial_flags_rejected(missing, tiny_model_dir, sample_images_dir, tmp_path, capsys):
    from ti_flax.train import main

    args = worker_args(tiny_model_dir, sample_images_dir, tmp_path / "out", free_port(), 0)[3:]
    i = args.index(missing)
    del args[i : i + 2]
    assert main(args) == 2
    assert "need all of --coordinator_address" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
