"""SDXL through the paths SD 1.x takes: SIGTERM and resume, two processes, --concepts, captions,
--initial_embeddings from an A1111 / ComfyUI file, and --save_as_full_pipeline from a single file.

One SDXL run (the `whole` fixture: 2 devices, the command line's flags) is the reference for both
the stopped-and-resumed run and the two-process run; their subprocesses find its compiled step in
the session's compilation cache. The --concepts run compiles its own step; the other checks load
the model only (captions, initial embeddings, the pipeline written from a single file).
"""

import copy
import json
import os
import signal
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_captions import write_folder
from test_checkpoint import cli_args, wait_for
from test_checkpoint import finish as finish_one
from test_multihost import finish, free_port, start_workers, worker_args

from ti_flax import TrainConfig, families, models, train
from ti_flax.training import checkpoint, outputs
from ti_flax.config.cli import parse_config
from ti_flax.errors import UserError
from ti_flax.training.run import initial_state, prepare
from ti_flax.families.sdxl import second_encoder_ids

pytestmark = pytest.mark.slow

TWO, ONE = jax.local_devices()[:2], jax.local_devices()[:1]
STEPS = 24  # the reference's updates (the tiny step runs several a second: a signal arrives well before the end)
MID = 4  # the reference's checkpoint that the two-process run is compared with
TOKENS = ["<cat-toy>", "<cat-toy>_1"]
WIDTHS = (32, 48)  # the tiny SDXL model's CLIP-L-like and bigG-like text encoders
BASE_VOCAB = 49408
OUTPUT_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors", "cat-toy.safetensors")


def sdxl_args(model_dir, data_dir, out, *extra, steps=STEPS):
    """The command line of an SDXL run on the tiny model (tests/test_checkpoint.py's flags). Its
    constant learning rate makes the rows independent of --max_train_steps, and the compiled step too."""
    return cli_args(model_dir, data_dir, out, steps, "--checkpointing_steps", "0", *extra)


def counted_train(config, traces, devices):
    before = traces["train_step"]
    result = train(config, devices=devices)
    return types.SimpleNamespace(config=config, result=result, traces=traces["train_step"] - before)


@pytest.fixture(scope="module")
def whole(tiny_sdxl_model_dir, sample_images_dir, tmp_path_factory, traces):
    """The uninterrupted run: STEPS updates on 2 devices x batch 1, float32, from the flags; a checkpoint at MID."""
    out = tmp_path_factory.mktemp("whole")
    config = parse_config(sdxl_args(tiny_sdxl_model_dir, sample_images_dir, out, "--checkpointing_steps", str(MID)))
    return counted_train(config, traces, TWO)


def file_bytes(folder, name):
    with open(os.path.join(folder, name), "rb") as f:
        return f.read()


# ---- SIGTERM: a checkpoint, the documented exit status, a resume equal to the whole run ------


def test_sigterm_checkpoints_and_resume_is_bitwise_the_uninterrupted_run(whole, tiny_sdxl_model_dir,
                                                                         sample_images_dir, tmp_path, traces):
    out = tmp_path / "stopped"
    args = sdxl_args(tiny_sdxl_model_dir, sample_images_dir, out, steps=100000)
    (proc,) = start_workers([[sys.executable, "-m", "ti_flax.train", *args]], devices=len(TWO))
    metrics = out / "logs" / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
        proc.send_signal(signal.SIGTERM)
    finally:
        output = finish_one(proc)
    assert proc.returncode == 128 + signal.SIGTERM, output  # the README's 128+signal
    assert "--resume_from_checkpoint latest" in output
    (stopped, path), = checkpoint.list_checkpoints(str(out))
    assert 2 <= stopped < STEPS, output
    assert checkpoint.read_meta(path)["text_widths"] == list(WIDTHS)
    assert not os.path.exists(out / OUTPUT_FILES[0])  # stopped: no final embedding yet
    resume = sdxl_args(tiny_sdxl_model_dir, sample_images_dir, out, "--resume_from_checkpoint", "latest")
    resumed = counted_train(parse_config(resume), traces, TWO)
    assert [r["step"] for r in resumed.result.history] == list(range(stopped + 1, STEPS + 1))
    assert whole.traces == 1 and resumed.traces == 0  # the whole run's compiled step, reused
    for name in OUTPUT_FILES:  # both encoders' rows, in every layout the run writes
        assert file_bytes(out, name) == file_bytes(whole.config.output_dir, name), name


