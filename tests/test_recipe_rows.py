"""The learned rows after each optimizer update: --embedding_norm preserve, --embedding_norm_decay
and --use_ema, each against its reference written out independently (OneTrainer's rescale to the
median norm of the token table, read from the PyTorch weights file; the decay's formula in numpy;
diffusers' EMAModel in torch), on the tiny models, with gradient accumulation, and across a resume.
"""

import dataclasses
import glob
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ti_flax import TrainConfig, parallel, train
from ti_flax.training import checkpoint, engine as engine_lib
from ti_flax.config import cli
from ti_flax.training.actions import Validate
from ti_flax.errors import UserError
from ti_flax.training.optim import Ema, NormControl, OptimizerSpec, scale_norms
from ti_flax.training.run import prepare

ONE = jax.local_devices()[:1]
TABLE_KEY = "embeddings.token_embedding.weight"  # (text_model.-prefixed in some writers' files)


def table_median(model_dir, component="text_encoder"):
    """numpy's median of the row norms of a text encoder's token table, read from its PyTorch weights file."""
    (path,) = glob.glob(os.path.join(model_dir, component, "*.safetensors"))
    (table,) = [w for name, w in load_file(path).items() if name.endswith(TABLE_KEY)]
    return float(np.median(np.linalg.norm(table.astype(np.float32), axis=1)))


def base(**changes):
    return dict(pretrained_model_name_or_path="m", train_data_dir="d", placeholder_token="<t>",
                initializer_token="toy", output_dir="out", report_to="none", **changes)


# --- settings: one line naming the flag, before anything is loaded -------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"embedding_norm": "median"}, "--embedding_norm must be one of none, preserve, got 'median'"),
    ({"embedding_norm_decay": 1.5}, "--embedding_norm_decay must be between 0 and 1"),
    ({"embedding_norm_decay": -0.1}, "--embedding_norm_decay must be between 0 and 1"),
    ({"embedding_norm": "preserve", "embedding_norm_decay": 0.5}, "--embedding_norm_decay does nothing with"),
    ({"embedding_norm_target": (0.4,)}, "--embedding_norm_target needs --embedding_norm preserve or"),
    ({"embedding_norm": "preserve", "embedding_norm_target": (0.0,)}, "--embedding_norm_target must be one positive"),
    ({"embedding_norm": "preserve", "embedding_norm_target": (1.0, 2.0, 3.0)}, "--embedding_norm_target must be"),
    ({"use_ema": True, "ema_decay": 1.0}, "--ema_decay must be between 0 and 1"),
    ({"use_ema": True, "ema_decay": 0.0}, "--ema_decay must be between 0 and 1"),
    ({"use_ema": True, "ema_update_after_step": -1}, "--ema_update_after_step must be >= 0"),
    ({"ema_decay": 0.99}, "--ema_decay and --ema_update_after_step need --use_ema"),
    ({"ema_update_after_step": 5}, "--ema_decay and --ema_update_after_step need --use_ema"),
])
def test_bad_settings_are_one_line_naming_the_flag(changes, message):
    with pytest.raises(UserError) as err:
        TrainConfig(**base(**changes)).validate()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_flags_parse_off_by_default_and_on_when_given():
    required = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--placeholder_token", "<t>",
                "--initializer_token", "toy"]
    off = cli.parse_config(required)
    assert (off.embedding_norm, off.embedding_norm_target, off.embedding_norm_decay) == ("none", None, 0.0)
    assert (off.use_ema, off.ema_decay, off.ema_update_after_step) == (False, 0.9999, 0)  # EMAModel's defaults
    on = cli.parse_config(required + ["--embedding_norm", "preserve", "--embedding_norm_target", "0.4", "0.7",
                                      "--use_ema", "--ema_decay", "0.99", "--ema_update_after_step", "3"])
    assert (on.embedding_norm, on.embedding_norm_target, on.use_ema, on.ema_decay, on.ema_update_after_step) == (
        "preserve", (0.4, 0.7), True, 0.99, 3)
    assert cli.parse_config(required + ["--embedding_norm_decay", "0.25"]).embedding_norm_decay == 0.25


# --- the formulas, against their references ------------------------------------------------------


