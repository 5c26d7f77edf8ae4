"""SDXL textual inversion end to end on the tiny SDXL model (tests/conftest.py's tiny_sdxl_model_dir).

One module-scoped run (4 devices, center-cropped odd-sized images, a checkpoint mid-run) is
checked many ways: frozen weights, optimizer state, traces, learning, resume, time ids, the
second encoder's ids, and its files in PyTorch diffusers (the model card's code included). Two
more runs compile their own step: one on 1 device with cached latents and gradient accumulation
must give the reference's rows, and a bf16 run must stay close to them. Everything else reuses
those three compiled programs (about 25, 25 and 35 s on 2 cores; bf16 compiles slowest on CPU) or
loads the model only.
"""

import contextlib
import copy
import functools
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ti_flax import TrainConfig, families, formats, models, parallel
from ti_flax.training import checkpoint, engine as engine_lib
from ti_flax.data import prompts
from ti_flax.training import step as step_lib
from ti_flax import tokens as tokens_lib, train
from ti_flax.errors import UserError
from ti_flax.data.images import load_image_set
from ti_flax.training.run import prepare
from ti_flax.families.sdxl import second_encoder_ids

pytestmark = pytest.mark.slow

FOUR, TWO, ONE = jax.local_devices()[:4], jax.local_devices()[:2], jax.local_devices()[:1]
STEPS, MID = 8, 4  # the reference run's updates; the checkpoint its resume starts from
TOKENS = ["<cat-toy>", "<cat-toy>_1"]
WIDTHS = (32, 48)  # the tiny model's CLIP-L-like and bigG-like text encoders
ROW = sum(WIDTHS)
BASE_VOCAB = 49408
OUTPUT_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors", "cat-toy.safetensors")


def sdxl_config(model_dir, data_dir, out, **changes):
    base = dict(num_vectors=2, max_train_steps=STEPS, checkpointing_steps=MID, center_crop=True)
    return TrainConfig.tiny(model_dir, data_dir, str(out), **{**base, **changes})


def trained(config, devices, traces):
    """train(config) on `devices`, keeping the engine it built and counting the step's traces."""
    built, build = [], engine_lib.build

    def keep(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    before = traces["train_step"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_lib, "build", keep)
        result = train(config, devices=devices)
    return types.SimpleNamespace(config=config, result=result, engine=built[0],
                                 traces=traces["train_step"] - before)


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_model_dir, sample_images_dir, tmp_path_factory, traces):
    """The reference: 4 devices x batch 1, float32, pixels through the VAE in the step, the
    bundled images (non-square ones among them) center-cropped, checkpoints at MID and STEPS."""
    step_lib.pmapped_train_step.cache_clear()  # a step compiled by an earlier test would hide a retrace
    config = sdxl_config(tiny_sdxl_model_dir, sample_images_dir, tmp_path_factory.mktemp("sdxl4"))
    return trained(config, FOUR, traces)


@pytest.fixture(scope="module")
def one_device_run(sdxl_run, tmp_path_factory, traces):
    """The reference's first MID updates on 1 device: each update 4 micro-batches of 1 example
    (gradient accumulation), from cached latents. Same examples, draws and updates."""
    config = sdxl_run.config.replace(
        output_dir=str(tmp_path_factory.mktemp("sdxl1")), max_train_steps=MID, checkpointing_steps=0,
        train_batch_size=1, gradient_accumulation_steps=4, cache_latents=True,
    )
    return trained(config, ONE, traces)


def rows_at(run, step):
    """The rows a run's checkpoint-{step} holds."""
    return load_file(os.path.join(run.config.output_dir, f"checkpoint-{step}", checkpoint.STATE_FILE))[".rows"]


def read(path):
    return load_file(str(path))


# ---- what a run writes, changes and keeps ----------------------------------------------------


