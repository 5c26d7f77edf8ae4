"""Validation images, metrics and event files, the model card and the Hub upload of a run."""

import json
import os
import struct

import jax
import numpy as np
import pytest
from PIL import Image

from ti_flax import TrainConfig, train
from ti_flax.sampling import sampler
from ti_flax.training import step as step_lib


def run_with_validation(model_dir, data_dir, out, **changes):
    config = TrainConfig.tiny(
        model_dir, data_dir, str(out), max_train_steps=4, validation_prompt="a photo of <cat-toy>",
        validation_steps=2, validation_num_inference_steps=2, num_validation_images=3, report_to="tensorboard",
        **changes,
    )
    events = []
    result = train(config, callbacks=[events.append], devices=jax.local_devices()[:2])
    return config, result, events


@pytest.fixture(scope="module")
def validated(tiny_model_dir, sample_images_dir, tmp_path_factory, traces):
    step_lib.pmapped_train_step.cache_clear()
    sampler.pmapped_sample_step.cache_clear()
    before = traces.copy()
    first = run_with_validation(tiny_model_dir, sample_images_dir, tmp_path_factory.mktemp("v1"))
    counts = (
        traces["train_step"] - before["train_step"],
        traces["sample_step"] - before["sample_step"],
    )
    second = run_with_validation(tiny_model_dir, sample_images_dir, tmp_path_factory.mktemp("v2"))
    return first, second, counts


def test_images_at_the_right_steps(validated):
    (config, _, events), _, _ = validated
    folder = os.path.join(config.output_dir, "validation")
    expected = {f"step-{s:06d}-{i}.png" for s in (2, 4) for i in range(3)} | {"step-000002.png", "step-000004.png"}
    assert set(os.listdir(folder)) == expected
    assert Image.open(os.path.join(folder, "step-000002-0.png")).size == (32, 32)
    assert Image.open(os.path.join(folder, "step-000002.png")).size == (96, 32)  # a row of 3
    validations = [e for e in events if e["kind"] == "validation"]
    assert [e["step"] for e in validations] == [2, 4] and len(validations[0]["images"]) == 3
    assert [e["step"] for e in events if e["kind"] == "step"] == [1, 2, 3, 4]


def test_same_seed_same_images(validated):
    (c1, _, _), (c2, _, _), _ = validated
    for name in ("step-000002-1.png", "step-000004.png"):
        a = np.asarray(Image.open(os.path.join(c1.output_dir, "validation", name)))
        b = np.asarray(Image.open(os.path.join(c2.output_dir, "validation", name)))
        np.testing.assert_array_equal(a, b)


def test_validation_compiles_once_and_never_retraces_the_step(validated):
    _, _, (train_traces, sample_traces) = validated
    assert train_traces == 1
    assert sample_traces == 1  # two validations, one compile


def read_event_scalars(folder):
    from tensorboardX.proto import event_pb2

    tags = set()
    for name in os.listdir(folder):
        if not name.startswith("events.out.tfevents"):
            continue
        data = open(os.path.join(folder, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            tags |= {v.tag for v in event.summary.value}
    return tags


def test_metrics_jsonl_and_event_file(validated):
    (config, _, _), _, _ = validated
    lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "logs", "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "row_norms", "steps_per_sec"} <= set(lines[0])
    tags = read_event_scalars(os.path.join(config.output_dir, "logs"))
    assert {"train/loss", "train/lr", "train/grad_norm", "train/row_norms/0", "validation"} <= tags


def test_model_card(validated):
    (config, result, _), _, _ = validated
    card = open(os.path.join(config.output_dir, "README.md")).read()
    assert "`<cat-toy>`" in card and config.pretrained_model_name_or_path in card
    assert "learned_embeds.safetensors" in card and "validation/step-000004.png" in card
    assert "load_textual_inversion" in card and "--format a1111" in card and "embedding:cat-toy" in card
    assert f"{result.final_loss:.4f}" in card
    assert os.path.exists(os.path.join(config.output_dir, "loss.png"))


def test_validation_prompt_without_token_warns(tiny_model_dir, sample_images_dir, tmp_path):
    config = TrainConfig.tiny(
        tiny_model_dir, sample_images_dir, str(tmp_path), max_train_steps=1, validation_prompt="a photo of a toy",
        validation_num_inference_steps=2, num_validation_images=3,
    )
    with pytest.warns(UserWarning, match="does not contain <cat-toy>"):
        train(config, devices=jax.local_devices()[:2])

def test_push_to_hub_uploads_the_output_folder(tiny_model_dir, sample_images_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "someone/my-embedding"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    config = TrainConfig.tiny(
        tiny_model_dir, sample_images_dir, str(tmp_path / "my-embedding"), max_train_steps=2, push_to_hub=True,
        hub_token="hf_test",
    )
    result = train(config, devices=jax.local_devices()[:2])
    assert calls["create"][0] == "my-embedding" and calls["create"][1]["token"] == "hf_test"
    assert calls["upload"]["folder_path"] == config.output_dir and calls["upload"]["repo_id"] == "someone/my-embedding"
    assert "checkpoint-*" in calls["upload"]["ignore_patterns"]
    assert result.files["hub"] == "someone/my-embedding"
    assert "pipeline" not in result.files  # the full pipeline only with --save_as_full_pipeline