def test_norm_control_is_the_published_formula_per_part():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, 5)).astype(np.float32)
    for rate in (1.0, 0.25):
        out = np.asarray(NormControl(rate, (0.4, 2.0), (2, 3))(rows))
        for part, target in ((slice(0, 2), 0.4), (slice(2, 5), 2.0)):
            v = rows[:, part].astype(np.float64)
            norm = np.linalg.norm(v, axis=1, keepdims=True)
            # OneTrainer: F.normalize(v) * target; the decay: norm + R * (target - norm), direction kept.
            want = v / norm * (norm + rate * (target - norm))
            np.testing.assert_allclose(out[:, part], want, rtol=2e-6)
    assert np.array_equal(np.asarray(scale_norms(np.zeros((1, 4), np.float32), 0.5, 1.0)), np.zeros((1, 4)))


def ema_model_decay(k, decay, after):
    """diffusers' EMAModel.get_decay(k), written out (use_ema_warmup off, min_decay 0), in float64."""
    s = max(0, k - after - 1)
    return 0.0 if s <= 0 else min((1 + s) / (10 + s), decay)


def test_text_encoders_trains_the_named_parts_only():
    """--text_encoders clip_g on a two-encoder row (4 + 6 wide): clip_l's columns get no update,
    weight decay included, and their gradient does not count in the clipping's global norm; the
    norm control leaves them alone."""
    config = TrainConfig(**base(text_encoders="clip_g", adam_weight_decay=0.5, max_grad_norm=1.0,
                                embedding_norm="preserve", learning_rate=0.1))
    spec = OptimizerSpec.from_config(config, 1, 10, (2.0, 3.0), (4, 6), ("clip_l", "clip_g"))
    assert spec.encoders.trained == (False, True) and spec.norm.targets == (None, 3.0)
    rng = np.random.default_rng(0)
    rows, grads = rng.normal(size=(2, 10)).astype(np.float32), rng.normal(size=(2, 10)).astype(np.float32)
    grads[:, :4] *= 1000  # clip_l's huge gradient must not shrink clip_g's through the clipping
    tx = spec.build()
    updates, _ = tx.update(grads, tx.init(rows), rows)
    updates = np.asarray(updates)
    assert not updates[:, :4].any()
    reference = OptimizerSpec.from_config(TrainConfig(**base(adam_weight_decay=0.5, max_grad_norm=1.0,
                                                             learning_rate=0.1)), 1, 10)
    ref_tx = reference.build()
    only_g = np.concatenate([np.zeros_like(grads[:, :4]), grads[:, 4:]], axis=1)
    ref_updates, _ = ref_tx.update(only_g, ref_tx.init(rows), rows)
    np.testing.assert_allclose(updates[:, 4:], np.asarray(ref_updates)[:, 4:], rtol=1e-6)
    kept = np.asarray(spec.norm(rows))
    np.testing.assert_array_equal(kept[:, :4], rows[:, :4])
    np.testing.assert_allclose(np.linalg.norm(kept[:, 4:], axis=1), 3.0, rtol=1e-6)
    # Every encoder named is the default (one compiled step for both spellings).
    assert OptimizerSpec.from_config(TrainConfig(**base(text_encoders="clip_l,clip_g")), 1, 10, (), (4, 6),
                                     ("clip_l", "clip_g")).encoders is None


@pytest.mark.parametrize("names, keys, message", [
    ("t5", ("clip_l", "t5xxl"), "--text_encoders t5: this model's text encoders are clip_l, t5xxl; name one or more"),
    (",", ("clip_l", "t5xxl"), "--text_encoders ,: this model's text encoders are clip_l, t5xxl"),
    ("clip_l", ("",), "--text_encoders clip_l: this model has one text encoder, which is always trained"),
])
def test_text_encoders_refusals_are_one_line(names, keys, message):
    with pytest.raises(UserError, match="^" + message):
        OptimizerSpec.from_config(TrainConfig(**base(text_encoders=names)), 1, 10, (), (4,) * len(keys), keys)


