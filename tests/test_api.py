"""The Python API a notebook or a user's script drives: ti_flax.TrainConfig, train, export, generate.

Also checks that the README's Quick start shows exactly the commands CI runs (.ci/run).
"""

import dataclasses
import math
import os
import re
import shlex

import numpy as np
import pytest
from PIL import Image

import ti_flax
from ti_flax import UserError
from ti_flax.formats import read_embedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sample_images_dir, tmp_path_factory):
    records = []
    config = ti_flax.TrainConfig.tiny(
        tiny_model_dir, sample_images_dir, str(tmp_path_factory.mktemp("api") / "out"), num_vectors=2,
        max_train_steps=STEPS,
    )
    result = ti_flax.train(config, callbacks=[records.append])
    return config, result, records


def test_callback_gets_every_step_in_order(trained):
    config, result, records = trained
    assert [r["kind"] for r in records] == ["step"] * STEPS  # no validation prompt: steps only
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["lr"] == pytest.approx(config.learning_rate)
        assert len(r["row_norms"]) == 2 and all(n > 0 for n in r["row_norms"])
        assert r["steps_per_sec"] > 0
    assert result.history == records


def test_result_holds_the_outputs_and_the_final_loss(trained):
    config, result, records = trained
    assert result.output_dir == config.output_dir
    assert result.final_loss == records[-1]["loss"]
    assert result.tokens == ["<cat-toy>", "<cat-toy>_1"]
    assert result.files["diffusers"] == os.path.join(config.output_dir, "learned_embeds.safetensors")
    emb = read_embedding(result.files["diffusers"])
    assert emb.token == "<cat-toy>"
    np.testing.assert_array_equal(emb.rows, result.rows)


@pytest.mark.parametrize("fmt, name, layout, token", [
    ("a1111", "cat-toy.pt", "a1111", "cat-toy"),
    ("kohya", "cat-toy.safetensors", "kohya", None),
])
def test_export_the_result(trained, tmp_path, fmt, name, layout, token):
    _, result, _ = trained
    paths = ti_flax.export(result.output_dir, str(tmp_path), format=fmt)
    assert paths == [str(tmp_path / name)]
    emb = read_embedding(paths[0])
    assert (emb.format, emb.token) == (layout, token)
    np.testing.assert_array_equal(emb.rows, result.rows)


def test_generate_with_the_result(trained, tiny_model_dir, tmp_path):
    _, result, _ = trained
    paths = ti_flax.generate(tiny_model_dir, "a photo of <cat-toy>", [result.files["diffusers"]], num_images=2,
                             steps=3, output_dir=str(tmp_path))
    assert paths == [str(tmp_path / "000.png"), str(tmp_path / "001.png")]
    assert Image.open(paths[0]).size == (32, 32)


def test_the_public_names_are_plain_functions_however_the_modules_are_imported():
    """`ti_flax.train` (export, generate, plan) is the function of that name in commands/, also after
    the command modules are imported: importing a submodule binds it as its package's attribute,
    which would replace a function living in the package's own namespace."""
    import inspect

    import ti_flax.commands.export
    import ti_flax.commands.generate
    import ti_flax.commands.plan
    import ti_flax.commands.train
    from ti_flax import export, generate, plan, train

    commands = ti_flax.commands
    assert (train, export, generate, plan) == (commands.train.train, commands.export.export,
                                               commands.generate.generate, commands.plan.plan)
    assert (train, export, generate, plan) == (ti_flax.train, ti_flax.export, ti_flax.generate, ti_flax.plan)
    assert all(inspect.isfunction(function) for function in (train, export, generate, plan))
    assert ti_flax.TrainResult is ti_flax.commands.train.TrainResult
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ti_flax.nope  # noqa: B018
    with pytest.raises(UserError, match="--num_images 0"):
        generate("unused", "a cat", num_images=0)
    with pytest.raises(UserError, match="--format 'png'"):
        export("unused.safetensors", "out", format="png")


@pytest.mark.parametrize("changes, flag", [
    (dict(learning_rate=-1.0), "--learning_rate"),
    (dict(num_vectors=0), "--num_vectors"),
    (dict(lr_scheduler="exponential"), "--lr_scheduler"),
    (dict(placeholder_token=""), "--placeholder_token"),
])
def test_config_validate_names_the_bad_flag(changes, flag):
    config = ti_flax.TrainConfig.tiny("model", "images", "out", **changes)
    with pytest.raises(UserError, match=flag):
        config.validate()


def test_config_fields_are_the_flag_names():
    from ti_flax.config.cli import build_parser

    flags = {a.dest for a in build_parser()._actions if a.dest not in ("help", "local_rank")}
    assert flags == {f.name for f in dataclasses.fields(ti_flax.TrainConfig)}


def test_public_functions_document_args_returns_and_an_example():
    from ti_flax.commands.export import export_embedding
    from ti_flax.commands.generate import generate
    from ti_flax.commands.train import train

    for function in (train, export_embedding, generate):
        for section in ("Args:", "Returns:", "Example:"):
            assert section in function.__doc__, f"{function.__qualname__} lacks {section}"
    assert "Example:" in ti_flax.TrainConfig.__doc__ and "validate" in ti_flax.TrainConfig.validate.__doc__


def commands(lines):
    """Shell words of each command line, comments and blank lines dropped."""
    return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]


def test_readme_quick_start_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", section, re.S)
    shown = commands(line for block in blocks for line in block.splitlines())
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    # The script's own setup lines (shebang, shell options, moving to the repository root) are not user commands.
    run = commands(line for line in ci if not re.match(r"\s*(set |cd \"\$\(dirname)", line))
    assert shown and shown == run
