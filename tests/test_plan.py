"""`ti_flax.plan`: the train step compiled for one chip from shapes alone, its memory and work,
the changes that would make a run fit (found cheapest first), the answers cached; and `train`
refusing, in one line and before writing anything, a step its device cannot hold."""

import importlib.util

import jax
import numpy as np
import pytest

from ti_flax import TrainConfig, UserError, families, models
from ti_flax.training import footprint
from ti_flax.commands import plan as planning
from ti_flax.config.choices import PLAN_TARGETS

import bench_cost


def sd15_spec():
    return bench_cost.model_spec("sd15")  # the real SD 1.5 configs: a spec, no weights


def fake_footprint(total, flops=1e12):
    return footprint.Footprint(0, 0, 0, 0, total, 0, 0, total, flops, 1e9)


# --------------------------------------------------------------------------------------------
# Which changes, in which order (no compiling)


def test_changes_come_cheapest_first_and_keep_the_global_batch():
    config = TrainConfig(train_batch_size=4, gradient_accumulation_steps=2, resolution=512)
    flags = [f for f, _ in footprint.lighter_changes(config, sd15_spec(), "cpu", 512)]
    assert flags == ["--mixed_precision bf16", "--cache_latents", "--gradient_checkpointing",
                     "--train_batch_size 2 --gradient_accumulation_steps 4",
                     "--train_batch_size 1 --gradient_accumulation_steps 8"]
    for _, change in footprint.lighter_changes(config, sd15_spec(), "cpu", 512)[3:]:
        assert change["train_batch_size"] * change["gradient_accumulation_steps"] == 8  # the global batch stays
    done = config.replace(mixed_precision="bf16", cache_latents=True, gradient_checkpointing=True, train_batch_size=1)
    assert footprint.lighter_changes(done, sd15_spec(), "cpu", 512) == []


def test_a_dense_long_self_attention_is_offered_the_lighter_one_the_chip_runs():
    spec = sd15_spec()
    dense = TrainConfig(attention="dense", mixed_precision="bf16", cache_latents=True, gradient_checkpointing=True,
                        train_batch_size=1)
    # On CPU "auto" chunks the 4096-token self-attention; at 64 px (64 tokens) nothing is long.
    assert footprint.lighter_changes(dense, spec, "cpu", 512) == [("--attention auto", {"attention": "auto"})]
    assert footprint.lighter_changes(dense, spec, "cpu", 64) == []
    # float32 on a GPU: "auto" stays dense there (cuDNN needs bf16), so the offer is chunked.
    fp32 = dense.replace(mixed_precision="no")
    assert ("--attention chunked", {"attention": "chunked"}) in footprint.lighter_changes(fp32, spec, "gpu", 512)


def test_attention_sites_list_every_call_the_unet_makes():
    spec = sd15_spec()
    sites = models.attention_sites(spec, models.Compute(dtype="bfloat16", attention="auto", backend="tpu"), 512)
    counts = {(kind, q): n for (kind, q, kv, d, impl), n in sites}
    # SD 1.5: 16 transformers (2 + 2 + 2 down, 1 mid, 3 + 3 + 3 up), one self and one cross each.
    assert sum(counts.values()) == 32
    assert counts[("self", 4096)] == counts[("cross", 4096)] == 5 and counts[("self", 64)] == 1
    impl = {(kind, q): i for (kind, q, kv, d, i), _ in sites}
    flash = "flash" if importlib.util.find_spec("jax.experimental.pallas.ops.tpu.flash_attention") else "dense"
    assert impl[("self", 4096)] == impl[("self", 1024)] == flash  # long self-attention: the Pallas kernel
    assert impl[("self", 256)] == impl[("cross", 4096)] == "dense"  # not longer than a chunk; 77 keys


def test_search_compiles_in_order_keeps_cheaper_changes_and_stops_at_the_first_fit(monkeypatch):
    tried = []

    def fake_try(config, spec, target, device, chip, flags):
        tried.append((flags, config.mixed_precision, config.cache_latents, config.gradient_checkpointing,
                      config.train_batch_size, config.gradient_accumulation_steps))
        fits = config.train_batch_size <= 2 and config.cache_latents
        return planning.Tried(flags, fake_footprint(1), fits, None, config.train_batch_size)

    monkeypatch.setattr(planning, "_try", fake_try)
    config = planning.plannable(TrainConfig(pretrained_model_name_or_path="m", train_batch_size=4, resolution=512))
    device, chip = footprint.target_device("local")
    found, suggestion = planning._search(config, sd15_spec(), "local", device, chip)
    everything = "--mixed_precision bf16 --cache_latents --gradient_checkpointing"
    assert [t[0] for t in tried] == ["--mixed_precision bf16", "--mixed_precision bf16 --cache_latents", everything,
                                     everything + " --train_batch_size 2 --gradient_accumulation_steps 2"]
    assert tried[-1][1:] == ("bf16", True, True, 2, 2)
    assert suggestion == tried[-1][0] and [t.flags for t in found] == [t[0] for t in tried]


