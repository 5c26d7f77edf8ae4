"""Caption files (--caption_extension): each image's own prompt reaches the step, checked at start-up.

The quick tests use the real CLIP tokenizer and small numpy data; the ones that take the tiny
model (marked slow by conftest) check the batches `prepare` builds for training, the one-line
errors of the command line, and a bitwise resume of a captioned run.
"""

import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest
from PIL import Image
from test_cli import run_error

from ti_flax import TrainConfig, UserError, train
from ti_flax.data import captions, batches as data, prompts
from ti_flax.training import checkpoint
from ti_flax.data.images import load_image_set
from ti_flax.training.run import prepare

TOKENS = ["<cat-toy>", "<cat-toy>_1"]
ONE_DEVICE = jax.local_devices()[:1]
CAPTIONS = {"toy_0": "a photo of <cat-toy> on a wooden table", "toy_2": "a close-up of <cat-toy>, bright light"}


def padded(tokenizer, text):
    """The tokenizer's own encoding of `text`, padded as the text encoder reads it."""
    return np.asarray(tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length).input_ids, np.int32)


def expanded(text):
    return text.replace("<cat-toy>", " ".join(TOKENS))


@pytest.fixture
def tokenizer(clip_tokenizer):
    clip_tokenizer.add_tokens(TOKENS)
    return clip_tokenizer