@pytest.mark.parametrize("decay, after", [(0.9999, 0), (0.5, 3)])
def test_ema_decay_is_diffusers_ema_models(decay, after):
    # (diffusers' EMAModel itself, importing it takes seconds: the run below is checked against it.)
    steps = np.arange(1, 60)
    want = np.array([1.0 - ema_model_decay(int(k), decay, after) for k in steps], np.float32)  # EMAModel.step's factor
    got = np.asarray(Ema(decay, after).one_minus_decay(steps))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[after] == 1.0 and got[after + 1] < 1.0  # a copy until update after + 1, averaging from after + 2


# --- --embedding_norm preserve on the tiny models ---------------------------------------------------


def norms_config(model_dir, data_dir, out, **changes):
    return TrainConfig.tiny(model_dir, data_dir, str(out), **{"num_vectors": 2, "max_train_steps": 3, **changes})


def test_preserve_holds_every_norm_at_the_median(tiny_model_dir, sample_images_dir, tmp_path, capsys):
    median = table_median(tiny_model_dir)
    config = norms_config(tiny_model_dir, sample_images_dir, tmp_path / "on", embedding_norm="preserve")
    assert prepare(config, ONE).opt_spec.norm.targets == pytest.approx((median,), rel=1e-6)
    result = train(config, devices=ONE)
    assert f"norm set to {median:.4g} (median of the token table)" in capsys.readouterr().out
    for record in result.history:
        np.testing.assert_allclose(record["row_norms"], median, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(result.rows, axis=1), median, rtol=1e-6)
    # The same run without it drifts away from the target: the check above is not vacuous.
    off = train(config.replace(embedding_norm="none", output_dir=str(tmp_path / "off")), devices=ONE)
    assert np.abs(np.asarray(off.history[-1]["row_norms"]) / median - 1).max() > 1e-3


def test_preserve_holds_each_sdxl_part_at_its_encoders_median(tiny_sdxl_model_dir, sample_images_dir, tmp_path,
                                                              capsys):
    medians = [table_median(tiny_sdxl_model_dir, c) for c in ("text_encoder", "text_encoder_2")]
    config = norms_config(tiny_sdxl_model_dir, sample_images_dir, tmp_path / "on", embedding_norm="preserve")
    # One number for two tables whose norms differ is ambiguous: refused before anything is written.
    with pytest.raises(UserError, match="an SDXL row has a CLIP ViT-L part and an OpenCLIP bigG part"):
        prepare(config.replace(embedding_norm_target=(0.5,)), ONE)
    result = train(config, devices=ONE)
    assert f"{medians[0]:.4g} (CLIP ViT-L) and {medians[1]:.4g} (OpenCLIP bigG)" in capsys.readouterr().out
    rows = result.rows
    assert rows.shape == (2, 32 + 48)
    np.testing.assert_allclose(np.linalg.norm(rows[:, :32], axis=1), medians[0], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rows[:, 32:], axis=1), medians[1], rtol=1e-6)
    assert abs(medians[0] / medians[1] - 1) > 1e-2  # two targets, not one


def test_decay_pulls_the_norm_toward_the_target_once_per_update(tiny_model_dir, sample_images_dir, tmp_path):
    # A flat loss: at lr 1e-30 Adam moves no float32 row, so only the pull changes the norms, by
    # (1 - R) of the distance each update, and with 2 micro-batches per update still once per update.
    rate, target = 0.25, 2 * table_median(tiny_model_dir)
    config = norms_config(tiny_model_dir, sample_images_dir, tmp_path, embedding_norm_decay=rate,
                          embedding_norm_target=(target,), learning_rate=1e-30, max_train_steps=4,
                          gradient_accumulation_steps=2)
    start = np.linalg.norm(prepare(config, ONE).init_rows, axis=1)
    norms = np.array([start] + [r["row_norms"] for r in train(config, devices=ONE).history])
    distance = target - norms
    assert np.all(distance > 0) and np.all(np.diff(norms, axis=0) > 0)  # monotonic, never past the target
    want = target - (1 - rate) ** np.arange(5)[:, None] * (target - start)
    np.testing.assert_allclose(norms, want, rtol=1e-6)


# --- --use_ema ---------------------------------------------------------------------------------------

EMA_STEPS, EMA_MID = 6, 3