# --------------------------------------------------------------------------------------------
# Numbers and words


def test_roofline_is_the_slower_of_compute_and_memory():
    chip = footprint.CHIPS["v5e"]
    compute_bound = fake_footprint(1, flops=11.26e12)._replace(bytes_accessed=1e9)
    assert footprint.step_seconds(compute_bound, chip) == pytest.approx(11.26e12 / 197e12)
    memory_bound = fake_footprint(1, flops=1e9)._replace(bytes_accessed=819e9)
    assert footprint.step_seconds(memory_bound, chip) == pytest.approx(1.0)
    assert footprint.step_seconds(compute_bound, footprint.Chip("cpu", None, None)) is None


def test_the_report_says_fits_or_by_how_much_it_does_not():
    chip = footprint.CHIPS["v5e"]  # 16 GiB
    big = planning.Tried("", fake_footprint(int(18.5 * 2**30)), False, 0.05, 4)
    small = planning.Tried("--mixed_precision bf16", fake_footprint(int(7.1 * 2**30)), True, 0.05, 4)
    assert planning.verdict(big, chip) == "does not fit by 2.50 GiB"
    assert planning.verdict(small, chip) == "fits (8.90 GiB free)"
    assert planning.speed(small) == "1.00 TFLOP, 1.00 GB moved; at least 50.0 ms, at most 80.0 images/s"
    result = planning.Plan("v5e", chip, "m (SD 1.x/2.x)", 512, big, [(("self", 4096, 4096, 40, "flash"), 10)],
                           [small], small.flags)
    text = str(result)
    assert "total           18.50 GiB of 16.00 GiB: does not fit by 2.50 GiB" in text
    assert "self 4096x4096 (head 40) x10: flash" in text
    assert "    --mixed_precision bf16: 7.10 GiB, fits (8.90 GiB free)" in text
    assert text.endswith("  suggested: --mixed_precision bf16")


def test_a_tpu_compilers_out_of_memory_message_is_read_as_bytes():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(26.84G) exceeds available HBM (15.75G).")
    assert planning.out_of_memory(message) == int(26.84 * 2**30)
    assert planning.out_of_memory("INTERNAL: something else") is None


# --------------------------------------------------------------------------------------------
# Bad input: one line each


def test_an_unknown_target_is_one_line():
    with pytest.raises(UserError, match=r"^--target 'v9': choose one of v4, v5e, v5p, v6e, local$"):
        footprint.target_device("v9")
    assert PLAN_TARGETS[-1] == "local"