def write_folder(folder, sample_images_dir, texts):
    """The sample images (toy_0..toy_3) and a caption file per entry of `texts` (stem -> text)."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(sample_images_dir):
        shutil.copy(os.path.join(sample_images_dir, name), folder)
    for stem, text in texts.items():
        with open(os.path.join(folder, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return str(folder)


# ---- encoding one caption -------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, same_as",
    [
        ("a photo of <cat-toy> on a wooden table", None),
        ("a photo of<cat-toy>, on a table", "a photo of<cat-toy> <cat-toy>_1, on a table"),  # glued to punctuation
        ("A Photo of <CAT-TOY>", "a photo of <cat-toy> <cat-toy>_1"),  # CLIP lower-cases, the token too
        ("a photo of <cat-toy> <cat-toy>_1", "a photo of <cat-toy> <cat-toy>_1"),  # already spelled out: kept
        ("<cat-toy> on a table,\nat night\n", None),
    ],
)
def test_caption_ids_are_the_tokenizers_encoding_of_the_expanded_caption(tokenizer, caption, same_as):
    ids = prompts.encode_prompt(tokenizer, caption, [TOKENS], overflow=prompts.too_long("caption", TOKENS))
    want = same_as or expanded(caption)
    if tokenizer.convert_tokens_to_ids(TOKENS[0]) not in tokenizer(caption).input_ids:
        # transformers 4's CLIPTokenizer matches added tokens case-sensitively, before it lower-cases
        # the rest (5's lower-cases first): there "<CAT-TOY>" is plain text, for diffusers as for us.
        want = caption
    np.testing.assert_array_equal(ids, padded(tokenizer, want))
    assert ids.dtype == np.int32 and ids.shape == (77,)


def test_a_caption_without_the_placeholder_is_an_error_or_gets_it_in_front(tokenizer):
    texts = [("d/1.txt", "a photo of a toy on a table"), None]
    with pytest.raises(UserError, match=r"caption file d/1.txt does not contain the placeholder <cat-toy>.*--caption_prefix_token"):
        captions.tokenize_captions(tokenizer, texts, TOKENS)
    ids, none = captions.tokenize_captions(tokenizer, texts, TOKENS, prefix_token=True)
    np.testing.assert_array_equal(ids, padded(tokenizer, "<cat-toy> <cat-toy>_1, a photo of a toy on a table"))
    assert none is None


def test_a_caption_that_does_not_fit_names_the_file_and_its_length(tokenizer):
    long = "a photo of <cat-toy> " + "on a wooden table " * 18  # 3 + 2 + 72 words + BOS/EOS = 79
    with pytest.raises(UserError) as err:
        captions.tokenize_captions(tokenizer, [("d/1.txt", long)], TOKENS)
    message = str(err.value)
    assert message.startswith("caption file d/1.txt is 79 tokens with <cat-toy> as 2 vectors") and "77" in message
    assert "\n" not in message and "--num_vectors" in message
    # 77 tokens fit; the placeholder put in front counts too.
    fits = "a photo of <cat-toy> " + "on a wooden table " * 17 + "x y"
    ids = prompts.encode_prompt(tokenizer, fits, [TOKENS], overflow=prompts.too_long("x", TOKENS))
    assert ids[-1] == tokenizer.eos_token_id
    with pytest.raises(UserError, match="with <cat-toy> in front is 78 tokens"):
        captions.tokenize_captions(tokenizer, [("d/1.txt", fits.replace("<cat-toy> ", ""))], TOKENS, prefix_token=True)


# ---- reading caption files ------------------------------------------------------------------


def test_read_captions(tmp_path):
    names = ["a.png", "b.jpg", "c.png"]
    (tmp_path / "a.txt").write_bytes("\ufeffa photo of <cat-toy>\n".encode("utf-8"))  # a BOM, as Notepad writes
    (tmp_path / "c.txt").write_text("  two\nlines  ")
    got = captions.read_captions(str(tmp_path), names, ".txt")
    assert got == [(str(tmp_path / "a.txt"), "a photo of <cat-toy>"), None, (str(tmp_path / "c.txt"), "two\nlines")]


@pytest.mark.parametrize(
    "content, expected",
    [(b"  \n\t", "c.txt is empty"), (b"\xff\xfe a photo", "c.txt is not UTF-8 text"), (None, "no image in")],
)
def test_unreadable_captions_name_the_file(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "c.txt").write_bytes(content)
    with pytest.raises(UserError, match=expected) as err:
        captions.read_captions(str(tmp_path), ["a.png", "c.png"], ".txt")
    assert "\n" not in str(err.value)


def test_caption_files_are_not_warned_about_but_orphans_are(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a photo of <cat-toy>")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image_set(str(tmp_path), 8, False, "nearest", caption_extension=".txt")
    (tmp_path / "typo.txt").write_text("a photo of <cat-toy>")
    with pytest.warns(UserWarning, match="typo.txt") as record:
        load_image_set(str(tmp_path), 8, False, "nearest", caption_extension=".txt")
    assert "a.txt" not in str(record[0].message)


# ---- the iterator ---------------------------------------------------------------------------


def small_data(with_captions=True, seed=0, g=3):
    """5 images (image i's pixels all 10*i), 4 templates [i, i], captions for images 1 and 3."""
    images = np.stack([np.full((2, 2, 3), 10 * i, np.uint8) for i in range(5)])
    templates = np.repeat(np.arange(4, dtype=np.int32)[:, None], 2, axis=1)
    caps = [None, np.array([101, 1], np.int32), None, np.array([103, 3], np.int32), None] if with_captions else None
    return data.TrainData(images, templates, 4, 0.5, seed, g, caps)


def test_captions_replace_the_template_of_captioned_images_only():
    with_caps, without = small_data(), small_data(with_captions=False)
    assert with_caps.num_captioned == 2 and without.num_captioned == 0
    for step in range(2 * with_caps.steps_per_epoch):
        a, b = with_caps.global_batch(step), without.global_batch(step)
        np.testing.assert_array_equal(a.pixel_values, b.pixel_values)  # the same draws
        np.testing.assert_array_equal(a.example_ids, b.example_ids)
        image = a.pixel_values[:, 0, 0, 0] // 10
        for i, ids, template in zip(image, a.input_ids, b.input_ids):
            want = {1: [101, 1], 3: [103, 3]}.get(int(i), template)
            np.testing.assert_array_equal(ids, want)


def test_captioned_batches_are_a_function_of_seed_and_step():
    it = small_data(seed=5).batches(0)
    uninterrupted = [next(it) for _ in range(13)]
    for step in (0, 6, 12):  # a fresh object, nothing carried over but the step
        for value, want in zip(small_data(seed=5).local_batch(step, 0, 1, 1), uninterrupted[step]):
            np.testing.assert_array_equal(value, want)
    other = small_data(seed=6)
    assert any(not np.array_equal(other.global_batch(s).input_ids, uninterrupted[s].input_ids[0]) for s in range(13))
    # Several hosts: the shares of a global batch concatenate to it.
    d = small_data(g=4)
    for step in (0, 3, 7):
        shares = [d.local_batch(step, p, 2, 2).input_ids.reshape(-1, 2) for p in range(2)]
        np.testing.assert_array_equal(np.concatenate(shares), d.global_batch(step).input_ids)


def test_cached_latents_keep_the_captions():
    d = small_data()
    moments = np.zeros((5, 2, 4, 1, 1), np.float32)
    cached = data.LatentViews(moments, moments)
    for step in range(d.steps_per_epoch):
        np.testing.assert_array_equal(d.global_batch(step, cached).input_ids, d.global_batch(step).input_ids)


# ---- flags and checkpoints ------------------------------------------------------------------


def test_caption_prefix_token_without_captions_is_an_error(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--output_dir", str(out),
            "--placeholder_token", "<cat-toy>", "--initializer_token", "toy", "--caption_prefix_token"]
    assert "--caption_prefix_token needs --caption_extension" in run_error(capsys, args, out)
    err = run_error(capsys, args[:-1] + ["--caption_extension", "txt"], out)
    assert "--caption_extension must be a file extension starting with a dot" in err


def test_checkpoints_from_before_captions_still_resume():
    config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", placeholder_token="<t>",
                         initializer_token="toy")
    now = checkpoint.run_meta(config, ["<t>"], [49408], "abc", 4, 4)
    old = json.loads(json.dumps(now))
    del old["captions"], old["config"]["caption_extension"], old["config"]["caption_prefix_token"]
    checkpoint.check_compatible(old, now, "ckpt")
    captioned = checkpoint.run_meta(config.replace(caption_extension=".txt"), ["<t>"], [49408], "abc", 4, 4,
                                    [np.ones(77, np.int32), None, None, None])
    with pytest.raises(UserError, match=r"--caption_extension \(None vs .txt\)"):
        checkpoint.check_compatible(old, captioned, "ckpt")