def test_outputs_hold_the_rows_for_both_encoders(sdxl_run):
    out, rows = sdxl_run.config.output_dir, sdxl_run.result.rows
    assert rows.shape == (2, ROW) and rows.dtype == np.float32 and np.all(np.isfinite(rows))
    assert sdxl_run.result.tokens == TOKENS
    first, second = rows[:, :WIDTHS[0]], rows[:, WIDTHS[0]:]
    for folder, want in ((out, rows), (os.path.join(out, f"checkpoint-{STEPS}"), rows),
                         (os.path.join(out, f"checkpoint-{MID}"), rows_at(sdxl_run, MID))):
        pair_1, pair_2, single = (read(os.path.join(folder, name)) for name in OUTPUT_FILES)
        np.testing.assert_array_equal(pair_1["<cat-toy>"], want[:, :WIDTHS[0]])
        np.testing.assert_array_equal(pair_2["<cat-toy>"], want[:, WIDTHS[0]:])
        assert list(pair_1) == list(pair_2) == ["<cat-toy>"] and sorted(single) == ["clip_g", "clip_l"]
        np.testing.assert_array_equal(single["clip_l"], want[:, :WIDTHS[0]])
        np.testing.assert_array_equal(single["clip_g"], want[:, WIDTHS[0]:])
    # The model card sends A1111 / ComfyUI users to the clip_l/clip_g file (export's a1111 and
    # comfyui layouts hold one text encoder; they refuse an SDXL embedding).
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "`cat-toy.safetensors`" in card and "--format a1111" not in card and "--format comfyui" not in card
    init = sdxl_run.engine.run.init_rows  # the initializer's row in each table, moved by training
    assert not np.allclose(first, init[:, :WIDTHS[0]], atol=1e-3)
    assert not np.allclose(second, init[:, WIDTHS[0]:], atol=1e-3)


def test_frozen_weights_of_both_encoders_unet_and_vae_stay_bitwise(sdxl_run):
    # The engine's frozen weights after the last update, each device's copy, against the weights
    # the run loaded.
    frozen, loaded = sdxl_run.engine.frozen, sdxl_run.engine.run.model.params
    for name, field in (("text_encoder",) * 2, ("text_encoder_2",) * 2, ("unet", "denoiser"), ("vae",) * 2):
        want = dict(jax.tree_util.tree_flatten_with_path(loaded[name])[0])
        got = dict(jax.tree_util.tree_flatten_with_path(getattr(frozen, field))[0])
        assert got.keys() == want.keys(), name
        for path, leaf in got.items():
            leaf = np.asarray(leaf)
            assert leaf.shape == (4,) + np.shape(want[path]) and leaf.dtype == np.float32
            for copy_on_device in leaf:
                np.testing.assert_array_equal(copy_on_device, want[path], err_msg=f"{name}{jax.tree_util.keystr(path)}")
    # The placeholder rows live apart: neither token table grew.
    tables = models.token_tables({k: parallel.unreplicate(getattr(frozen, k))
                                  for k in ("text_encoder", "text_encoder_2")})
    assert [t.shape for t in tables] == [(BASE_VOCAB, WIDTHS[0]), (BASE_VOCAB, WIDTHS[1])]


def test_optimizer_state_is_only_the_rows(sdxl_run):
    # On the devices: Adam's moments are [devices, N, 32 + 48], the counts scalars.
    shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(sdxl_run.engine.state.opt_state)]
    assert set(shapes) <= {(4,), (4, 2, ROW)} and shapes.count((4, 2, ROW)) == 2, shapes
    # In a checkpoint: the rows, their moments and counts, nothing of the frozen models.
    state = read(os.path.join(sdxl_run.config.output_dir, f"checkpoint-{MID}", checkpoint.STATE_FILE))
    assert {k: v.shape for k, v in state.items() if v.ndim} == {
        ".rows": (2, ROW), **{k: (2, ROW) for k in state if k.endswith((".mu", ".nu"))}}
    assert sum(1 for k in state if k.endswith((".mu", ".nu"))) == 2


def test_the_step_is_traced_once_per_run(sdxl_run, one_device_run):
    assert sdxl_run.traces == 1 and one_device_run.traces == 1


def test_one_device_accumulated_cached_run_gives_the_four_device_rows(sdxl_run, one_device_run):
    # 1 device x 4 micro-batches of 1 from cached latents == 4 devices x 1 from pixels: the same
    # examples and draws (keyed by example, not device), within float tolerance.
    one, four = one_device_run.result, sdxl_run.result
    assert [r["step"] for r in one.history] == list(range(1, MID + 1))
    np.testing.assert_allclose([r["loss"] for r in one.history], [r["loss"] for r in four.history[:MID]], rtol=1e-5)
    np.testing.assert_allclose(one.rows, rows_at(sdxl_run, MID), atol=2e-6)
    assert not np.allclose(one.rows, sdxl_run.engine.run.init_rows, atol=1e-3)  # the rows did move


