"""--shard_weights: a tiny FLUX.1 [dev] trained with its frozen weights split over the 4 fake
devices (parallel.Sharded, one jit program over a mesh) learns what the replicated, pmapped run
learns, draws the same validation images, and never retraces; the SD families refuse the flag;
the weights shard on their own where they do not fit one device.

One replicated and one sharded run (3 updates, validation images at updates 2 and 3, a
validation loss at update 3, --early_stopping's loss recorded at every update) are shared by the
tests of this module; two processes of 2 devices each, sharding over all 4, learn and draw what
the one process of 4 does. The validation loss's program over the mesh is checked per example on
the tiny SD model as well.
"""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from test_multihost import finish, free_port, start_workers, worker_args

from ti_flax import TrainConfig, parallel, train
from ti_flax.errors import UserError
from ti_flax.families import Frozen
from ti_flax.formats import read_embedding
from ti_flax.training import engine as engine_lib, footprint, run as run_lib, step as step_lib
from ti_flax.training.validation_loss import Evaluator

STEPS = 3


def flux_config(model_dir, data_dir, out, **changes):
    return TrainConfig.tiny(model_dir, data_dir, str(out), max_train_steps=STEPS, report_to="none",
                            validation_prompt="a photo of <cat-toy>", validation_steps=2,
                            validation_num_inference_steps=2, num_validation_images=4, validation_resolution=32,
                            validation_loss_steps=STEPS, **changes)


# --early_stopping dvar's deterministic loss recorded at every update (a threshold no run reaches).
RECORD_DVAR = dict(early_stopping="dvar", early_stopping_window=2, early_stopping_threshold=1e-9)


def traced_run(config, traces):
    """(TrainResult, the run's engine, {function: traces during the run})."""
    engines, build = [], engine_lib.build
    before = traces.copy()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_lib, "build", lambda *a, **k: engines.append(build(*a, **k)) or engines[-1])
        result = train(config)
    return result, engines[0], {name: traces[name] - before[name] for name in traces}


@pytest.fixture(scope="module")
def flux_dir(tiny_flux_dirs):
    """The session's tiny FLUX.1 [dev] (its validation images are drawn at --validation_resolution 32:
    FluxPipeline's default 128 latent pixels a side would be 16384 image tokens)."""
    return tiny_flux_dirs["dev"]


@pytest.fixture(scope="module")
def runs(flux_dir, sample_images_dir, tmp_path_factory, traces):
    """{"replicated": (result, engine, traces), "sharded": ...}: the same FLUX.1 [dev] run both ways."""
    return {
        name: traced_run(flux_config(flux_dir, sample_images_dir, tmp_path_factory.mktemp(name),
                                     shard_weights=name == "sharded", **RECORD_DVAR), traces)
        for name in ("replicated", "sharded")
    }


def test_sharded_run_learns_the_replicated_runs_rows(runs):
    replicated, sharded = runs["replicated"][0], runs["sharded"][0]
    assert np.abs(sharded.rows - replicated.rows).max() <= 1e-6
    for a, b in zip(replicated.history, sharded.history, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]


