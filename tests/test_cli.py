"""Command-line behaviour: flags, and one clear line with exit status 2 for every user error."""

import os
import shutil

import numpy as np
import pytest

from ti_flax.config import cli
from ti_flax.commands.train import main

REFERENCE_FLAGS = (
    "pretrained_model_name_or_path revision tokenizer_name train_data_dir placeholder_token initializer_token "
    "learnable_property repeats output_dir seed resolution center_crop train_batch_size num_train_epochs "
    "max_train_steps save_steps learning_rate scale_lr lr_warmup_steps lr_scheduler adam_beta1 adam_beta2 "
    "adam_weight_decay adam_epsilon push_to_hub use_auth_token hub_token hub_model_id logging_dir local_rank "
    "num_vectors save_as_full_pipeline no_safe_serialization max_grad_norm interpolation flip_p"
).split()


def base_args(model_dir, data_dir, out, *extra):
    return [
        "--pretrained_model_name_or_path", model_dir, "--train_data_dir", data_dir, "--output_dir", str(out),
        "--placeholder_token", "<cat-toy>", "--initializer_token", "toy", "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", "2", *extra,
    ]


def test_reference_flags_are_accepted():
    parser = cli.build_parser()
    known = {a.dest for a in parser._actions}
    assert set(REFERENCE_FLAGS) <= known


def test_scale_lr_is_opt_in(tiny_model_dir, sample_images_dir, tmp_path):
    args = base_args(tiny_model_dir, sample_images_dir, tmp_path)
    assert cli.parse_config(args).scale_lr is False
    assert cli.parse_config(args + ["--scale_lr"]).scale_lr is True


def test_max_train_steps_zero_uses_epochs(tiny_model_dir, sample_images_dir, tmp_path):
    args = base_args(tiny_model_dir, sample_images_dir, tmp_path)
    assert cli.parse_config(args + ["--max_train_steps", "0"]).max_train_steps is None


def run_error(capsys, args, out):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert not os.path.exists(out), "nothing may be written on a user error"
    return err


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"--placeholder_token": "toy"}, "already in the tokenizer's vocabulary"),
        ({"--initializer_token": "cat toy"}, "must be a single token"),
        ({"--initializer_token": "xylophonist"}, "must be a single token"),
        ({"--resolution": "36"}, "multiple of 8"),
        ({"--pretrained_model_name_or_path": "/no/such/model"}, "no such model folder"),
        ({"--pretrained_model_name_or_path": "nobody-here/no-such-model"}, "could not be fetched"),
        ({"--lr_scheduler": "cosine_with_restarts"}, None),
        ({"--local_rank": "0"}, "--local_rank"),
        ({"--num_vectors": "0"}, "--num_vectors"),
        ({"--train_data_dir": "/no/such/images"}, "does not exist"),
        ({"--attention": "cudnn"}, "--attention cudnn needs an NVIDIA GPU and bf16/fp16; this run is cpu float32"),
        ({"--attention": "flash"}, "--attention flash needs a TPU"),
    ],
)
def test_user_errors(changes, expected, tiny_model_dir, sample_images_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, sample_images_dir, out)
    for flag, value in changes.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if expected is None:  # argparse's own choice check: exit 2 with usage
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        assert not os.path.exists(out)
        return
    assert expected in run_error(capsys, args, out)


def test_model_folder_without_unet(tiny_model_dir, sample_images_dir, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "unet")
    out = tmp_path / "out"
    err = run_error(capsys, base_args(str(broken), sample_images_dir, out), out)
    assert "unet/" in err


def test_empty_data_folder(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "images"
    empty.mkdir()
    out = tmp_path / "out"
    err = run_error(capsys, base_args(tiny_model_dir, str(empty), out), out)
    assert "image" in err


def test_push_to_hub_without_token(tiny_model_dir, sample_images_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "out"
    err = run_error(capsys, base_args(tiny_model_dir, sample_images_dir, out, "--push_to_hub"), out)
    assert "--push_to_hub" in err


def test_initial_embeddings_start_the_rows(tiny_model_dir, sample_images_dir, tmp_path):
    from safetensors.numpy import save_file

    from ti_flax.training.run import prepare

    rows = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    save_file({"emb_params": rows}, str(tmp_path / "kohya.safetensors"))
    args = base_args(tiny_model_dir, sample_images_dir, tmp_path / "out", "--num_vectors", "2")
    args[args.index("--initializer_token") : args.index("--initializer_token") + 2] = [
        "--initial_embeddings", str(tmp_path / "kohya.safetensors"),
    ]
    run = prepare(cli.parse_config(args))
    np.testing.assert_array_equal(run.init_rows, rows)


@pytest.mark.parametrize(
    "shape, extra, expected",
    [((2, 48), ["--num_vectors", "2"], "width is 48"), ((3, 32), ["--num_vectors", "2"], "has 3 vectors")],
)
def test_initial_embeddings_must_fit(shape, extra, expected, tiny_model_dir, sample_images_dir, tmp_path, capsys):
    from safetensors.numpy import save_file

    save_file({"<x>": np.ones(shape, np.float32)}, str(tmp_path / "e.safetensors"))
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, sample_images_dir, out, *extra)
    args[args.index("--initializer_token") : args.index("--initializer_token") + 2] = [
        "--initial_embeddings", str(tmp_path / "e.safetensors"),
    ]
    assert expected in run_error(capsys, args, out)


def test_initializer_and_initial_embeddings_exclusive(tiny_model_dir, sample_images_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, sample_images_dir, out, "--initial_embeddings", "x.safetensors")
    assert "exactly one of --initializer_token" in run_error(capsys, args, out)


def test_placeholder_that_is_already_a_word(tiny_model_dir, sample_images_dir, tmp_path, capsys):
    # "sks" is not a vocabulary key ("sks</w>" is), but it tokenizes to one existing token.
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, sample_images_dir, out)
    args[args.index("--placeholder_token") + 1] = "sks"
    assert "already in the tokenizer's vocabulary" in run_error(capsys, args, out)


# The argparse defaults of diffusers' textual_inversion_flax.py (its last version, 0.39), and
# its dataset's interpolation and flip probability, for the flags the README lists as "the same".
REFERENCE_DEFAULTS = {
    "learnable_property": "object", "repeats": 100, "output_dir": "text-inversion-model", "seed": 42,
    "center_crop": False, "train_batch_size": 16, "num_train_epochs": 100,
    "max_train_steps": 5000, "learning_rate": 1e-4, "lr_warmup_steps": 500, "lr_scheduler": "constant",
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2, "adam_epsilon": 1e-08,
    "push_to_hub": False, "use_auth_token": False, "hub_token": None, "hub_model_id": None,
    "logging_dir": "logs", "tokenizer_name": None, "interpolation": "bicubic", "flip_p": 0.5,
}


def test_same_defaults_as_the_reference_script():
    from ti_flax import TrainConfig
    from ti_flax.families.sd import DEFAULT_RESOLUTION

    required = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--placeholder_token", "<t>",
                "--initializer_token", "toy"]
    parsed = cli.parse_config(required)  # the command line's defaults, too
    config = TrainConfig()
    for name, value in REFERENCE_DEFAULTS.items():
        assert getattr(config, name) == value, name
        assert getattr(parsed, name) == value, name
    assert config.scale_lr is False  # the one deliberate change: opt-in (README, "Fixed")
    # --resolution unset is the reference's 512 for SD 1.x / 2.x (an SDXL model's own 1024).
    assert config.resolution is None and parsed.resolution is None and DEFAULT_RESOLUTION == 512
