"""Every registered embedding layout: written and read back bit for bit, listed once in the
registry, and a damaged or malformed file in it is one UserError line naming the file.

All tiny and fast; the exporter's and the trainer's use of these layouts is tested in
test_export.py and test_train.py.
"""

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from ti_flax import files, formats
from ti_flax.errors import UserError

TOKEN = "<cat-toy>"
NAME = "cat-toy"
WIDTH = 8  # the width of the text encoder in tests/fixtures/flax-pipeline-pt
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "flax-pipeline-pt")
TABLE_KEY = "text_model.embeddings.token_embedding.weight"

# Every (layout, extension) ti_flax writes.
WRITTEN = [(name, ext) for name in formats.names(writable=True) for ext in formats.get(name).extensions]


def make_rows(n=3, seed=0):
    # Full float32 mantissas, so any rounding on the way would show.
    return np.random.default_rng(seed).standard_normal((n, WIDTH)).astype(np.float32) / 3


def needs_torch(path):
    if not str(path).endswith(".safetensors"):
        pytest.importorskip("torch")


def one_line_error(read, path, *words):
    """`read()` must raise a UserError: one line, naming `path` and holding each of `words`."""
    with pytest.raises(UserError) as info:
        read()
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


# ---- the registry ------------------------------------------------------------------------------


def test_registry_lists_each_layout_once():
    names = formats.names()
    assert len(names) == len(set(names))
    assert set(names) == {"diffusers", "a1111", "kohya", "flax-npy", "npy", "pipeline", "tensor"}
    assert formats.names(writable=True) == ("diffusers", "a1111", "kohya")  # the exporter's order
    assert formats.names(writable=False) == ("flax-npy", "npy", "pipeline", "tensor")
    assert formats.get("comfyui") is formats.get("kohya")
    for name in names:
        layout = formats.get(name)
        assert layout.name == name and layout.description
        assert bool(layout.extensions) == layout.writable
    with pytest.raises(ValueError, match="twice"):
        formats.register(formats.Layout("kohya", "a second kohya"))
    with pytest.raises(ValueError, match="twice"):
        formats.register(formats.Layout("something-new", "an alias taken"), aliases=("comfyui",))
    assert "something-new" not in formats.names()


def test_embedding_parts_name_each_text_encoder():
    rows = make_rows()
    emb = formats.Embedding(TOKEN, rows, "diffusers")
    assert list(emb.parts) == ["text_encoder"] and emb.parts["text_encoder"] is rows
    assert (emb.num_vectors, emb.width) == (3, WIDTH)
    two = formats.Embedding(TOKEN, rows, "diffusers", more={"text_encoder_2": make_rows(3, seed=1)})
    assert list(two.parts) == ["text_encoder", "text_encoder_2"]


# ---- written layouts: write, then read -----------------------------------------------------------


@pytest.mark.parametrize("num_vectors", [1, 3])
@pytest.mark.parametrize("layout, ext", WRITTEN)
def test_written_layout_reads_back_bitwise(tmp_path, layout, ext, num_vectors):
    path = str(tmp_path / f"{NAME}{ext}")
    needs_torch(path)
    rows = make_rows(num_vectors)
    formats.write(path, layout, formats.Embedding(TOKEN, rows, "diffusers", step=7), name=NAME)
    back = formats.read_embedding(path)
    assert back.format == layout and back.path == path
    assert back.rows.dtype == np.float32 and back.rows.tobytes() == rows.tobytes()
    expected = formats.get(layout).token_on_reload(TOKEN, NAME)
    assert back.token == expected == {"diffusers": TOKEN, "a1111": NAME, "kohya": None}[layout]
    assert back.step == (7 if layout == "a1111" else None)  # only A1111 files keep the step
    formats.check_written(path, path, rows, expected)
    with pytest.raises(UserError, match="reading the written file back gave different rows or token"):
        formats.check_written(path, path, rows + 1, expected)


def test_trainer_files_read_back_bitwise(tmp_path):
    pytest.importorskip("torch")
    rows = make_rows()
    for path in (formats.save_diffusers(str(tmp_path / formats.DIFFUSERS_FILE), TOKEN, rows),
                 formats.save_diffusers_bin(str(tmp_path / formats.DIFFUSERS_BIN), TOKEN, rows)):
        back = formats.read_embedding(path)
        assert (back.token, back.format) == (TOKEN, "diffusers") and back.rows.tobytes() == rows.tobytes()
    assert formats.read_embedding(tmp_path).path == str(tmp_path / formats.DIFFUSERS_FILE)  # the folder
    token, back = formats.load_diffusers(str(tmp_path / formats.DIFFUSERS_FILE))
    assert token == TOKEN and back.tobytes() == rows.tobytes()
    assert sorted(os.listdir(tmp_path)) == [formats.DIFFUSERS_BIN, formats.DIFFUSERS_FILE]  # nothing left over


def test_step_comes_from_the_file_name(tmp_path):
    rows = make_rows()
    path = formats.save_diffusers(str(tmp_path / "learned_embeds-steps-40.safetensors"), TOKEN, rows)
    assert formats.read_embedding(path).step == 40
    folder = tmp_path / "checkpoint-500"
    formats.save_diffusers(str(folder / formats.DIFFUSERS_FILE), TOKEN, rows)
    assert formats.read_embedding(folder).step == 500


# ---- read-only layouts: written as the other tools write them -----------------------------------


def write_flax_npy(path, rows):
    # What diffusers' Flax script does with jnp.save: a dict pickled into a 0-d object array.
    np.save(path, {TOKEN: rows}, allow_pickle=True)


def write_tensor(path, rows):
    import torch

    torch.save(torch.from_numpy(rows.copy()), path)


