"""FLUX.1 textual inversion end to end on the tiny FLUX.1 folders (tests/conftest.py's tiny_flux_dirs).

One module-scoped [dev] run (4 devices, 2 vectors, a checkpoint mid-run, validation images at
the end) is checked many ways: the rows of both encoders move, the files hold them as ComfyUI,
OneTrainer and diffusers read them, PyTorch's FluxPipeline loads the pair (each id its row) and
encodes a prompt as we do, a resume from the checkpoint writes the same bytes, and generate with
the files draws the validation's images. The sampling loop is compared with FluxPipeline's on
the same noise. One more run switches on the loss recipe (Huber, EMA, norm control, validation
loss) and a [schnell] run checks its shorter T5 context; refusals cost no compile.
"""

import copy
import functools
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from ti_flax import TrainConfig, families, models, train
from ti_flax import tokens as tokens_lib
from ti_flax.commands import generate as gen
from ti_flax.data import prompts
from ti_flax.data.batches import blank_batch
from ti_flax.families import Frozen
from ti_flax.errors import UserError
from ti_flax.models import flux
from ti_flax.sampling import sampler
from ti_flax.training import checkpoint, step as step_lib

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

pytestmark = pytest.mark.slow

FOUR = jax.local_devices()[:4]
STEPS, MID = 4, 2
WIDTHS = (64, 32)  # the tiny CLIP-L's and T5's widths
TOKENS = ["<cat-toy>", "<cat-toy>_1"]
PROMPT = "a photo of <cat-toy>"
SAMPLING_STEPS = 2
OUTPUT_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors", "cat-toy.safetensors")


def flux_config(model_dir, data_dir, out, **changes):
    base = dict(num_vectors=2, max_train_steps=STEPS, checkpointing_steps=MID, validation_prompt=PROMPT,
                validation_steps=STEPS, validation_num_inference_steps=SAMPLING_STEPS, num_validation_images=2,
                validation_resolution=32, report_to="none")
    return TrainConfig.tiny(model_dir, data_dir, str(out), **{**base, **changes})


@pytest.fixture(scope="module")
def dev(tiny_flux_dirs):
    return tiny_flux_dirs["dev"]


@pytest.fixture(scope="module")
def model(dev):
    return families.load_model(dev)


@pytest.fixture(scope="module")
def flux_run(dev, sample_images_dir, tmp_path_factory, traces):
    """(config, TrainResult, validation events, the step's traces) of the reference [dev] run."""
    config = flux_config(dev, sample_images_dir, tmp_path_factory.mktemp("flux-run"))
    events, before = [], traces["train_step"]
    result = train(config, callbacks=[events.append], devices=FOUR)
    return config, result, [e for e in events if e["kind"] == "validation"], traces["train_step"] - before


@pytest.fixture(scope="module")
def pipe(dev):
    """PyTorch diffusers' FluxPipeline of the [dev] folder (fresh per module; tests copy what they grow)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_pngs(paths):
    return np.stack([np.asarray(Image.open(p)) for p in paths])


# ---- the run and its files ---------------------------------------------------------------------


def test_both_encoders_rows_are_learned_and_written(flux_run, model):
    config, result, validations, traces = flux_run
    assert result.tokens == TOKENS and result.rows.shape == (2, sum(WIDTHS))
    assert [r["step"] for r in result.history] == list(range(1, STEPS + 1))
    assert traces <= 1  # one compiled step for every update (0: another test compiled it already)
    assert all(np.isfinite(r["loss"]) for r in result.history)
    tables = families.of(model.spec).token_tables(model.params)
    for table, init_id, rows in zip(tables, (model.tokenizer.encode("toy", add_special_tokens=False)[0],
                                             model.tokenizer_2.encode("toy", add_special_tokens=False)[0]),
                                    tokens_lib.split_rows(result.rows, WIDTHS)):
        start = np.asarray(table[init_id], np.float32)
        assert np.abs(rows - start).max() > 1e-3  # each encoder's part moved from its initializer's row
    assert {"diffusers", "diffusers_2", "flux"} <= set(result.files)
    clip_rows, t5_rows = tokens_lib.split_rows(result.rows, WIDTHS)
    pair = load_file(result.files["diffusers"]), load_file(result.files["diffusers_2"])
    np.testing.assert_array_equal(pair[0]["<cat-toy>"], clip_rows)
    np.testing.assert_array_equal(pair[1]["<cat-toy>"], t5_rows)
    single = load_file(result.files["flux"])
    assert os.path.basename(result.files["flux"]) == "cat-toy.safetensors"
    assert set(single) == {"clip_l", "t5xxl", "t5"}
    np.testing.assert_array_equal(single["clip_l"], clip_rows)
    np.testing.assert_array_equal(single["t5xxl"], t5_rows)
    np.testing.assert_array_equal(single["t5"], t5_rows)  # OneTrainer's key for the same rows
    card = open(os.path.join(config.output_dir, "README.md")).read()
    assert "FluxPipeline" in card and "embedding:cat-toy" in card


def comfyui_rows(path, key, width):
    """ComfyUI's choice of an embedding file's rows for one text encoder (comfy/sd1_clip.py
    load_embed): the entry under the encoder's key, else the file's first tensor; dropped (None)
    where its width is not the encoder's ("shape mismatch ... 768 != 4096")."""
    data = load_file(path)
    rows = data[key] if key in data else next(iter(data.values()))
    return rows if rows.shape[-1] == width else None