def test_bf16_runs_and_stays_close_to_float32(sdxl_run, tmp_path, traces):
    config = sdxl_run.config.replace(  # the reference's global batch of 4, over 2 devices
        output_dir=str(tmp_path / "bf16"), max_train_steps=MID, checkpointing_steps=0, train_batch_size=2,
        mixed_precision="bf16", cache_latents=True,
    )
    bf16 = trained(config, TWO, traces)
    rows, fp32 = bf16.result.rows, rows_at(sdxl_run, MID)
    assert bf16.traces == 1 and rows.dtype == np.float32 and np.all(np.isfinite(rows))
    assert jax.tree_util.tree_leaves(bf16.engine.frozen.denoiser)[0].dtype == jnp.bfloat16  # bf16 really ran
    assert not np.array_equal(rows, fp32)
    # Close to float32 after MID updates (observed on CPU: the rows' movement from the initializer
    # 0.997 cosine-similar to float32's, the rows 8% of that movement apart, losses within 0.03%;
    # single elements differ by up to half their movement, where Adam normalises a gradient near 0).
    init = sdxl_run.engine.run.init_rows
    moved, moved_fp32 = (rows - init).ravel(), (fp32 - init).ravel()
    assert moved @ moved_fp32 / np.linalg.norm(moved) / np.linalg.norm(moved_fp32) >= 0.98
    assert np.linalg.norm(rows - fp32) <= 0.25 * np.linalg.norm(moved_fp32)
    np.testing.assert_allclose([r["loss"] for r in bf16.result.history],
                               [r["loss"] for r in sdxl_run.result.history[:MID]], rtol=1e-2)
    np.testing.assert_array_equal(read(os.path.join(config.output_dir, OUTPUT_FILES[2]))["clip_g"], rows[:, WIDTHS[0]:])


def test_resume_from_a_mid_run_checkpoint_is_bitwise_identical(sdxl_run, tmp_path, traces):
    config = sdxl_run.config
    assert [s for s, _ in checkpoint.list_checkpoints(config.output_dir)] == [MID, STEPS]
    half = tmp_path / "half"
    shutil.copytree(os.path.join(config.output_dir, f"checkpoint-{MID}"), half / f"checkpoint-{MID}")
    resumed = trained(config.replace(output_dir=str(half), resume_from_checkpoint="latest"), FOUR, traces)
    assert [r["step"] for r in resumed.result.history] == list(range(MID + 1, STEPS + 1))
    assert resumed.traces == 0  # the reference's compiled step, reused
    for name in OUTPUT_FILES:
        with open(half / name, "rb") as a, open(os.path.join(config.output_dir, name), "rb") as b:
            assert a.read() == b.read(), name


# ---- learning ---------------------------------------------------------------------------------


def fixed_eval_loss(engine, rows, steps=8):
    """Mean loss of `rows` over the run's first `steps` batches, each with the noise and timesteps
    of one fixed key: the same draws for any rows. The run's own compiled step computes it (its
    loss is taken before its update), so nothing else compiles."""
    run = engine.run
    losses = []
    for s in range(steps):
        state = step_lib.init_state(rows, run.opt_spec)._replace(step=jnp.asarray(1000 + s, jnp.int32))
        batch = run.data.local_batch(s, 0, 1, len(run.devices))
        _, metrics = engine.step_fn(parallel.replicate(state, run.devices), engine.frozen,
                                    parallel.shard(batch, run.devices), engine.keys)
        losses.append(float(parallel.unreplicate(metrics["loss"])))
    return float(np.mean(losses))


def test_learning_is_real(sdxl_run):
    engine = sdxl_run.engine
    before = fixed_eval_loss(engine, engine.run.init_rows)
    after = fixed_eval_loss(engine, sdxl_run.result.rows)
    assert after < before, (before, after)


# ---- time ids and the second encoder's ids ----------------------------------------------------


def image_of(images, pixels):
    """Which of `images` (possibly flipped) each of `pixels` is."""
    return np.array([next(i for i, im in enumerate(images) if (p == im).all() or (p == im[:, ::-1]).all())
                     for p in pixels])