def test_the_frozen_weights_really_are_split_over_the_devices(runs):
    engine = runs["sharded"][1]
    assert engine.layout.sharded and runs["replicated"][1].layout.sharded is False
    table = engine.frozen.text_encoder["text_model"]["embeddings"]["token_embedding"]["weight"]  # [49408, 64]
    shards = table.addressable_shards
    assert len(shards) == 4 and all(s.data.shape == (table.shape[0] // 4, table.shape[1]) for s in shards)
    leaves = jax.tree_util.tree_leaves(engine.frozen)
    held = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards if s.device == shards[0].device)
    whole = sum(leaf.nbytes for leaf in leaves)
    assert held < 0.35 * whole  # a device holds little more than a quarter: only small leaves are whole
    # The state is one copy, whole on every device, read back as the replicated state is.
    rows = engine.state.rows
    assert rows.shape[0] == 1 and rows.sharding.is_fully_replicated


def test_the_step_memory_is_counted_per_device(runs):
    # footprint.check_fits reads the compiled program: the sharded one's arguments are a device's
    # slices, about a quarter of the replicated one's.
    sharded, replicated = (footprint.memory_dict(runs[name][1].step_fn)["argument_size_in_bytes"]
                           for name in ("sharded", "replicated"))
    assert sharded < 0.35 * replicated
    assert runs["sharded"][0].timings["estimated_device_bytes"] == footprint.measure(runs["sharded"][1].step_fn).total


def test_the_sharded_step_and_sampler_compile_once(runs):
    counts = runs["sharded"][2]
    # 3 updates and 2 validations, one trace each of the step and the sampler.
    assert (counts["train_step"], counts["sample_step"]) == (1, 1)


def test_validation_images_match_the_replicated_runs(runs):
    folders = [os.path.join(runs[name][0].output_dir, "validation") for name in ("replicated", "sharded")]
    names = sorted(os.listdir(folders[0]))
    assert names == sorted(os.listdir(folders[1])) and len(names) == 2 * 5  # 4 images and a grid, twice
    for name in names:
        a, b = (np.asarray(Image.open(os.path.join(folder, name)), np.int16) for folder in folders)
        assert np.abs(a - b).max() <= 1, name


def test_cached_latents_shard_too(runs, flux_dir, sample_images_dir, tmp_path):
    # The VAE encodes the views split over the mesh as well: the same rows as the run without the cache.
    config = TrainConfig.tiny(flux_dir, sample_images_dir, str(tmp_path), max_train_steps=STEPS,
                              report_to="none", shard_weights=True, cache_latents=True)
    rows = train(config).rows
    assert np.abs(rows - runs["replicated"][0].rows).max() <= 1e-5


def test_sd_refuses_shard_weights_in_one_line_before_writing(tiny_model_dir, sample_images_dir, tmp_path):
    out = tmp_path / "out"
    config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(out), shard_weights=True)
    with pytest.raises(UserError) as err:
        train(config)
    assert str(err.value) == "--shard_weights: for FLUX.1 models; Stable Diffusion's weights fit one device replicated"
    assert not out.exists()


def test_weights_shard_on_their_own_where_they_do_not_fit_one_device(tiny_flux_dirs, sample_images_dir, tmp_path,
                                                                     monkeypatch, capsys):
    config = TrainConfig.tiny(tiny_flux_dirs["dev"], sample_images_dir, str(tmp_path), report_to="none")
    assert run_lib.prepare(config).sharded is None  # CPU reports no memory limit: never on its own there
    model = run_lib.load_checked_model(config)[1]
    need = footprint.tree_bytes(Frozen.from_model(model, abstract=True))
    monkeypatch.setattr(footprint, "memory_limit", lambda device: need - 1)
    run = run_lib.prepare(config)
    assert run.sharded.endswith("GiB of frozen weights, 0.0 GiB per device") and run.layout.sharded
    monkeypatch.setattr(footprint, "memory_limit", lambda device: need)
    assert run_lib.prepare(config).sharded is None


def test_two_processes_learn_and_draw_what_one_does(runs, flux_dir, sample_images_dir, tmp_path):
    # The mesh spans both processes' devices: each gives its slices of the batch, and every one
    # takes part in sampling the validation images, which process 0 alone writes.
    port, outs = free_port(), [tmp_path / "out0", tmp_path / "out1"]
    extra = ("--num_vectors", "1", "--shard_weights", "--validation_prompt", "a photo of <cat-toy>",
             "--validation_steps", str(STEPS), "--validation_num_inference_steps", "2", "--num_validation_images", "4",
             "--validation_resolution", "32")
    procs = start_workers([worker_args(flux_dir, sample_images_dir, outs[i], port, i, steps=STEPS, checkpointing=0,
                                       extra=extra) for i in range(2)])
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "frozen weights split over them (--shard_weights)" in outputs[0] and not outs[1].exists()
    written = read_embedding(str(outs[0] / "cat-toy.safetensors"))
    rows = np.concatenate([written.rows, written.more["text_encoder_2"]], axis=-1)
    assert np.abs(rows - runs["replicated"][0].rows).max() <= 1e-6
    one = os.path.join(runs["replicated"][0].output_dir, "validation", f"step-{STEPS:06d}.png")
    two = outs[0] / "validation" / f"step-{STEPS:06d}.png"
    a, b = (np.asarray(Image.open(path), np.int16) for path in (one, two))
    assert np.abs(a - b).max() <= 1