def test_comfyui_reads_each_encoders_rows_from_our_file(flux_run, tmp_path):
    _, result, _, _ = flux_run
    clip_rows, t5_rows = tokens_lib.split_rows(result.rows, WIDTHS)
    np.testing.assert_array_equal(comfyui_rows(result.files["flux"], "clip_l", WIDTHS[0]), clip_rows)
    np.testing.assert_array_equal(comfyui_rows(result.files["flux"], "t5xxl", WIDTHS[1]), t5_rows)
    # A file with the T5 rows under OneTrainer's key alone loses them in ComfyUI (OneTrainer#514):
    # why ours carries t5xxl too.
    from safetensors.numpy import save_file

    onetrainer = str(tmp_path / "onetrainer.safetensors")
    save_file({"clip_l": clip_rows, "t5": t5_rows}, onetrainer)
    assert comfyui_rows(onetrainer, "t5xxl", WIDTHS[1]) is None


def test_diffusers_flux_pipeline_loads_the_pair_and_encodes_as_we_do(flux_run, model, pipe):
    """One load_textual_inversion per encoder (the model card's code): each id reads its row
    exactly, and FluxPipeline.encode_prompt gives our T5 context and pooled CLIP output."""
    _, result, _, _ = flux_run
    clip_rows, t5_rows = tokens_lib.split_rows(result.rows, WIDTHS)
    encoders = {name: copy.deepcopy(getattr(pipe, name)) for name in ("text_encoder", "tokenizer", "text_encoder_2",
                                                                       "tokenizer_2")}
    view = type(pipe)(**{**pipe.components, **encoders})
    bases = (len(view.tokenizer), len(view.tokenizer_2))
    assert bases == (model.spec.base_vocab_size, model.spec.base_vocab_size_2)
    view.load_textual_inversion(result.files["diffusers"], text_encoder=view.text_encoder, tokenizer=view.tokenizer)
    view.load_textual_inversion(result.files["diffusers_2"], text_encoder=view.text_encoder_2,
                                tokenizer=view.tokenizer_2)
    for tokenizer, encoder, base, rows in ((view.tokenizer, view.text_encoder, bases[0], clip_rows),
                                           (view.tokenizer_2, view.text_encoder_2, bases[1], t5_rows)):
        ids = tokenizer.convert_tokens_to_ids(TOKENS)
        assert ids == [base, base + 1]
        table = encoder.get_input_embeddings().weight.detach().numpy()
        np.testing.assert_array_equal(table[ids], rows)
    length = families.of(model.spec).prompt_length(model.spec) - 77
    with torch.no_grad():
        embeds, pooled, _ = view.encode_prompt(PROMPT, PROMPT, device="cpu", max_sequence_length=length)
    tokenizers = tuple(copy.deepcopy(t) for t in model.tokenizers)
    tokens_lib.add_to_tokenizers(tokenizers, TOKENS)
    ids = prompts.encode_prompt(tokenizers, PROMPT, [TOKENS], overflow=prompts.CUT)[None]
    frozen = families.Frozen.from_model(model)
    family = families.of(model.spec)
    cond = family.condition(model.spec, sampler.models.Compute(), frozen.text_params, ids, result.rows)
    # CLIP's pooled output within 1e-5; T5's context within 3e-5: its outputs reach ~3 here, and
    # over 512 tokens float32 leaves PyTorch and us each ~1.5e-5 from a float64 evaluation of the
    # same model (measured; 2.2e-5 apart with transformers 4's extra "▁" pieces), so a bound of
    # 1e-5 would test the rounding, not the port.
    np.testing.assert_allclose(np.asarray(cond.context), embeds.numpy(), atol=3e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cond.text_embeds), pooled.numpy(), atol=1e-5, rtol=0)
    # The learned rows reach both outputs: the initializer's in their place give others.
    other = family.condition(model.spec, sampler.models.Compute(), frozen.text_params, ids, result.rows * 0)
    assert np.abs(np.asarray(other.context) - embeds.numpy()).max() > 1e-3
    assert np.abs(np.asarray(other.text_embeds) - pooled.numpy()).max() > 1e-3