def test_the_step_conditions_the_unet_on_each_images_size_and_crop(sdxl_run, sample_images_dir, monkeypatch):
    run = sdxl_run.engine.run
    config = run.config
    # The run's time ids are load_image_set's: each file's size and its center crop.
    _, _, want = load_image_set(sample_images_dir, config.resolution, True, config.interpolation)
    np.testing.assert_array_equal(run.data.time_ids, want)
    assert len({tuple(t) for t in want}) > 2  # the bundled images differ in size and crop
    # A batch carries each example's image's time ids...
    batch = run.data.local_batch(0, 0, 1, 1)  # step 0's 4 examples on one device: [1, 4, ...]
    images = image_of(run.data.images, batch.pixel_values[0])
    np.testing.assert_array_equal(batch.time_ids[0], want[images])
    # ... and the step gives them, with the pooled text embedding, to the UNet: stand-ins for the
    # noise draws, the text encoders and the UNet record what the step passes (nothing heavy runs).
    pooled = np.arange(4 * 16, dtype=np.float32).reshape(4, 16)
    seen = []

    def diffusion_inputs(spec, compute, frozen, batch, key, loss_spec=None):
        noise = jnp.zeros((len(batch.example_ids), 4, 4, 4))
        return noise, jnp.zeros(len(batch.example_ids), jnp.int32), noise

    def condition(spec, compute, text_params, input_ids, rows):
        return models.Condition(jnp.zeros(input_ids.shape + (ROW,)) + jnp.sum(rows), jnp.asarray(pooled))

    def predict_noise(spec, compute, unet_params, latents, timesteps, context, added_cond=None):
        jax.debug.callback(lambda *x: seen.append(x), added_cond["time_ids"], added_cond["text_embeds"])
        return jnp.zeros_like(latents) + jnp.mean(context)

    monkeypatch.setattr(step_lib, "diffusion_inputs", diffusion_inputs)
    monkeypatch.setattr(families.of(run.model.spec), "condition", condition)
    monkeypatch.setattr(models, "predict_noise", predict_noise)
    step = jax.jit(jax.vmap(functools.partial(step_lib.train_step, spec=run.model.spec, compute=run.compute,
                                              opt_spec=run.opt_spec), in_axes=(None, None, 0, None),
                            axis_name=parallel.AXIS))
    step(step_lib.init_state(run.init_rows, run.opt_spec), families.Frozen(None, None, None, None), batch,
         jax.random.PRNGKey(0))
    assert len(seen) == 1
    (time_ids, text_embeds), = seen
    np.testing.assert_array_equal(np.reshape(time_ids, (4, 6)), want[images])
    np.testing.assert_array_equal(np.reshape(text_embeds, (4, 16)), pooled)


def test_second_encoder_ids_are_tokenizer_2s_for_every_template(sdxl_run):
    model = sdxl_run.engine.run.model  # its tokenizers know the placeholder tokens
    spec, text = model.spec, tokens_lib.placeholder_text(TOKENS)
    pad_2 = model.tokenizer_2.convert_tokens_to_ids("!")
    assert model.tokenizer_2.pad_token_id == pad_2 != model.tokenizer.pad_token_id
    np.testing.assert_array_equal(sdxl_run.engine.run.data.template_ids,
                                  prompts.encode_templates(model.tokenizer, prompts.OBJECT_TEMPLATES, text))
    for templates in (prompts.OBJECT_TEMPLATES, prompts.STYLE_TEMPLATES):
        ids = prompts.encode_templates(model.tokenizer, templates, text)
        want = prompts.encode_templates(model.tokenizer_2, templates, text)
        assert ((ids >= BASE_VOCAB).sum(1) == 2).all() and (want == pad_2).any(1).all()
        np.testing.assert_array_equal(np.asarray(second_encoder_ids(spec, jnp.asarray(ids))), want)
    # A prompt of exactly 77 tokens has no padding: the same ids for both encoders.
    ids = prompts.encode_templates(model.tokenizer, ["a photo of {} " + " ".join(["red"] * 70)], text)
    assert ids[0, -1] == model.tokenizer.eos_token_id
    np.testing.assert_array_equal(np.asarray(second_encoder_ids(spec, jnp.asarray(ids))), ids)


# ---- interop: the run's files in PyTorch diffusers --------------------------------------------


@pytest.fixture(scope="module")
def torch_pipe(tiny_sdxl_model_dir):
    pytest.importorskip("torch")
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)


def card_code(torch_pipe, out):
    """The pipeline the run's README.md builds: its PyTorch diffusers code, run in the output folder
    (all but the line that samples an image). For SDXL it loads diffusers' pair, each file into
    its own text encoder and tokenizer."""
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    code = card.split("```python\n")[1].split("```")[0]
    assert "StableDiffusionXLPipeline" in code and "learned_embeds_2.safetensors" in code
    scope = {}
    with contextlib.chdir(out):
        exec("\n".join(line for line in code.splitlines() if not line.startswith("image = ")), scope)
    return scope["pipe"]


