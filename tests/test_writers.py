"""Crashes injected into each writer: nothing half-written under a final name, earlier files kept.

A successful run leaving no temporary files proves little; these tests make each writer fail
half-way (by patching the function below it) and look at what is on disk afterwards.
"""

import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ti_flax import TrainConfig, families, files, formats, models
from ti_flax.training import checkpoint, outputs, run as run_lib
from ti_flax.commands import export as exporting
from ti_flax.training.step import init_state
from ti_flax.training.optim import OptimizerSpec


class Crash(Exception):
    pass


def hidden_files(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def test_embedding_write_crash_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "learned_embeds.safetensors")
    old = np.arange(6, dtype=np.float32).reshape(2, 3)
    formats.save_diffusers(path, "<cat-toy>", old)
    real = files.write_bytes

    def write_half_then_crash(target, data, *args, **kwargs):
        real(target, data[:10], *args, **kwargs)  # the lowest writer dies half-way
        raise Crash()

    monkeypatch.setattr(files, "write_bytes", write_half_then_crash)
    with pytest.raises(Crash):
        formats.save_diffusers(path, "<cat-toy>", old + 1)
    np.testing.assert_array_equal(load_file(path)["<cat-toy>"], old)
    assert hidden_files(tmp_path) == []


def test_checkpoint_crash_leaves_no_folder_and_keeps_the_last(tmp_path, monkeypatch):
    spec = OptimizerSpec.from_config(TrainConfig(), 1, 10)
    state = init_state(np.ones((2, 4), np.float32), spec)
    meta = {"tokens": ["<cat-toy>", "<cat-toy>_1"]}
    first = checkpoint.save_checkpoint(str(tmp_path), state._replace(step=np.int32(1)), meta, families.get("sd1"))

    def crash(*args, **kwargs):
        raise Crash()

    monkeypatch.setattr(formats, "save_diffusers", crash)  # after the state file, before meta.json
    with pytest.raises(Crash):
        checkpoint.save_checkpoint(str(tmp_path), state._replace(step=np.int32(2), rows=state.rows * 2), meta,
                                   families.get("sd1"))
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [1]
    assert hidden_files(tmp_path) == []
    restored, _ = checkpoint.load_checkpoint(first, state)
    np.testing.assert_array_equal(restored.rows, state.rows)


def test_export_crash_renames_none_of_the_files(tmp_path, monkeypatch):
    src = formats.save_diffusers(str(tmp_path / "src.safetensors"), "<cat-toy>", np.ones((2, 8), np.float32))
    out = tmp_path / "out"
    real = formats.check_written
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise Crash()
        return real(*args, **kwargs)

    monkeypatch.setattr(formats, "check_written", crash_on_second)
    with pytest.raises(Crash):  # .safetensors staged and checked, the .bin fails its check
        exporting.export_embedding(src, str(out), format="diffusers", token="<cat-toy>", bin=True)
    assert len(calls) == 2
    assert not out.exists() or os.listdir(out) == []


def test_pipeline_swap_crash_keeps_every_component_whole(tiny_model_dir, sample_images_dir, tmp_path, monkeypatch):
    # A second full-pipeline save into the same folder fails while moving components in: each
    # component must still be there, whole (the old one or the new one), never deleted first.
    config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(tmp_path / "o"), num_vectors=2)
    run = run_lib.prepare(config, devices=jax.local_devices()[:1])
    os.makedirs(config.output_dir)
    rows = np.asarray(run.init_rows)
    outputs.save_pipeline(run, rows)
    components = sorted(n for n in os.listdir(config.output_dir) if os.path.isdir(os.path.join(config.output_dir, n)))
    assert {"unet", "vae", "text_encoder", "tokenizer"} <= set(components)
    real_replace = os.replace
    moved = []

    def crash_on_third_component(src, dst, *args, **kwargs):
        if ".pipeline-" in str(src) and os.path.isdir(src):
            moved.append(dst)
            if len(moved) == 3:
                raise Crash()
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash_on_third_component)
    with pytest.raises(Crash):
        outputs.save_pipeline(run, rows + 1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(n for n in os.listdir(config.output_dir) if os.path.isdir(os.path.join(config.output_dir, n))) == components
    assert hidden_files(config.output_dir) == []
    saved = families.load_model(config.output_dir)  # every component loads
    table = models.token_table(saved.params["text_encoder"])
    assert table.shape[0] == run.model.spec.base_vocab_size + 2