def test_a_tpu_target_without_libtpu_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(footprint.importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(UserError) as err:
        footprint.target_device("v5e")
    assert "\n" not in str(err.value) and "needs libtpu" in str(err.value)
    assert f'pip install "jax[tpu]=={jax.__version__}"' in str(err.value)


def test_the_startup_line_puts_the_estimate_beside_the_peak():
    from ti_flax.training import logs

    timings = {"load_model_s": 1.0, "compile_step_s": 2.0, "peak_device_bytes": int(6.4 * 2**30),
               "estimated_device_bytes": int(7.1 * 2**30)}
    assert logs.startup_text(timings).endswith("; peak device memory 6.40 GiB (step estimated 7.10 GiB)")
    cpu = logs.startup_text({**timings, "peak_device_bytes": None})
    assert cpu.endswith("; step estimated 7.10 GiB of device memory")


# --------------------------------------------------------------------------------------------
# The tiny model, compiled on CPU (slow: model folder)


@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ti_flax" / "plans"


def test_plan_measures_the_tiny_step_and_answers_again_from_the_cache(tiny_model_dir, plan_cache, monkeypatch):
    config = TrainConfig(pretrained_model_name_or_path=tiny_model_dir, resolution=32, train_batch_size=2)
    first = planning.plan(config, "local")
    f = first.run.footprint
    spec, _ = families.read_spec(tiny_model_dir)
    model = families.load_model(tiny_model_dir)
    # The frozen weights counted from the real float32 weights, independently of XLA.
    assert f.frozen == sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(model.params)) + 4 * 1000
    assert f.learned > 0 and f.batch == 2 * 32 * 32 * 3 + 2 * 77 * 4 + 2 * 4 + 2 * 4 + 2 * 4
    assert f.temporaries > 0 and f.flops > 0
    # XLA leaves out the weights the step never reads (the VAE decoder); the device holds them all.
    assert 0 < f.arguments < f.frozen
    assert f.total == f.frozen + f.learned + f.batch + f.outputs + f.temporaries + f.code
    assert first.run.fits is None and not first.run.cached  # CPU: no memory limit
    assert len(list(plan_cache.iterdir())) == 1

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(footprint, "compile_step", no_compiling)
    again = planning.plan(config, "local")
    assert again.run.cached and again.run.footprint == f
    # ti_flax's code builds the program: another version of it is another cache key.
    real = planning._code_hash
    monkeypatch.setattr(planning, "_code_hash", lambda: "another version of the code")
    with pytest.raises(UserError, match="compiled again"):  # plan words a failed compile in one line
        planning.plan(config, "local")
    monkeypatch.setattr(planning, "_code_hash", real)
    # Another shape is another program: it compiles (and here, fails to, in one line).
    monkeypatch.setattr(footprint, "compile_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("INTERNAL: boom\nat")))
    with pytest.raises(UserError, match=r"^the train step does not compile for cpu: RuntimeError: INTERNAL: boom$"):
        planning.plan(config.replace(train_batch_size=3), "local")


def test_plan_measures_the_program_the_engine_compiles(tiny_model_dir, sample_images_dir, tmp_path, plan_cache):
    # `plan --target local` is read against the peak a run measures, so it must compile the very
    # program the engine runs (pmap's), not an equivalent one: a jit over vmap computes the same
    # with other buffers (a quarter fewer temporaries on an H200 at SD 1.5 shapes, 5% here).
    from ti_flax.training import engine, step as step_lib
    from ti_flax.training.run import prepare

    config = TrainConfig(pretrained_model_name_or_path=tiny_model_dir, train_data_dir=sample_images_dir,
                         placeholder_token="<plan>", initializer_token="toy", output_dir=str(tmp_path / "out"),
                         resolution=32, train_batch_size=2, mixed_precision="bf16").validate()
    run = prepare(config, devices=jax.local_devices()[:1])
    state = step_lib.init_state(run.init_rows, run.opt_spec)
    args = engine.step_shapes(run, state, families.Frozen.from_model(run.model, run.compute.dtype, abstract=True), 0)
    compiled = step_lib.compile_train_step(run.model.spec, run.compute, run.opt_spec, run.devices, *args,
                                           loss_spec=run.loss_spec)
    memory = footprint.memory_dict(compiled)
    planned = planning.plan(config, "local").run.footprint
    assert (planned.arguments, planned.temporaries, planned.outputs) == (
        memory["argument_size_in_bytes"], memory["temp_size_in_bytes"],
        memory["output_size_in_bytes"] - memory["alias_size_in_bytes"])


def test_train_stops_in_one_line_when_the_step_cannot_fit(tiny_model_dir, sample_images_dir, tmp_path, monkeypatch):
    from ti_flax import train

    out = tmp_path / "out"
    monkeypatch.setattr(footprint, "memory_limit", lambda device: 1000)  # a device with 1000 bytes
    config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(out))
    with pytest.raises(UserError) as err:
        train(config, devices=jax.local_devices()[:1])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("the train step needs ") and " GiB per device but cpu has 0.00 GiB: " in message
    assert "short; try --mixed_precision bf16, --cache_latents, --gradient_checkpointing (python -m ti_flax.plan" in message
    assert not out.exists()  # nothing written


@pytest.mark.slow
def test_the_tiny_step_compiles_for_a_tpu_v5e_chip_without_one(tiny_model_dir):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install \"jax[tpu]\" installs it on any machine)")
    device, chip = footprint.target_device("v5e")
    assert device.device_kind == "TPU v5 lite" and chip.memory == 16 * 2**30
    spec, _ = families.read_spec(tiny_model_dir)
    from ti_flax.training.optim import OptimizerSpec

    config = TrainConfig(resolution=64, train_batch_size=1)
    compute = models.Compute(dtype="bfloat16", attention="auto", backend="tpu")
    opt_spec = OptimizerSpec.from_config(config, 1, 100)
    # 64 px: a 32 x 32 latent, so the first level's self-attention has 1024 tokens, long enough for flash.
    sites = models.attention_sites(spec, compute, 64)
    flash = {(kind, q) for (kind, q, kv, d, impl), _ in sites if impl == "flash"}
    assert flash == {("self", 1024)}
    args = footprint.step_args(spec, compute, opt_spec, 1, 64, 1)
    compiled = footprint.compile_step(device, spec, compute, opt_spec, args)
    f = footprint.measure(compiled, args)
    assert min(f.frozen, f.learned, f.batch, f.arguments, f.temporaries, f.code, f.total, f.flops, f.bytes_accessed) > 0
    assert "tpu_custom_call" in compiled.as_text()  # the Pallas kernel, lowered for the chip
    assert footprint.step_seconds(f, chip) > 0