def single_file(torch_pipe, out):
    """The {clip_l, clip_g} file loaded as diffusers documents for SDXL: clip_g into text_encoder_2,
    clip_l into text_encoder."""
    from safetensors.torch import load_file as load_torch

    pipe = copy.deepcopy(torch_pipe)
    state = load_torch(os.path.join(out, "cat-toy.safetensors"))
    pipe.load_textual_inversion(state["clip_g"], token="<cat-toy>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state["clip_l"], token="<cat-toy>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    return pipe


@pytest.mark.parametrize("load", [card_code, single_file], ids=["model-card-code-pair", "clip_l-clip_g-file"])
def test_files_load_in_pytorch_diffusers_and_condition_as_ti_flax_does(load, sdxl_run, torch_pipe):
    import torch

    rows, out = sdxl_run.result.rows, sdxl_run.config.output_dir
    pipe = load(torch_pipe, out)
    for tokenizer, encoder, part in ((pipe.tokenizer, pipe.text_encoder, rows[:, :WIDTHS[0]]),
                                     (pipe.tokenizer_2, pipe.text_encoder_2, rows[:, WIDTHS[0]:])):
        assert tokenizer.convert_tokens_to_ids(TOKENS) == [BASE_VOCAB, BASE_VOCAB + 1]
        table = encoder.get_input_embeddings().weight.detach().numpy()
        np.testing.assert_array_equal(table[BASE_VOCAB:], part)  # the rows, exact
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt("a photo of <cat-toy>", device="cpu",
                                                      do_classifier_free_guidance=False)
    # ti_flax: the run's tokenization (both tokens spelled out, as diffusers expands the prompt).
    model = sdxl_run.engine.run.model
    ids = model.tokenizer("a photo of " + tokens_lib.placeholder_text(TOKENS), padding="max_length", max_length=77,
                          return_tensors="np").input_ids.astype(np.int32)
    # The ids ti_flax feeds encoder 1 are the pipeline's; encoder 2's differ in the padding only.
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        torch_ids = tokenizer(pipe.maybe_convert_prompt("a photo of <cat-toy>", tokenizer), padding="max_length",
                              max_length=77).input_ids
        np.testing.assert_array_equal(torch_ids, (ids if tokenizer is pipe.tokenizer else
                                                  np.asarray(second_encoder_ids(model.spec, ids)))[0])
    condition = jax.jit(functools.partial(families.of(model.spec).condition, model.spec, models.Compute()))
    cond = condition((model.params["text_encoder"], model.params["text_encoder_2"]), ids, rows)
    assert np.abs(np.asarray(cond.context) - want.numpy()).max() < 1e-4
    assert np.abs(np.asarray(cond.text_embeds) - want_pooled.numpy()).max() < 1e-4


# ---- starting from an embedding, and errors ---------------------------------------------------


def test_an_sd1_embedding_as_initial_embeddings_is_refused_in_one_line(tiny_sdxl_model_dir, sample_images_dir,
                                                                         tmp_path):
    # CLIP-L's width (32), so only the number of text encoders tells it from half an SDXL embedding.
    path = formats.save_diffusers(str(tmp_path / "sd1.safetensors"), "<cat-toy>", np.ones((2, WIDTHS[0]), np.float32))
    config = sdxl_config(tiny_sdxl_model_dir, sample_images_dir, tmp_path / "o", initializer_token=None,
                         initial_embeddings=path)
    with pytest.raises(UserError) as err:
        train(config, devices=ONE)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--initial_embeddings {path}: is an SD 1.x / 2.x embedding")
    assert "SDXL" in message and "clip_l/clip_g" in message
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("source", ["clip_l-clip_g-file", "diffusers-pair-folder"])
def test_an_sdxl_embedding_as_initial_embeddings_starts_the_rows(source, sdxl_run, tmp_path):
    out = sdxl_run.config.output_dir
    if source == "clip_l-clip_g-file":
        path, want = os.path.join(out, "cat-toy.safetensors"), sdxl_run.result.rows
    else:
        path, want = os.path.join(out, f"checkpoint-{MID}"), rows_at(sdxl_run, MID)
    config = sdxl_run.config.replace(output_dir=str(tmp_path / "o"), initializer_token=None, initial_embeddings=path)
    run = prepare(config, devices=ONE)
    assert run.init_rows.dtype == np.float32
    np.testing.assert_array_equal(run.init_rows, want)  # each row: the file's clip_l and clip_g side by side


def test_an_initializer_token_of_several_tokens_names_the_pieces(sdxl_run, tmp_path):
    pieces = sdxl_run.engine.run.model.tokenizer.tokenize("toycat")
    assert len(pieces) > 1
    config = sdxl_run.config.replace(output_dir=str(tmp_path / "o"), initializer_token="toycat")
    with pytest.raises(UserError) as err:
        prepare(config, devices=ONE)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--initializer_token 'toycat' must be a single token")
    assert str(pieces) in message
