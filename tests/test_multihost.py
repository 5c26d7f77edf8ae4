"""Multi-process training on localhost: 2 processes x 2 CPU devices == 1 process x 4 devices,
a stop signal on one host agreed by both, and a resume that process 0 broadcasts."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import COMPILE_FLAGS

from ti_flax import TrainConfig, train
from ti_flax.training import checkpoint
from ti_flax.formats import read_embedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_args(model_dir, data_dir, out, port, process_id, num_processes=2, timeout=120, steps=4, checkpointing=2,
                extra=()):
    return [
        sys.executable, "-m", "ti_flax.train",
        "--pretrained_model_name_or_path", model_dir, "--train_data_dir", data_dir, "--output_dir", str(out),
        "--placeholder_token", "<cat-toy>", "--initializer_token", "toy", "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", "5e-3", "--lr_warmup_steps", "0",
        "--save_steps", "0", "--checkpointing_steps", str(checkpointing), "--seed", "0", "--num_vectors", "2",
        "--repeats", "10", "--report_to", "none", *extra,
        "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(num_processes),
        "--process_id", str(process_id), "--distributed_timeout", str(timeout),
    ]


def worker_env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}"
    return env


def start_workers(args_of, devices=2):
    """Start one training process per args list; each one's output lines are collected into
    `proc.lines` by a thread, so no wait can block on a pipe."""
    procs = []
    for args in args_of:
        proc = subprocess.Popen(args, cwd=ROOT, env=worker_env(devices), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        proc.lines = []
        threading.Thread(target=lambda p=proc: p.lines.extend(iter(p.stdout.readline, "")), daemon=True).start()
        procs.append(proc)
    return procs


def finish(procs, timeout=300):
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    time.sleep(0.2)
    return ["".join(proc.lines) for proc in procs]


@pytest.mark.slow
def test_a_signal_to_one_host_stops_both_at_the_same_step_and_resume_is_broadcast(
    tiny_model_dir, sample_images_dir, tmp_path
):
    # SIGTERM reaches process 1 only: the stop vote makes both processes stop after the same
    # step, and process 0 saves that step. Process 1 has no checkpoint of its own (only process 0
    # writes), so the resumed run works only if process 0's state is broadcast to it.
    port = free_port()
    outs = [tmp_path / "out0", tmp_path / "out1"]
    procs = start_workers([
        worker_args(tiny_model_dir, sample_images_dir, outs[i], port, i, steps=100000, checkpointing=0) for i in range(2)
    ])
    metrics = outs[0] / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "".join(procs[0].lines)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        outputs = finish(procs)
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outputs
    (stopped, _), = checkpoint.list_checkpoints(str(outs[0]))
    assert not outs[1].exists()
    assert len(metrics.read_text().splitlines()) == stopped  # process 0 stopped after the same step
    target = stopped + 2
    port = free_port()
    procs = start_workers([
        worker_args(tiny_model_dir, sample_images_dir, outs[i], port, i, steps=target, checkpointing=0,
                    extra=("--resume_from_checkpoint", "latest"))
        for i in range(2)
    ])
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "4 (2 local x 2 process(es)" in outputs[0]  # the banner names the layout
    assert not outs[1].exists()  # only process 0 writes: the embedding, checkpoints, logs
    resumed = read_embedding(str(outs[0] / "learned_embeds.safetensors")).rows
    single = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(tmp_path / "single"), num_vectors=2,
                              max_train_steps=target)
    rows = train(single, devices=jax.local_devices()[:4]).rows
    assert np.abs(resumed - rows).max() <= 1e-6


def test_unreachable_coordinator_fails_fast(tiny_model_dir, sample_images_dir, tmp_path):
    # A 5 s --distributed_timeout: the run gives up with one line long before the subprocess
    # deadline below (which turns a hang into a failure instead of a stalled CI).
    args = worker_args(tiny_model_dir, sample_images_dir, tmp_path / "out", free_port(), 1, timeout=5)
    proc = subprocess.run(args, cwd=ROOT, env=worker_env(1), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert "could not join the distributed run" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["--num_processes", "--process_id"])
def test_partial_flags_rejected(missing, tiny_model_dir, sample_images_dir, tmp_path, capsys):
    from ti_flax.commands.train import main

    args = worker_args(tiny_model_dir, sample_images_dir, tmp_path / "out", free_port(), 0)[3:]
    i = args.index(missing)
    del args[i : i + 2]
    assert main(args) == 2
    assert "need all of --coordinator_address" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