def test_export_writes_and_verifies_flux_files(flux_run, dev, tmp_path):
    """export from the output folder: the {clip_l, t5xxl, t5} file and diffusers' pair, each
    loaded by PyTorch's FluxPipeline (one load_textual_inversion per encoder) and checked against
    our encoders (--verify)."""
    from ti_flax import export

    _, result, _, _ = flux_run
    lines = []
    written = export(result.output_dir, str(tmp_path / "cat-toy.safetensors"), format="flux", verify=dev,
                     log=lines.append)
    assert written == [str(tmp_path / "cat-toy.safetensors")]
    for key, part in zip(("clip_l", "t5xxl"), tokens_lib.split_rows(result.rows, WIDTHS)):
        np.testing.assert_array_equal(load_file(written[0])[key], part)
    pair = export(result.files["flux"], str(tmp_path / "pair"), format="diffusers-sdxl", token="<cat-toy>",
                  verify=dev, log=lines.append)
    assert [os.path.basename(p) for p in pair] == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    verified = [line for line in lines if line.startswith("verified")]
    assert len(verified) == 2 and all("ids [49408, 49409]" in line for line in verified), lines


def test_resume_from_the_mid_run_checkpoint_writes_the_same_files(flux_run, tmp_path, traces):
    config, result, _, _ = flux_run
    assert [s for s, _ in checkpoint.list_checkpoints(config.output_dir)] == [MID, STEPS]
    half = tmp_path / "half"
    shutil.copytree(os.path.join(config.output_dir, f"checkpoint-{MID}"), half / f"checkpoint-{MID}")
    before = traces["train_step"]
    resumed = train(config.replace(output_dir=str(half), resume_from_checkpoint="latest", validation_prompt=None),
                    devices=FOUR)
    assert [r["step"] for r in resumed.history] == list(range(MID + 1, STEPS + 1))
    assert traces["train_step"] == before  # the reference's compiled step, reused
    for name in OUTPUT_FILES:
        with open(half / name, "rb") as a, open(os.path.join(config.output_dir, name), "rb") as b:
            assert a.read() == b.read(), name


# ---- sampling ----------------------------------------------------------------------------------