def ema_config(model_dir, data_dir, out):
    # A decay its warm-up reaches within the run, and an update_after_step, so each part of the
    # schedule is checked; 2 micro-batches per update, so the EMA must act once per update.
    return TrainConfig.tiny(model_dir, data_dir, str(out), num_vectors=2, max_train_steps=EMA_STEPS,
                            checkpointing_steps=EMA_MID, gradient_accumulation_steps=2, use_ema=True,
                            ema_decay=0.3, ema_update_after_step=1)


@pytest.fixture(scope="module")
def ema_run(tiny_model_dir, sample_images_dir, tmp_path_factory):
    """The EMA run stepped through its engine: the run, the engine, and after each update its
    learned rows and EMA (host numpy)."""
    config = ema_config(tiny_model_dir, sample_images_dir, tmp_path_factory.mktemp("ema"))
    run = prepare(config, ONE)
    engine = engine_lib.build(run)
    rows, emas = [run.init_rows], [run.init_rows]
    for _ in range(EMA_STEPS):
        engine.update()
        state = parallel.unreplicate(engine.state)
        rows.append(state.rows)
        emas.append(state.ema)
    return run, engine, np.array(rows), np.array(emas)


def test_ema_is_diffusers_ema_model_of_the_recorded_rows(ema_run):
    import torch
    from diffusers.training_utils import EMAModel

    _, engine, rows, emas = ema_run
    param = torch.nn.Parameter(torch.from_numpy(rows[0].copy()))
    reference = EMAModel([param], decay=0.3, update_after_step=1)
    for k in range(1, EMA_STEPS + 1):
        param.data.copy_(torch.from_numpy(rows[k]))
        reference.step([param])
        np.testing.assert_allclose(emas[k], reference.shadow_params[0].numpy(), rtol=1e-6, atol=1e-8)
    assert np.abs(emas[-1] - rows[-1]).max() > 1e-4  # an average, not the rows
    np.testing.assert_array_equal(engine.rows(), emas[-1])  # what the outputs are given


def test_validation_images_are_given_the_ema_rows(ema_run, tmp_path):
    run, engine, _, emas = ema_run
    given = []

    def validator(rows, step, lora=None):
        given.append(rows)
        return [("", [], None, np.zeros((1, 8, 8, 3), np.uint8))]

    class Logger:
        def log_image(self, *args):
            pass

    run = dataclasses.replace(run, config=run.config.replace(output_dir=str(tmp_path)))
    Validate(run, engine, validator, Logger(), [], [])(EMA_STEPS)
    np.testing.assert_array_equal(given[0], emas[-1])
    assert "exponential moving average" in open(os.path.join(str(tmp_path), "README.md")).read()


def test_ema_files_checkpoints_and_resume(ema_run, tmp_path, traces):
    run, _, _, emas = ema_run
    whole = run.config.replace(output_dir=str(tmp_path / "whole"))
    before = traces["train_step"]
    train(whole, devices=ONE)
    saved = load_file(os.path.join(whole.output_dir, "learned_embeds.safetensors"))["<cat-toy>"]
    np.testing.assert_array_equal(saved, emas[-1])  # the file holds the EMA rows
    state = load_file(os.path.join(whole.output_dir, f"checkpoint-{EMA_MID}", checkpoint.STATE_FILE))
    np.testing.assert_array_equal(state[".ema"], emas[EMA_MID])  # the checkpoint keeps the EMA
    half = tmp_path / "half"
    shutil.copytree(os.path.join(whole.output_dir, f"checkpoint-{EMA_MID}"), half / f"checkpoint-{EMA_MID}")
    resumed = train(whole.replace(output_dir=str(half), resume_from_checkpoint="latest"), devices=ONE)
    assert [r["step"] for r in resumed.history] == list(range(EMA_MID + 1, EMA_STEPS + 1))
    for name in ("learned_embeds.safetensors", f"checkpoint-{EMA_STEPS}/{checkpoint.STATE_FILE}"):
        with open(os.path.join(whole.output_dir, name), "rb") as a, open(os.path.join(half, name), "rb") as b:
            assert a.read() == b.read(), name
    assert traces["train_step"] == before  # both runs reuse the engine's compiled step