def write_pipeline(folder, rows):
    """A pipeline folder holding the fixture's tokenizer with TOKEN, TOKEN_1, ... added and a text
    encoder table whose rows for them are `rows` (only what the reader looks at)."""
    from ti_flax import models, tokens

    tokenizer = models.load_tokenizer(os.path.join(FIXTURE, "tokenizer"))
    tokens.add_placeholder_tokens(tokenizer, tokens.placeholder_tokens(TOKEN, len(rows)))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    table = files.read_safetensors(os.path.join(FIXTURE, "text_encoder", "model.safetensors"), keys=[TABLE_KEY])[TABLE_KEY]
    os.makedirs(os.path.join(folder, "text_encoder"))
    save_file({TABLE_KEY: np.concatenate([table, rows])}, os.path.join(folder, "text_encoder", "model.safetensors"))


READ_ONLY = {
    # layout: (file name, writer, read_embedding arguments, the token read back)
    "flax-npy": ("learned_embeds.npy", write_flax_npy, dict(allow_pickle=True), TOKEN),
    "npy": ("rows.npy", np.save, {}, None),
    "tensor": ("rows.pt", write_tensor, {}, None),
    "pipeline": ("pipeline", write_pipeline, dict(token=TOKEN), TOKEN),
}


def test_every_read_only_layout_is_tested():
    assert set(READ_ONLY) == set(formats.names(writable=False))


@pytest.mark.parametrize("layout", sorted(READ_ONLY))
def test_read_only_layout_reads_bitwise(tmp_path, layout):
    filename, write, options, token = READ_ONLY[layout]
    path = str(tmp_path / filename)
    if layout == "tensor":
        needs_torch(path)
    rows = make_rows()
    write(path, rows)
    back = formats.read_embedding(path, **options)
    assert (back.format, back.token, back.path) == (layout, token, path)
    assert back.rows.dtype == np.float32 and back.rows.tobytes() == rows.tobytes()


def test_one_vector_saved_as_a_row_reads_as_one_by_width(tmp_path):
    row = make_rows(1)[0]
    np.save(tmp_path / "row.npy", row)
    assert formats.read_embedding(tmp_path / "row.npy").rows.shape == (1, WIDTH)


# ---- a bad file in each layout: one line naming the file ----------------------------------------


def truncated(layout, ext):
    def write(path):
        formats.write(path, layout, formats.Embedding(TOKEN, make_rows(), "diffusers"), name=NAME)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])

    return f"{layout}{ext}", write, {}, ()


def torch_file(content):
    def write(path):
        import torch

        torch.save(content(torch), path)

    return write


BAD = [
    *[truncated(layout, ext) for layout, ext in WRITTEN],
    ("diffusers.safetensors", lambda p: save_file({TOKEN: np.ones((2, WIDTH), np.int32)}, p), {}, ("dtype int32",)),
    ("two.safetensors", lambda p: save_file({TOKEN: make_rows(), "<dog>": make_rows()}, p), {}, ("2 entries",)),
    ("a1111.pt", torch_file(lambda t: {"string_to_param": {"*": t.ones(1, WIDTH), "+": t.ones(1, WIDTH)}, "name": NAME}),
     {}, ("exactly one tensor in string_to_param",)),
    ("kohya.safetensors", lambda p: save_file({"emb_params": np.full((1, WIDTH), np.nan, np.float32)}, p), {},
     ("NaN or Inf",)),
    ("sdxl.safetensors", lambda p: save_file({"clip_l": make_rows(), "clip_g": make_rows()}, p), {}, ("SDXL",)),
    ("flax.npy", lambda p: write_flax_npy(p, make_rows()), {}, ("--allow-pickle",)),
    ("list.npy", lambda p: np.save(p, np.array([[1.0], "x"], dtype=object), allow_pickle=True),
     dict(allow_pickle=True), ("not a {token: row} dict",)),
    ("ints.npy", lambda p: np.save(p, np.ones((2, WIDTH), np.int64)), {}, ("dtype int64",)),
    ("cube.pt", torch_file(lambda t: t.ones(2, 2, WIDTH)), {}, ("shape [2, 2, 8]",)),
    ("rows.txt", lambda p: open(p, "w").close(), {}, ("unknown embedding file type .txt",)),
    ("pipeline", lambda p: write_pipeline(p, make_rows()), dict(token="<dog>"), ("not a token added",)),
    ("no-tokens", lambda p: shutil.copytree(FIXTURE, p), {}, ("pass --token", "added tokens there: none")),
]


@pytest.mark.parametrize("filename, write, options, words", BAD, ids=[case[0] for case in BAD])
def test_bad_file_is_one_line_naming_it(tmp_path, filename, write, options, words):
    path = str(tmp_path / filename)
    needs_torch(path if not filename.startswith(("pipeline", "no-tokens")) else "x.safetensors")
    write(path)
    one_line_error(lambda: formats.read_embedding(path, **options), path, *words)


def test_missing_and_empty_sources_name_the_path(tmp_path):
    one_line_error(lambda: formats.read_embedding(tmp_path / "nothing.safetensors"), tmp_path / "nothing.safetensors",
                   "no such embedding file or folder")
    one_line_error(lambda: formats.read_embedding(tmp_path), tmp_path, "no embedding found")


def test_rows_to_write_are_checked():
    with pytest.raises(UserError, match="shape"):
        formats.save_diffusers("unused.safetensors", TOKEN, np.ones(WIDTH, np.float32))
    with pytest.raises(UserError, match="NaN or Inf"):
        formats.save_diffusers("unused.safetensors", TOKEN, np.full((1, WIDTH), np.inf, np.float32))
