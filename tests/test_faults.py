"""Faults outside the user's flags: damaged files, a full or read-only disk, long error lines.

Each fault is reproduced (a truncated file, a garbage file, a writer that raises ENOSPC) and
must end as one line naming the file (UserError in-process, exit status 2 from the CLI), with
nothing half-written on disk and earlier files intact.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import ti_flax
from ti_flax import TrainConfig, UserError, errors, families, files, formats
from ti_flax.training import checkpoint
from ti_flax.data import prompts
from ti_flax.errors import run_cli
from ti_flax.commands.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = jax.local_devices()[:1]


def tiny(model_dir, data_dir, out, **changes):
    return TrainConfig.tiny(model_dir, data_dir, str(out), **{"max_train_steps": 2, "report_to": "none", **changes})


def truncate(path, keep=0.5):
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: int(len(content) * keep)])


def copy_model(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def raises_one_line(fn, *match):
    """Run fn(); it must raise a UserError whose message is one line <= 300 chars holding `match`."""
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    # The budget is for ti_flax's words: pytest's temporary folder (deeper under xdist) counts as
    # a short path, as a user's would be.
    budget = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/(popen-gw\d+/)?", "/tmp/", message)
    assert "\n" not in message and len(budget) <= 300, message
    for text in match:
        assert text in message, message
    return message


def leftovers(folder):
    """Hidden temporary files or folders anywhere under `folder`."""
    found = []
    for root, dirs, names in os.walk(folder):
        found += [os.path.join(root, n) for n in dirs + names if n.startswith(".")]
    return found


def enospc_for(monkeypatch, should_fail):
    """Make files.write_bytes (the lowest-level write of every output) raise ENOSPC for the paths
    `should_fail(path)` picks; returns the list of paths it refused."""
    refused = []
    real = files.write_bytes

    def write_bytes(path, content):
        if should_fail(path):
            refused.append(path)
            with open(path, "wb") as f:  # a disk that fills up mid-file leaves a partial file
                f.write(content[: len(content) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, content)

    monkeypatch.setattr(files, "write_bytes", write_bytes)
    return refused


# ---- damaged inputs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "component, name, kind",
    [
        ("unet", "diffusion_pytorch_model.safetensors", "safetensors"),
        ("unet", "diffusion_flax_model.msgpack", "Flax msgpack"),
        ("text_encoder", "flax_model.msgpack", "Flax msgpack"),
        ("text_encoder", "pytorch_model.bin", "PyTorch"),
    ],
)
def test_truncated_weights(component, name, kind, tiny_model_dir, sample_images_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path)
    folder = model / component
    if name.endswith(".msgpack"):  # the Flax layout of the same weights, then cut in half
        from flax import serialization

        params = families.load_model(tiny_model_dir).params[component]
        (folder / name).write_bytes(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, params)))
    elif name.endswith(".bin"):
        import torch

        state = files.read_safetensors(str(folder / "model.safetensors"))
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(folder / name))
    for other in os.listdir(folder):
        if other != name and not other.endswith(".json"):
            os.remove(folder / other)
    truncate(folder / name)
    out = tmp_path / "out"
    raises_one_line(lambda: ti_flax.train(tiny(str(model), sample_images_dir, out), devices=ONE_DEVICE),
                    os.path.join(str(folder), name), f"truncated or not a {kind} file", "download it again")
    assert not out.exists()


def test_damaged_config_json(tiny_model_dir, sample_images_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path)
    (model / "vae" / "config.json").write_text('{"in_channels": 3, ')
    out = tmp_path / "out"
    raises_one_line(lambda: ti_flax.train(tiny(str(model), sample_images_dir, out), devices=ONE_DEVICE),
                    str(model / "vae" / "config.json"), "truncated or not a JSON config file")
    assert not out.exists()


@pytest.mark.parametrize("name, content", [("vocab.json", b"\x00garbage{{"), ("vocab.json", b'["a", "b"]'),
                                           ("merges.txt", b"\xff\xfe\x00bad")])
def test_garbage_tokenizer_file(name, content, tiny_model_dir, sample_images_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path)
    (model / "tokenizer" / name).write_bytes(content)
    out = tmp_path / "out"
    raises_one_line(lambda: ti_flax.train(tiny(str(model), sample_images_dir, out), devices=ONE_DEVICE),
                    str(model / "tokenizer" / name))
    assert not out.exists()


def test_damaged_initial_embeddings(tiny_model_dir, sample_images_dir, tmp_path):
    path = tmp_path / "start.safetensors"
    formats.save_diffusers(str(path), "<x>", np.ones((1, 32), np.float32))
    truncate(path, 0.7)
    out = tmp_path / "out"
    config = tiny(tiny_model_dir, sample_images_dir, out, initializer_token="", initial_embeddings=str(path),
                  num_vectors=1)
    raises_one_line(lambda: ti_flax.train(config, devices=ONE_DEVICE), str(path), "truncated or not a safetensors file")
    assert not out.exists()


@pytest.mark.parametrize("name", ["cat-toy.safetensors", "cat-toy.pt"])
def test_damaged_embedding_for_the_exporter(name, tmp_path):
    source = tmp_path / name
    if name.endswith(".pt"):
        import torch

        torch.save({"string_to_param": {"*": torch.ones(2, 32)}, "name": "cat-toy"}, str(source))
    else:
        formats.save_diffusers(str(source), "<cat-toy>", np.ones((2, 32), np.float32))
    truncate(source, 0.6)
    out = tmp_path / "exported"
    raises_one_line(lambda: ti_flax.export(str(source), str(out), format="comfyui"), str(source), "truncated or not a")
    assert not out.exists()


def test_corrupt_image(tiny_model_dir, tmp_path):
    images = shutil.copytree(os.path.join(ROOT, "scripts", "sample_images"), tmp_path / "images")
    bad = sorted(p for p in os.listdir(images) if p.lower().endswith((".png", ".jpg", ".jpeg")))[0]
    truncate(images / bad, 0.3)
    out = tmp_path / "out"
    raises_one_line(lambda: ti_flax.train(tiny(tiny_model_dir, str(images), out), devices=ONE_DEVICE),
                    str(images / bad), "cannot decode image")
    assert not out.exists()


# ---- damaged checkpoints --------------------------------------------------------------------


def test_damaged_checkpoint_latest_skips_it_and_explicit_is_an_error(tiny_model_dir, sample_images_dir, tmp_path):
    out = tmp_path / "out"
    config = tiny(tiny_model_dir, sample_images_dir, out, checkpointing_steps=1)
    ti_flax.train(config, devices=ONE_DEVICE)
    assert [s for s, _ in checkpoint.list_checkpoints(str(out))] == [1, 2]
    truncate(out / "checkpoint-2" / "state.safetensors")

    resumed = config.replace(max_train_steps=3, resume_from_checkpoint="latest", checkpointing_steps=0)
    with pytest.warns(UserWarning, match="skipping .*checkpoint-2.*state.safetensors: truncated") as caught:
        result = ti_flax.train(resumed, devices=ONE_DEVICE)
    assert len([w for w in caught if "checkpoint-2" in str(w.message)]) == 1
    assert [r["step"] for r in result.history] == [2, 3]  # resumed from checkpoint-1

    explicit = resumed.replace(resume_from_checkpoint=str(out / "checkpoint-2"))
    raises_one_line(lambda: ti_flax.train(explicit, devices=ONE_DEVICE),
                    str(out / "checkpoint-2" / "state.safetensors"), "truncated or not a safetensors file",
                    "a damaged checkpoint")


def test_every_checkpoint_damaged_starts_fresh(tiny_model_dir, sample_images_dir, tmp_path, capsys):
    out = tmp_path / "out"
    config = tiny(tiny_model_dir, sample_images_dir, out, checkpointing_steps=2)
    ti_flax.train(config, devices=ONE_DEVICE)
    (out / "checkpoint-2" / "meta.json").write_text("{not json")
    with pytest.warns(UserWarning, match="meta.json"):
        result = ti_flax.train(config.replace(resume_from_checkpoint="latest"), devices=ONE_DEVICE)
    assert [r["step"] for r in result.history] == [1, 2]
    assert "no checkpoint that reads back (1 damaged)" in capsys.readouterr().out


def test_checkpoint_is_read_back_before_it_is_renamed(tiny_model_dir, sample_images_dir, tmp_path, monkeypatch):
    # A write that "succeeds" but stores something else (a bad disk, a buggy network mount).
    def corrupting(path, content):
        with open(path, "wb") as f:
            f.write(content[:-8] if path.endswith("state.safetensors") else content)

    monkeypatch.setattr(files, "write_bytes", corrupting)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"checkpoint-1 not saved, training continues: cannot write .*checkpoint-1"):
        ti_flax.train(tiny(tiny_model_dir, sample_images_dir, out, checkpointing_steps=1, max_train_steps=1),
                      devices=ONE_DEVICE)
    assert checkpoint.list_checkpoints(str(out)) == [] and leftovers(out) == []


# ---- full disk ------------------------------------------------------------------------------


def test_enospc_in_an_intermediate_checkpoint_warns_and_training_continues(
        tiny_model_dir, sample_images_dir, tmp_path, monkeypatch):
    refused = enospc_for(monkeypatch, lambda path: f"{os.sep}.checkpoint-1.tmp" in path
                         or os.path.basename(path).startswith(".learned_embeds-steps-1."))
    out = tmp_path / "out"
    config = tiny(tiny_model_dir, sample_images_dir, out, checkpointing_steps=1, save_steps=1)
    with pytest.warns(UserWarning) as caught:
        result = ti_flax.train(config, devices=ONE_DEVICE)
    messages = [str(w.message) for w in caught if "not saved" in str(w.message)]
    assert len(messages) == 2 and len(refused) == 2, messages
    assert all("no space left" in m and "free in" in m and len(m) <= 400 for m in messages), messages
    assert any(str(out / "checkpoint-1" / "state.safetensors") in m for m in messages), messages
    assert [r["step"] for r in result.history] == [1, 2]
    assert [s for s, _ in checkpoint.list_checkpoints(str(out))] == [2]
    assert sorted(n for n in os.listdir(out) if n.startswith("learned_embeds")) == [
        "learned_embeds-steps-2.safetensors", "learned_embeds.safetensors"]
    assert leftovers(out) == []


def test_enospc_in_the_final_save_names_what_was_saved(tiny_model_dir, sample_images_dir, tmp_path, monkeypatch):
    refused = enospc_for(monkeypatch, lambda path: os.path.basename(path).startswith(".README.md"))
    out = tmp_path / "out"
    config = tiny(tiny_model_dir, sample_images_dir, out, checkpointing_steps=2)
    message = raises_one_line(lambda: ti_flax.train(config, devices=ONE_DEVICE),
                              f"cannot write {out / 'README.md'}: no space left on the device", "free in",
                              "already saved:", "learned_embeds.safetensors", "checkpoint-2")
    assert isinstance(refused, list) and len(refused) == 1, message
    assert not (out / "README.md").exists() and leftovers(out) == []
    # What was saved before the failure is complete and reads back.
    assert formats.load_diffusers(str(out / "learned_embeds.safetensors"))[0] == "<cat-toy>"
    checkpoint.verify_checkpoint(str(out / "checkpoint-2"))


def test_enospc_in_the_full_pipeline_keeps_the_embedding(tiny_model_dir, sample_images_dir, tmp_path, monkeypatch):
    real_write = files.write_bytes

    def full(path, data):  # the disk fills up while the pipeline's weights are written
        if os.sep + ".pipeline-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(files, "write_bytes", full)
    out = tmp_path / "out"
    config = tiny(tiny_model_dir, sample_images_dir, out, save_as_full_pipeline=True)
    raises_one_line(lambda: ti_flax.train(config, devices=ONE_DEVICE), f"cannot write the full pipeline into {out}",
                    "no space left", "already saved: ", "learned_embeds.safetensors")
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()
    assert leftovers(out) == []
    assert formats.load_diffusers(str(out / "learned_embeds.safetensors"))[0] == "<cat-toy>"


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                                          (errno.EDQUOT, "quota")])
def test_atomic_write_failure_keeps_the_old_file(code, reason, tmp_path, monkeypatch):
    path = tmp_path / "learned_embeds.safetensors"
    formats.save_diffusers(str(path), "<old>", np.ones((1, 4), np.float32))
    before = path.read_bytes()

    def refuse(p, content):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files, "write_bytes", refuse)
    with pytest.raises(files.WriteFailed):  # a UserError: one line, exit status 2 from the CLI
        formats.save_diffusers(str(path), "<new>", np.zeros((1, 4), np.float32))
    raises_one_line(lambda: formats.save_diffusers(str(path), "<new>", np.zeros((1, 4), np.float32)),
                    f"cannot write {path}", reason, f"free in {tmp_path.name}/")
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_exporter_out_of_space(tmp_path, monkeypatch):
    source = tmp_path / "in.safetensors"
    formats.save_diffusers(str(source), "<cat-toy>", np.ones((2, 32), np.float32))
    enospc_for(monkeypatch, lambda path: path.endswith(".pt"))
    out = tmp_path / "exported"
    raises_one_line(lambda: ti_flax.export(str(source), str(out), format="a1111"),
                    str(out / "cat-toy.pt"), "no space left")
    assert os.listdir(out) == []


def test_metrics_log_on_a_full_disk_warns_once(tmp_path):
    from ti_flax.training.logs import MetricsLogger

    logger = MetricsLogger(str(tmp_path), report_to="none")

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = lambda self: None

    logger.file = Full()
    with pytest.warns(UserWarning, match="metrics.jsonl: no space left") as caught:
        logger.log(1, {"loss": 1.0})
        logger.log(2, {"loss": 1.0})
    assert len(caught) == 1
    logger.close()


# ---- line length ----------------------------------------------------------------------------


def test_too_long_prompt_error_fits_on_a_line(clip_tokenizer):
    tokens = ["<cat-toy>"] + [f"<cat-toy>_{i}" for i in range(1, 80)]
    message = raises_one_line(lambda: prompts.encode_templates(clip_tokenizer, prompts.OBJECT_TEMPLATES, " ".join(tokens)),
                              "80 placeholder tokens", "<cat-toy>_79", "fewer vectors")
    assert "<cat-toy>_40" not in message


def test_run_cli_prints_one_short_line(capsys):
    def fail():
        raise UserError("cannot resume: " + "; ".join(f"--flag_{i} (a vs b)" for i in range(200)) + "\nsecond line")

    assert run_cli(fail) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err.strip()) <= 300 and "more characters" in err, err


def test_short_list_counts_the_rest():
    assert errors.short_list([f"f{i}.png" for i in range(77)]) == "f0.png, f1.png, f2.png and 74 more"
    assert errors.short_list(["a", "b"]) == "a, b"


# ---- the command line: one line, exit status 2 ----------------------------------------------


@pytest.mark.slow
def test_cli_truncated_weights_one_line_exit_2(tiny_model_dir, sample_images_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path)
    weights = model / "text_encoder" / "model.safetensors"
    truncate(weights)
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", sample_images_dir,
            "--output_dir", str(out), "--placeholder_token", "<cat-toy>", "--initializer_token", "toy",
            "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "1"]
    proc = subprocess.run([sys.executable, "-m", "ti_flax.train", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))},
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {weights}: truncated or not a safetensors file") and len(lines[0]) <= 300
    assert not out.exists()


def test_cli_full_disk_in_process(tiny_model_dir, sample_images_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: list(ONE_DEVICE))  # reuse the compiled 1-device step
    enospc_for(monkeypatch, lambda path: os.path.basename(path).startswith(".learned_embeds.safetensors"))
    out = tmp_path / "out"
    code = main(["--pretrained_model_name_or_path", tiny_model_dir, "--train_data_dir", sample_images_dir,
                 "--output_dir", str(out), "--placeholder_token", "<cat-toy>", "--initializer_token", "toy",
                 "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "1", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1] and len(errors[0]) <= 300, err
    assert "learned_embeds.safetensors: no space left" in errors[0]
    assert not (out / "learned_embeds.safetensors").exists() and leftovers(out) == []
    json.loads((out / "logs" / "metrics.jsonl").read_text().splitlines()[0])  # the run's log is intact