def test_the_sharded_runs_validation_loss_is_the_replicated_ones(runs):
    replicated, sharded = (runs[name][0].validation_losses for name in ("replicated", "sharded"))
    assert [v["step"] for v in sharded] == [STEPS] == [v["step"] for v in replicated]
    assert abs(sharded[0]["loss"] - replicated[0]["loss"]) <= 1e-5 * replicated[0]["loss"]


def test_the_sharded_runs_early_stopping_loss_is_the_replicated_ones(runs):
    replicated, sharded = (runs[name][0].early_stopping for name in ("replicated", "sharded"))
    assert [r["step"] for r in sharded] == list(range(STEPS + 1)) == [r["step"] for r in replicated]
    np.testing.assert_allclose([r["loss"] for r in sharded], [r["loss"] for r in replicated], rtol=1e-5)
    assert runs["sharded"][0].stopped_early is None


def test_the_validation_loss_over_the_mesh_is_the_pmapped_ones(tiny_model_dir, sample_images_dir, tmp_path):
    # On the tiny SD model too: its run refuses --shard_weights, but the loss's program over the
    # mesh is the same code for every family.
    run = run_lib.prepare(TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(tmp_path), validation_loss_steps=2))
    host, rows = Frozen.from_model(run.model), step_lib.init_state(run.init_rows, run.opt_spec).rows
    losses = []
    for layout in (parallel.Replicated(run.devices), parallel.Sharded(run.devices)):
        evaluator = Evaluator(run.model.spec, run.compute, run.validation_images, 0, run.devices, layout=layout)
        losses.append(evaluator.per_example(layout.state(rows), layout.weights(host)))
    assert losses[0].shape == (evaluator.count,) and np.abs(losses[0] - losses[1]).max() <= 1e-6


def test_a_step_that_does_not_fit_suggests_sharding_first(runs, flux_dir, sample_images_dir, tmp_path, monkeypatch):
    # The weights (45 MB) fit the patched limit, so the run stays replicated, but its step
    # (127 MB; the replicated run's program, compiled already) does not.
    config = flux_config(flux_dir, sample_images_dir, tmp_path / "out")
    monkeypatch.setattr(footprint, "memory_limit", lambda device: 2**30 // 16)
    run = run_lib.prepare(config)
    assert run.sharded is None
    with pytest.raises(UserError, match=r"GiB short; try --shard_weights, --mixed_precision bf16, --cache_latents"):
        engine_lib.build(run)
    assert not (tmp_path / "out").exists()


def test_a_sharded_step_that_does_not_fit_asks_for_more_devices(runs, flux_dir, sample_images_dir, tmp_path,
                                                                monkeypatch):
    # The sharded run's program (compiled already by the fixture) needs more than the patched
    # limit per device: more devices come first among the changes to try.
    config = flux_config(flux_dir, sample_images_dir, tmp_path / "out", shard_weights=True)
    monkeypatch.setattr(footprint, "memory_limit", lambda device: 2**30 // 64)
    with pytest.raises(UserError, match=r"GiB short; try more than 4 devices to split the weights over, "
                                        r"--mixed_precision bf16"):
        engine_lib.build(run_lib.prepare(config))
    assert not (tmp_path / "out").exists()