# ---- with the tiny model --------------------------------------------------------------------


def tiny(model_dir, data_dir, out, **changes):
    return TrainConfig.tiny(model_dir, data_dir, str(out), **{
        "num_vectors": 2, "caption_extension": ".txt", "report_to": "none", **changes})


def which_image(images, pixels):
    hits = [i for i, im in enumerate(images) if (pixels == im).all() or (pixels == im[:, ::-1]).all()]
    assert len(hits) == 1
    return hits[0]


def test_prompt_ids_reaching_the_step(tiny_model_dir, sample_images_dir, tmp_path):
    texts = {**CAPTIONS, "toy_3": "a toy on the floor"}  # toy_3 without the placeholder: put in front
    folder = write_folder(tmp_path / "images", sample_images_dir, texts)
    run = prepare(tiny(tiny_model_dir, folder, tmp_path / "out", caption_prefix_token=True), devices=ONE_DEVICE)
    assert run.data.num_captioned == 3 and not os.path.exists(tmp_path / "out")
    tok = run.model.tokenizer
    want = {0: padded(tok, expanded(CAPTIONS["toy_0"])), 2: padded(tok, expanded(CAPTIONS["toy_2"])),
            3: padded(tok, "<cat-toy> <cat-toy>_1, a toy on the floor")}
    templates = {tuple(padded(tok, t.format(" ".join(TOKENS)))) for t in prompts.OBJECT_TEMPLATES}
    # The batches the train loop feeds the step, one epoch of them: toy_1 alone uses the templates.
    batches = run.data.batches(0, 0, 1, 1)
    seen = set()
    for _ in range(run.data.steps_per_epoch):
        batch = next(batches)
        image = which_image(run.data.images, batch.pixel_values[0, 0])
        ids = batch.input_ids[0, 0]
        assert ids.dtype == np.int32
        if image in want:
            np.testing.assert_array_equal(ids, want[image])
        else:
            assert tuple(ids) in templates
        seen.add(image)
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "texts, extra, expected",
    [
        ({"toy_0": "a photo of a toy"}, [], "toy_0.txt does not contain the placeholder <cat-toy>"),
        ({"toy_0": " \n"}, [], "toy_0.txt is empty"),
        ({"toy_0": "a photo of <cat-toy> " + "on a wooden table " * 18}, [], "toy_0.txt is 79 tokens"),
        ({}, [], "--caption_extension .txt: no image in"),
        (CAPTIONS, ["--num_vectors", "72"], "(72 placeholder tokens) is 81 tokens, more than the text encoder's 77"),
        (CAPTIONS, ["--validation_prompt", "a <cat-toy> on a " + "wooden table " * 37], "--validation_prompt is 81 tokens"),
    ],
)
def test_start_up_errors_are_one_line(texts, extra, expected, tiny_model_dir, sample_images_dir, tmp_path, capsys):
    folder = write_folder(tmp_path / "images", sample_images_dir, texts)
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", tiny_model_dir, "--train_data_dir", folder, "--output_dir", str(out),
            "--placeholder_token", "<cat-toy>", "--initializer_token", "toy", "--resolution", "32",
            "--train_batch_size", "1", "--num_vectors", "2", "--caption_extension", ".txt", *extra]
    err = run_error(capsys, args, out)
    assert expected in err and len(err) <= 300, err