# ---- two processes x 1 device == 1 process x 2 devices -------------------------------------


def test_two_processes_train_the_rows_of_one_process_with_two_devices(whole, tiny_sdxl_model_dir, sample_images_dir,
                                                                       tmp_path):
    port = free_port()
    outs = [tmp_path / "out0", tmp_path / "out1"]
    procs = start_workers([worker_args(tiny_sdxl_model_dir, sample_images_dir, outs[i], port, i, steps=MID,
                                       checkpointing=0) for i in range(2)], devices=1)
    printed = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], printed
    assert "2 (1 local x 2 process(es)" in printed[0] and "SDXL" in printed[0]
    assert not outs[1].exists()  # only process 0 writes
    pair_1, pair_2 = (load_file(str(outs[0] / name))["<cat-toy>"] for name in OUTPUT_FILES[:2])
    single = load_file(str(outs[0] / OUTPUT_FILES[2]))
    rows = load_file(os.path.join(whole.config.output_dir, f"checkpoint-{MID}", checkpoint.STATE_FILE))[".rows"]
    np.testing.assert_allclose(pair_1, rows[:, :WIDTHS[0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(pair_2, rows[:, WIDTHS[0]:], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(single["clip_l"], pair_1)
    np.testing.assert_array_equal(single["clip_g"], pair_2)


# ---- --concepts: each concept's files in both SDXL layouts, loaded by PyTorch diffusers -------

CONCEPTS = [
    {"placeholder_token": "<cat-toy>", "initializer_token": "toy", "train_data_dir": "toys", "num_vectors": 2},
    {"placeholder_token": "<odd-style>", "initializer_token": "painting", "train_data_dir": "odd",
     "learnable_property": "style", "weight": 2},
]


@pytest.fixture(scope="module")
def concepts_run(tiny_sdxl_model_dir, sample_images_dir, user_images_dir, tmp_path_factory, traces):
    """Two concepts (2 + 1 vectors) from a JSON file, 2 updates on 1 device."""
    folder = tmp_path_factory.mktemp("sdxl-concepts")
    folders = {"toys": sample_images_dir, "odd": user_images_dir}
    path = folder / "concepts.json"
    path.write_text(json.dumps({"concepts": [dict(c, train_data_dir=folders[c["train_data_dir"]]) for c in CONCEPTS]}))
    config = TrainConfig.tiny(tiny_sdxl_model_dir, "", str(folder / "out"), concepts=str(path), placeholder_token="",
                              initializer_token="", max_train_steps=2, checkpointing_steps=2)
    return counted_train(config, traces, ONE)


@pytest.fixture(scope="module")
def torch_pipe(tiny_sdxl_model_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir, local_files_only=True)


def test_each_concept_gets_both_sdxl_layouts(concepts_run):
    result, out = concepts_run.result, concepts_run.config.output_dir
    assert result.tokens == ["<cat-toy>", "<cat-toy>_1", "<odd-style>"] and result.rows.shape == (3, sum(WIDTHS))
    assert concepts_run.traces == 1
    for token, name, rows in (("<cat-toy>", "cat-toy", result.rows[:2]), ("<odd-style>", "odd-style", result.rows[2:])):
        for folder in (os.path.join(out, token), os.path.join(out, "checkpoint-2", token)):
            assert sorted(os.listdir(folder)) == sorted(["learned_embeds.safetensors", "learned_embeds_2.safetensors",
                                                         f"{name}.safetensors"]), folder
            pair_1, pair_2 = (load_file(os.path.join(folder, f)) for f in OUTPUT_FILES[:2])
            single = load_file(os.path.join(folder, f"{name}.safetensors"))
            np.testing.assert_array_equal(pair_1[token], rows[:, :WIDTHS[0]])
            np.testing.assert_array_equal(pair_2[token], rows[:, WIDTHS[0]:])
            assert list(pair_1) == list(pair_2) == [token] and sorted(single) == ["clip_g", "clip_l"]
            np.testing.assert_array_equal(single["clip_l"], rows[:, :WIDTHS[0]])
            np.testing.assert_array_equal(single["clip_g"], rows[:, WIDTHS[0]:])
    assert not os.path.exists(os.path.join(out, OUTPUT_FILES[0]))  # no file mixing the two concepts


def pair_loader(pipe, folder, token):
    """diffusers' documented SDXL load: the first file into text_encoder, the second into text_encoder_2."""
    pipe.load_textual_inversion(os.path.join(folder, OUTPUT_FILES[0]), text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(os.path.join(folder, OUTPUT_FILES[1]), text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


def single_file_loader(pipe, folder, token):
    """The {clip_l, clip_g} file, each tensor into its text encoder under the concept's token."""
    from safetensors.torch import load_file as load_torch

    (name,) = [f for f in os.listdir(folder) if f not in OUTPUT_FILES[:2]]
    state = load_torch(os.path.join(folder, name))
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


@pytest.mark.parametrize("load", [pair_loader, single_file_loader], ids=["diffusers-pair", "clip_l-clip_g-file"])
def test_each_concept_loads_in_pytorch_diffusers_to_the_learned_rows(load, concepts_run, torch_pipe):
    result, out = concepts_run.result, concepts_run.config.output_dir
    pipe = copy.deepcopy(torch_pipe)
    for token in ("<cat-toy>", "<odd-style>"):
        load(pipe, os.path.join(out, token), token)
    ids = [BASE_VOCAB, BASE_VOCAB + 1, BASE_VOCAB + 2]
    for tokenizer, encoder, part in ((pipe.tokenizer, pipe.text_encoder, result.rows[:, :WIDTHS[0]]),
                                     (pipe.tokenizer_2, pipe.text_encoder_2, result.rows[:, WIDTHS[0]:])):
        assert tokenizer.convert_tokens_to_ids(result.tokens) == ids
        prompt = pipe.maybe_convert_prompt("a photo of <cat-toy> in the style of <odd-style>", tokenizer)
        assert [i for i in tokenizer(prompt).input_ids if i >= BASE_VOCAB] == ids  # each token expanded
        table = encoder.get_input_embeddings().weight.detach().numpy()
        np.testing.assert_array_equal(table[BASE_VOCAB:], part)  # each id reads its learned row


# ---- captions: both encoders see the expanded caption, as diffusers' encode_prompt does ------

CAPTIONS = {"toy_0": "a photo of <cat-toy> on a wooden table", "toy_2": "a close-up of <cat-toy>, bright light"}
BANG = "<cat-toy> at the beach!"  # toy_3's caption: "!" is also tokenizer_2's padding token


def load_rows(pipe, rows, token="<cat-toy>"):
    """Rows [N, D1 + D2] into a diffusers SDXL pipeline, as its two documented load_textual_inversion calls do."""
    import torch

    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for part, encoder, tokenizer in zip(np.split(rows, [width], axis=1), (pipe.text_encoder, pipe.text_encoder_2),
                                        (pipe.tokenizer, pipe.tokenizer_2)):
        pipe.load_textual_inversion(torch.from_numpy(np.ascontiguousarray(part)), token=token, text_encoder=encoder,
                                    tokenizer=tokenizer)
    return pipe


def test_captions_reach_both_encoders_as_diffusers_encodes_them(tiny_sdxl_model_dir, sample_images_dir, tmp_path,
                                                                 torch_pipe):
    import torch

    folder = write_folder(tmp_path / "images", sample_images_dir, {**CAPTIONS, "toy_3": BANG})
    config = TrainConfig.tiny(tiny_sdxl_model_dir, folder, str(tmp_path / "out"), num_vectors=2,
                              caption_extension=".txt")
    run = prepare(config, devices=ONE)
    spec = run.model.spec
    # The prompt of each captioned image in the batches the step gets (one epoch of them).
    seen, batches = {}, run.data.batches(0, 0, 1, 1)
    for _ in range(run.data.steps_per_epoch):
        batch = next(batches)
        (image,) = [i for i, im in enumerate(run.data.images)
                    if (batch.pixel_values[0, 0] == im).all() or (batch.pixel_values[0, 0] == im[:, ::-1]).all()]
        seen.setdefault(image, batch.input_ids[0, 0])
    assert {0, 2, 3} <= set(seen)
    ids = np.stack([seen[0], seen[2]])
    texts = [CAPTIONS["toy_0"], CAPTIONS["toy_2"]]
    pipe = load_rows(copy.deepcopy(torch_pipe), run.init_rows)

    def pair_ids(tokenizer, text):
        return tokenizer(pipe.maybe_convert_prompt(text, tokenizer), padding="max_length", max_length=77).input_ids

    ids_2 = second_encoder_ids(spec, jnp.asarray(ids))
    for tokenizer, got in ((pipe.tokenizer, ids), (pipe.tokenizer_2, ids_2)):
        # The placeholder expanded in both; "!" (id 0) padding in the second.
        np.testing.assert_array_equal(np.asarray(got), pair_ids(tokenizer, texts))
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(texts, device="cpu", do_classifier_free_guidance=False)
    cond = jax.jit(lambda ids, rows: families.of(spec).condition(spec, models.Compute(), (
        run.model.params["text_encoder"], run.model.params["text_encoder_2"]), ids, rows))(ids, run.init_rows)
    assert np.abs(np.asarray(cond.context) - context.numpy()).max() < 1e-4
    assert np.abs(np.asarray(cond.text_embeds) - pooled.numpy()).max() < 1e-4
    # A "!" in the text: the second encoder reads it as OpenCLIP, which SDXL was trained with
    # (and A1111 / ComfyUI), tokenizes it, "!</w>" (id 256), with id 0 only after the end of text.
    # diffusers' tokenizer_2 splits out every "!" as its pad token, id 0: there the two differ.
    first, second = seen[3], np.asarray(second_encoder_ids(spec, jnp.asarray(seen[3])))
    np.testing.assert_array_equal(first, pair_ids(pipe.tokenizer, BANG))
    end = list(first).index(spec.eos_token_id)
    np.testing.assert_array_equal(second, np.concatenate([first[:end + 1], np.zeros(76 - end, np.int32)]))
    bang = pipe.tokenizer.convert_tokens_to_ids("!</w>")
    assert bang == 256 and list(second).count(bang) == 1
    diffusers_2 = np.asarray(pair_ids(pipe.tokenizer_2, BANG))
    assert list(np.flatnonzero(diffusers_2 != second)) == [list(second).index(bang)]


# ---- --initial_embeddings: an A1111 / ComfyUI {clip_l, clip_g} file --------------------------


def a1111_file(path, **tensors):
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return str(path)


def test_an_a1111_sdxl_file_starts_both_encoders_rows(tiny_sdxl_model_dir, sample_images_dir, tmp_path):
    rng = np.random.default_rng(5)
    clip_l, clip_g = rng.standard_normal((2, WIDTHS[0])), rng.standard_normal((2, WIDTHS[1]))
    path = a1111_file(tmp_path / "cat-toy.safetensors", clip_g=clip_g, clip_l=clip_l)
    config = TrainConfig.tiny(tiny_sdxl_model_dir, sample_images_dir, str(tmp_path / "o"), num_vectors=2,
                              initializer_token=None, initial_embeddings=path)
    state, start, _ = initial_state(prepare(config, devices=ONE))  # what the first step is given
    assert start == 0
    np.testing.assert_array_equal(state.rows[:, :WIDTHS[0]], clip_l.astype(np.float32))
    np.testing.assert_array_equal(state.rows[:, WIDTHS[0]:], clip_g.astype(np.float32))


@pytest.mark.parametrize("tensors, says", [
    ({"clip_l": (2, 32)}, "this file only clip_l"),
    ({"clip_g": (2, 48)}, "this file only clip_g"),
    ({"clip_l": (2, 48), "clip_g": (2, 32)}, "width is 48 but"),  # the two swapped
    ({"clip_l": (2, 768), "clip_g": (2, 1280)}, "width is 768 but"),  # SDXL base's, for another model
], ids=["clip_l-only", "clip_g-only", "swapped", "other-model"])
def test_an_sdxl_file_that_does_not_fit_is_one_line_naming_it(tensors, says, tiny_sdxl_model_dir, sample_images_dir,
                                                               tmp_path):
    path = a1111_file(tmp_path / "emb.safetensors", **{k: np.ones(shape) for k, shape in tensors.items()})
    config = TrainConfig.tiny(tiny_sdxl_model_dir, sample_images_dir, str(tmp_path / "o"), num_vectors=2,
                              initializer_token=None, initial_embeddings=path)
    with pytest.raises(UserError) as err:
        train(config, devices=ONE)
    message = str(err.value)
    assert "\n" not in message and path in message and says in message, message
    assert not os.path.exists(tmp_path / "o")


# ---- --save_as_full_pipeline from an SDXL single file ----------------------------------------


def test_a_pipeline_saved_from_an_sdxl_single_file_loads_in_pytorch_diffusers(tiny_sdxl_single_file,
                                                                              sample_images_dir, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    folder, path = tiny_sdxl_single_file
    out = tmp_path / "out"
    config = TrainConfig.tiny(path, sample_images_dir, str(out), num_vectors=2, save_as_full_pipeline=True)
    run = prepare(config, devices=ONE)
    widths = run.model.spec.text_widths
    rows = np.random.default_rng(7).standard_normal((2, sum(widths))).astype(np.float32)
    assert outputs.save_outputs(run, rows, [{"step": 1, "loss": 0.5}])["pipeline"] == str(out)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out), local_files_only=True)
    base = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)  # the file's folder
    vocab = len(base.tokenizer)
    for suffix, part in zip(("", "_2"), np.split(rows, [widths[0]], axis=1)):
        tokenizer, encoder = getattr(pipe, "tokenizer" + suffix), getattr(pipe, "text_encoder" + suffix)
        assert tokenizer.convert_tokens_to_ids(TOKENS) == [vocab, vocab + 1]
        table = encoder.get_input_embeddings().weight.detach().numpy()
        np.testing.assert_array_equal(table[vocab:], part)
        np.testing.assert_array_equal(table[:vocab], getattr(base, "text_encoder" + suffix)
                                      .get_input_embeddings().weight.detach().numpy())
    assert pipe.tokenizer_2.pad_token == "!"
    # The saved pipeline conditions as the file's model with the rows loaded diffusers' way.
    load_rows(base, rows)
    with torch.no_grad():
        got = pipe.encode_prompt("a photo of <cat-toy>", device="cpu", do_classifier_free_guidance=False)
        want = base.encode_prompt("a photo of <cat-toy>", device="cpu", do_classifier_free_guidance=False)
    for a, b in zip(got, want):
        if a is not None:
            np.testing.assert_array_equal(a.numpy(), b.numpy())