def test_the_sampling_loop_is_flux_pipelines(model, pipe):
    """Our flow-matching Euler loop ([dev]: dynamic shift, embedded guidance 3.5) from the same
    noise gives FluxPipeline's latents, and the whole program (noise from the seed, loop, VAE
    decode with its shift, uint8) its images, learned rows in the prompt."""
    rows = np.random.default_rng(0).normal(size=(2, sum(WIDTHS))).astype(np.float32) * 0.1
    clip_rows, t5_rows = tokens_lib.split_rows(rows, WIDTHS)
    view = type(pipe)(**{**pipe.components, **{n: copy.deepcopy(getattr(pipe, n)) for n in (
        "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}})
    view.load_textual_inversion({"<t>": torch.from_numpy(clip_rows)}, text_encoder=view.text_encoder,
                                tokenizer=view.tokenizer)
    view.load_textual_inversion({"<t>": torch.from_numpy(t5_rows)}, text_encoder=view.text_encoder_2,
                                tokenizer=view.tokenizer_2)
    tokenizers = tuple(copy.deepcopy(t) for t in model.tokenizers)
    tokens_lib.add_to_tokenizers(tokenizers, ["<t>", "<t>_1"])
    prompt = "a photo of <t> on a table"
    ids = np.stack([prompts.encode_prompt(tokenizers, prompt, [["<t>", "<t>_1"]], overflow=prompts.CUT)] * 2)
    s = sampler.Sampler.from_model(model, num_images=2, num_inference_steps=SAMPLING_STEPS, guidance_scale=3.5,
                                   height=32, width=32, devices=FOUR)
    assert s.settings.scheduler == "euler"
    assert families.of(model.spec).default_size(model.spec) == (256, 256)  # FluxPipeline's: 128 x the VAE's 2
    key = jax.random.key_data(jax.random.key(5))
    noise = np.array(sampler.image_noise(key, np.arange(2), sampler.latent_shape(s.settings)))
    denoise = jax.jit(functools.partial(sampler.denoise, settings=s.settings))
    latents = np.asarray(denoise(families.Frozen.from_model(model), rows, ids, ids, noise, np.float32(3.5)))
    h, w = noise.shape[2:]

    def reference(i, output_type="latent"):
        packed = torch.from_numpy(np.asarray(flux.pack_latents(noise[i : i + 1])))
        return view(prompt, num_inference_steps=SAMPLING_STEPS, guidance_scale=3.5, latents=packed, height=32,
                    width=32, max_sequence_length=ids.shape[1] - 77, output_type=output_type).images

    for i in range(2):
        theirs = np.asarray(flux.unpack_latents(reference(i).numpy(), h, w))
        np.testing.assert_allclose(latents[i : i + 1], theirs, rtol=1e-4, atol=1e-4)
    images = s.sample(rows, ids, ids, seed=5)
    for i in range(2):
        assert np.abs(images[i].astype(int) - (reference(i, "np")[0] * 255).round()).max() <= 1


def test_generate_with_the_files_draws_the_validation_images(dev, flux_run, tmp_path, traces):
    """diffusers' pair and the {clip_l, t5xxl} file load the final rows; generate with the
    validation's settings ([dev]'s guidance 3.5, no negative prompt) draws its images, with the
    program the validation compiled."""
    _, result, validations, _ = flux_run
    assert [v["step"] for v in validations] == [STEPS]
    before = traces["sample_step"]
    drawn = []
    for name, embeddings in (("pair", [result.files["diffusers"]]), ("single", [result.files["flux"] + ":<cat-toy>"])):
        paths = gen.generate(dev, PROMPT, embeddings, num_images=2, steps=SAMPLING_STEPS, seed=0, height=32,
                             width=32, output_dir=str(tmp_path / name), devices=FOUR)
        drawn.append(read_pngs(paths))
    assert traces["sample_step"] == before
    np.testing.assert_array_equal(drawn[0], drawn[1])
    np.testing.assert_array_equal(drawn[0], read_pngs(validations[0]["images"]))
    assert "CFG scale: 3.5" in Image.open(os.path.join(tmp_path, "pair", "000.png")).text["parameters"]


# ---- the loss recipe, [schnell], refusals -------------------------------------------------------


def test_the_loss_recipe_applies_to_flux_and_text_encoders_picks_t5(dev, sample_images_dir, tmp_path, model,
                                                                     monkeypatch):
    """Huber on an exponential schedule, kohya's shifted sigmoid draws, EMA, norm control and the
    validation loss together, training T5's rows only (--text_encoders t5xxl): the run trains, the
    T5 part moves and keeps its norm, the CLIP-L part is the initializer's row, bit for bit, in
    the file (the EMA and the norm control leave it alone too). The validation loss embeds the
    training's --guidance_scale."""
    made = []
    losses = step_lib.pmapped_validation_losses
    monkeypatch.setattr(step_lib, "pmapped_validation_losses", lambda *a: made.append(a[3:]) or losses(*a))
    config = flux_config(dev, sample_images_dir, tmp_path / "recipe", checkpointing_steps=0, validation_prompt=None,
                         max_train_steps=3, loss_type="huber", huber_schedule="exponential", huber_c=0.2,
                         timestep_sampling="shift", discrete_flow_shift=3.1582, use_ema=True, ema_decay=0.5,
                         embedding_norm="preserve", validation_loss_steps=3, text_encoders="t5xxl",
                         guidance_scale=2.5)
    result = train(config, devices=FOUR)
    assert made == [(2.5,)]
    assert all(np.isfinite(r["loss"]) for r in result.history)
    assert [v["step"] for v in result.validation_losses] == [3] and np.isfinite(result.validation_losses[0]["loss"])
    tables = families.of(model.spec).token_tables(model.params)
    (clip_part, t5_part), (clip_start, t5_start) = tokens_lib.split_rows(result.rows, WIDTHS), [
        np.asarray(table[tokenizer.encode("toy", add_special_tokens=False)[0]], np.float32)
        for table, tokenizer in zip(tables, (model.tokenizer, model.tokenizer_2))]
    np.testing.assert_array_equal(clip_part, np.stack([clip_start] * 2))
    np.testing.assert_array_equal(load_file(result.files["flux"])["clip_l"], clip_part)
    assert np.abs(t5_part - t5_start).max() > 1e-3
    # Each update sets the T5 part's norm to its table's median; the rows written are their EMA,
    # an average of such vectors, a little shorter (6e-5 relative here).
    median = np.median(np.linalg.norm(np.asarray(tables[1], np.float32), axis=-1))
    np.testing.assert_allclose(np.linalg.norm(t5_part, axis=-1), median, rtol=1e-3)


def test_the_validation_loss_depends_on_the_embedded_guidance(model):
    # What the test above wires through would be inert if [dev]'s loss ignored the guidance.
    spec, compute = model.spec, models.Compute()
    frozen, rows = Frozen.from_model(model), np.zeros((1, sum(WIDTHS)), np.float32)
    batch = blank_batch(2, 32, families.of(spec).prompt_length(spec))
    batch = batch._replace(pixel_values=np.random.default_rng(0).integers(0, 256, batch.pixel_values.shape, np.uint8))
    loss = jax.jit(step_lib.validation_losses, static_argnames=("spec", "compute", "guidance"))
    each = [np.asarray(loss(rows, frozen, batch, np.array([300, 700], np.int32), jax.random.PRNGKey(0), spec=spec,
                            compute=compute, guidance=g)) for g in (None, 1.0, 3.5)]
    np.testing.assert_array_equal(each[0], each[1])  # None: [dev]'s training default, 1.0
    assert np.abs(each[2] - each[1]).max() > 1e-6


def test_schnell_reads_256_t5_tokens_and_refuses_guidance(tiny_flux_dirs, sample_images_dir, tmp_path):
    schnell = families.load_model(tiny_flux_dirs["schnell"])
    family = families.of(schnell.spec)
    assert family.prompt_length(schnell.spec) == 77 + 256 and schnell.tokenizer_2.model_max_length == 256
    assert family.sampling_defaults(schnell.spec) == (4, 0.0)
    out = tmp_path / "schnell"
    config = flux_config(tiny_flux_dirs["schnell"], sample_images_dir, out, guidance_scale=3.5)
    with pytest.raises(UserError, match=r"^--guidance_scale 3.5: FLUX.1 \[schnell\] embeds no guidance"):
        train(config, devices=FOUR)
    assert not out.exists()


@pytest.mark.parametrize("changes, message", [
    (dict(snr_gamma=5.0), "--snr_gamma applies to the Stable Diffusion models; FLUX.1 is trained with rectified flow"),
    (dict(prediction_type="v_prediction"), "--prediction_type applies to the Stable Diffusion models"),
    (dict(loss_type="huber", huber_schedule="snr"), "--huber_schedule snr follows a DDPM schedule's SNR"),
])
def test_ddpm_flags_are_refused_for_flux(dev, sample_images_dir, tmp_path, changes, message, capsys):
    out = tmp_path / "o"
    with pytest.raises(UserError, match="^" + message.replace("[", r"\[")) as err:
        train(flux_config(dev, sample_images_dir, out, **changes), devices=FOUR)
    assert "\n" not in str(err.value) and not out.exists()


def test_flow_flags_are_refused_for_stable_diffusion(tiny_model_dir, sample_images_dir, tmp_path):
    out = tmp_path / "o"
    config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(out), timestep_sampling="shift")
    with pytest.raises(UserError, match=r"^--timestep_sampling applies to rectified-flow models \(FLUX.1\); this "
                                        r"model is SD 1.x, trained with a DDPM schedule"):
        train(config, devices=FOUR)
    assert not out.exists()


def test_generate_refuses_a_negative_prompt_for_flux(dev, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["--pretrained_model_name_or_path", dev, "--prompt", "a cat", "--negative_prompt", "blurry",
            "--output_dir", str(out)]
    assert gen.main(argv) == 2
    assert capsys.readouterr().err == ("error: --negative_prompt: FLUX.1 samples without one (it is "
                                       "guidance-distilled); drop it\n")
    assert not out.exists()