def test_resume_with_captions_is_bitwise_identical(tiny_model_dir, sample_images_dir, tmp_path):
    folder = write_folder(tmp_path / "images", sample_images_dir, CAPTIONS)
    whole = tiny(tiny_model_dir, folder, tmp_path / "whole", max_train_steps=4, checkpointing_steps=2)
    run = prepare(whole, devices=ONE_DEVICE)
    shown = [which_image(run.data.images, run.data.global_batch(s).pixel_values[0]) for s in range(4)]
    assert {0, 2} & set(shown[2:]), shown  # the resumed steps do show a captioned image
    train(whole, devices=ONE_DEVICE)
    out = tmp_path / "resumed"
    shutil.copytree(os.path.join(whole.output_dir, "checkpoint-2"), out / "checkpoint-2")
    resumed = whole.replace(output_dir=str(out), resume_from_checkpoint="latest")
    result = train(resumed, devices=ONE_DEVICE)
    assert [r["step"] for r in result.history] == [3, 4]
    name = "learned_embeds.safetensors"
    assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # Other captions would make another run: each refused by name, before anything is written.
    edited = write_folder(tmp_path / "edited", sample_images_dir, {**CAPTIONS, "toy_2": "a dark photo of <cat-toy>"})
    # (--caption_extension switched off: test_checkpoints_from_before_captions_still_resume.)
    refused = [({"train_data_dir": edited}, "caption files' contents"),
               ({"caption_prefix_token": True}, "--caption_prefix_token")]
    for i, (changes, named) in enumerate(refused):
        fresh = tmp_path / f"refused-{i}"
        shutil.copytree(out / "checkpoint-2", fresh / "checkpoint-2")
        with pytest.raises(UserError, match=named):
            train(resumed.replace(output_dir=str(fresh), **changes), devices=ONE_DEVICE)
        assert os.listdir(fresh) == ["checkpoint-2"]
