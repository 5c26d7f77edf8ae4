"""Every registered embedding layout: written and read back bit for bit, listed once in the
registry, and a damaged or malformed file in it is one UserError line naming the file.

All tiny and fast; the exporter's and the trainer's use of these layouts is tested in
test_export.py and test_train.py.
"""

import dataclasses
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from ti_flax import families, files, formats
from ti_flax.errors import UserError

TOKEN = "<cat-toy>"
NAME = "cat-toy"
WIDTH = 8  # the width of the text encoder in tests/fixtures/flax-pipeline-pt
WIDTH_2 = 12  # an SDXL embedding's second text encoder (clip_g): any width other than WIDTH
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "flax-pipeline-pt")
TABLE_KEY = "text_model.embeddings.token_embedding.weight"

# Every (layout, extension) ti_flax writes.
WRITTEN = [(name, ext) for name in formats.names(writable=True) for ext in formats.get(name).extensions]


def make_rows(n=3, seed=0, width=WIDTH):
    # Full float32 mantissas, so any rounding on the way would show.
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32) / 3


def make_embedding(layout, n=3, step=None):
    """An embedding for `layout`: SDXL's two text encoders' rows for an SDXL layout, else one."""
    more = {"text_encoder_2": make_rows(n, seed=1, width=WIDTH_2)} if formats.get(layout).text_encoders == 2 else {}
    return formats.Embedding(TOKEN, make_rows(n), "diffusers", step=step, more=more)


def file_name(layout, ext):
    # diffusers' SDXL pair is named by diffusers; every other layout takes any name.
    return f"learned_embeds{ext}" if layout == "diffusers-sdxl" else f"{NAME}{ext}"


def same_parts(a, b):
    """Whether two embeddings hold the same text encoders' rows, bit for bit, as float32."""
    return a.parts.keys() == b.parts.keys() and all(
        a.parts[k].dtype == np.float32 and a.parts[k].tobytes() == b.parts[k].tobytes() for k in a.parts
    )


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
    assert set(names) == {"diffusers", "a1111", "kohya", "sdxl", "diffusers-sdxl", "flux", "flax-npy", "npy",
                          "pipeline", "tensor"}
    # the exporter's order
    assert formats.names(writable=True) == ("diffusers", "a1111", "kohya", "sdxl", "diffusers-sdxl", "flux")
    assert formats.names(writable=False) == ("flax-npy", "npy", "pipeline", "tensor")
    assert formats.names(writable=True, text_encoders=2) == ("sdxl", "diffusers-sdxl", "flux")
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
    path = str(tmp_path / file_name(layout, ext))
    needs_torch(path)
    emb = make_embedding(layout, num_vectors, step=7)
    formats.write(path, layout, emb, name=NAME)
    back = formats.read_embedding(path)
    assert back.format == layout and back.path == path
    assert same_parts(back, emb)
    expected = formats.get(layout).token_on_reload(TOKEN, NAME)
    tokens = {"diffusers": TOKEN, "a1111": NAME, "kohya": None, "sdxl": None, "diffusers-sdxl": TOKEN,
              "flux": None}
    assert back.token == expected == tokens[layout]
    assert back.step == (7 if layout == "a1111" else None)  # only A1111 files keep the step
    formats.check_written(path, path, emb, expected)
    if len(emb.parts) == 1:
        formats.check_written(path, path, emb.rows, expected)  # the rows alone, as before
    with pytest.raises(UserError, match="reading the written file back gave different rows or token"):
        formats.check_written(path, path, formats.Embedding(TOKEN, emb.rows + 1, "diffusers", more=emb.more), expected)


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
        formats.write(path, layout, make_embedding(layout), name=NAME)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])

    # diffusers' SDXL pair: the first file truncated, the second intact beside it.
    return file_name(layout, ext) if layout == "diffusers-sdxl" else f"{layout}{ext}", write, {}, ()


def torch_file(content):
    def write(path):
        import torch

        torch.save(content(torch), path)

    return write


def sdxl_file(clip_l=None, clip_g=None, **extra):
    """A writer of a safetensors file holding the given entries (None leaves one out)."""
    entries = {k: v for k, v in (("clip_l", clip_l), ("clip_g", clip_g)) if v is not None}
    return lambda path: save_file({**entries, **extra}, path)


def pair(rows, rows_2, token=TOKEN, token_2=TOKEN, second=None):
    """A writer of diffusers' SDXL pair into the folder `path`; `second(path_2)` replaces the
    second file's writer."""
    def write(path):
        os.makedirs(path)
        save_file({token: rows}, os.path.join(path, formats.DIFFUSERS_FILE))
        path_2 = os.path.join(path, formats.PAIR_FILE_2)
        second(path_2) if second else save_file({token_2: rows_2}, path_2)

    return write


def nan_rows(n=3, width=WIDTH_2):
    rows = make_rows(n, width=width)
    rows[1, 2] = np.nan
    return rows


SDXL_BAD = [
    ("counts.safetensors", sdxl_file(make_rows(2), make_rows(3, width=WIDTH_2)), {},
     ("clip_l has 2 vectors but clip_g has 3",)),
    ("only-l.safetensors", sdxl_file(clip_l=make_rows()), {}, ("both text encoders", "only clip_l")),
    ("only-g.safetensors", sdxl_file(clip_g=make_rows(width=WIDTH_2)), {}, ("only clip_g",)),
    ("extra.safetensors", sdxl_file(make_rows(), make_rows(width=WIDTH_2), emb_params=make_rows()), {},
     ("clip_l and clip_g only", "'emb_params'")),
    ("nan.safetensors", sdxl_file(make_rows(), nan_rows()), {}, ("(clip_g)", "1 NaN or Inf")),
    ("ints.safetensors", sdxl_file(make_rows(), np.ones((3, WIDTH_2), np.int32)), {}, ("dtype int32",)),
    ("counts.pt", torch_file(lambda t: {"clip_l": t.ones(2, WIDTH), "clip_g": t.ones(3, WIDTH_2)}), {}, ("has 3",)),
    # A folder with learned_embeds.safetensors and learned_embeds_2.safetensors: diffusers' SDXL pair.
    ("pair-counts", pair(make_rows(2), make_rows(3, width=WIDTH_2)), {},
     ("learned_embeds.safetensors: learned_embeds.safetensors has 2 vectors but learned_embeds_2.safetensors has 3",)),
    ("pair-tokens", pair(make_rows(), make_rows(width=WIDTH_2), token_2="<dog>"), {},
     ("token '<cat-toy>'", "'<dog>'", "move the file")),
    ("pair-kohya", pair(make_rows(), None, second=lambda p: save_file({"emb_params": make_rows()}, p)),
     {}, ("learned_embeds_2.safetensors: holds a kohya embedding", "half of diffusers' SDXL pair")),
    ("pair-nan", pair(make_rows(), nan_rows()), {}, ("learned_embeds_2.safetensors: embedding holds 1 NaN or Inf",)),
]

BAD = [
    *[truncated(layout, ext) for layout, ext in WRITTEN],
    ("diffusers.safetensors", lambda p: save_file({TOKEN: np.ones((2, WIDTH), np.int32)}, p), {}, ("dtype int32",)),
    ("two.safetensors", lambda p: save_file({TOKEN: make_rows(), "<dog>": make_rows()}, p), {}, ("2 entries",)),
    ("a1111.pt", torch_file(lambda t: {"string_to_param": {"*": t.ones(1, WIDTH), "+": t.ones(1, WIDTH)}, "name": NAME}),
     {}, ("exactly one tensor in string_to_param",)),
    ("kohya.safetensors", lambda p: save_file({"emb_params": np.full((1, WIDTH), np.nan, np.float32)}, p), {},
     ("NaN or Inf",)),
    *SDXL_BAD,
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
    needs_torch(path if not filename.startswith(("pipeline", "no-tokens", "pair")) else "x.safetensors")
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


# ---- SDXL: two text encoders' rows ---------------------------------------------------------------


def sdxl_embedding(n=3, token=TOKEN):
    return formats.Embedding(token, make_rows(n), "sdxl", more={"text_encoder_2": make_rows(n, seed=1, width=WIDTH_2)})


def test_sdxl_file_holds_what_a1111_comfyui_and_kohya_read(tmp_path):
    """The keys and dtypes the other tools look up: A1111 takes a dict with both clip_g and clip_l,
    ComfyUI picks `clip_l` for SDXL's first text encoder and `clip_g` for the second, kohya's
    loader reads the same two keys; all as float32 [N, D] (kohya writes float32 unless told)."""
    from safetensors import safe_open

    emb = sdxl_embedding(2)
    path = formats.save_sdxl(str(tmp_path / f"{NAME}.safetensors"), emb.rows, emb.more["text_encoder_2"])
    with safe_open(path, "numpy") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.metadata() == {"format": "pt"}
        assert f.get_slice("clip_l").get_dtype() == f.get_slice("clip_g").get_dtype() == "F32"
        assert f.get_tensor("clip_l").tobytes() == emb.rows.tobytes()
        assert f.get_tensor("clip_g").tobytes() == emb.more["text_encoder_2"].tobytes()
    torch = pytest.importorskip("torch")
    pt = str(tmp_path / f"{NAME}.pt")
    formats.write(pt, "sdxl", emb)
    data = torch.load(pt, weights_only=True)
    assert type(data) is dict and list(data) == ["clip_l", "clip_g"]
    assert all(t.dtype == torch.float32 for t in data.values())
    assert data["clip_l"].shape == (2, WIDTH) and data["clip_g"].shape == (2, WIDTH_2)
    assert same_parts(formats.read_embedding(pt), emb)


def test_sdxl_files_as_other_tools_write_them(tmp_path):
    """kohya saves in its --save_precision (float16 here) or with torch.save; either reads as float32."""
    rows, rows_2 = make_rows(2), make_rows(2, seed=1, width=WIDTH_2)
    save_file({"clip_g": rows_2.astype(np.float16), "clip_l": rows.astype(np.float16)}, str(tmp_path / "half.safetensors"))
    emb = formats.read_embedding(tmp_path / "half.safetensors")
    assert (emb.format, emb.token, emb.shape_text(), len(emb.parts)) == ("sdxl", None, f"2 x {WIDTH} + {WIDTH_2}", 2)
    assert emb.rows.dtype == np.float32 and np.array_equal(emb.rows, rows.astype(np.float16).astype(np.float32))
    torch = pytest.importorskip("torch")
    torch.save({"clip_l": torch.from_numpy(rows[0]), "clip_g": torch.from_numpy(rows_2[0])}, tmp_path / "one.pt")
    one = formats.read_embedding(tmp_path / "one.pt")  # one vector saved as [D]: [1, D] per encoder
    assert one.parts["text_encoder"].shape == (1, WIDTH) and one.parts["text_encoder_2"].shape == (1, WIDTH_2)


def test_diffusers_pair_reads_from_its_folder_or_either_file(tmp_path):
    emb = sdxl_embedding(3)
    folder = tmp_path / "sdxl-out"
    first, second = formats.save_diffusers_sdxl(
        str(folder / "learned_embeds-steps-40.safetensors"), TOKEN, emb.rows, emb.more["text_encoder_2"])
    assert os.path.basename(second) == "learned_embeds_2-steps-40.safetensors"
    for source in (first, second):
        back = formats.read_embedding(source)
        assert (back.format, back.token, back.path, back.step) == ("diffusers-sdxl", TOKEN, first, 40)
        assert same_parts(back, emb)
    final = formats.save_diffusers_sdxl(str(folder / formats.DIFFUSERS_FILE), TOKEN, emb.rows, emb.more["text_encoder_2"])
    assert formats.read_embedding(folder).path == final[0]  # the folder: its final pair
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in (first, second, *final))  # no temporary files


def test_learned_embeds_without_a_partner_stays_one_text_encoder(tmp_path):
    rows = make_rows()
    formats.save_diffusers(str(tmp_path / formats.DIFFUSERS_FILE), TOKEN, rows)
    for source in (tmp_path, tmp_path / formats.DIFFUSERS_FILE):
        back = formats.read_embedding(source)
        assert (back.format, len(back.parts)) == ("diffusers", 1) and back.rows.tobytes() == rows.tobytes()
    alone = formats.save_diffusers(str(tmp_path / "second" / formats.PAIR_FILE_2), TOKEN, make_rows(width=WIDTH_2))
    assert formats.read_embedding(alone).shape_text() == f"3 x {WIDTH_2}"  # the second file alone: one encoder


def test_sdxl_writers_refuse_bad_rows_and_write_nothing(tmp_path):
    rows = make_rows(2)
    with pytest.raises(UserError, match="NaN or Inf"):
        formats.save_sdxl(str(tmp_path / "a.safetensors"), rows, nan_rows(2))
    with pytest.raises(UserError, match="the first text encoder has 2 vectors but the second has 3"):
        formats.save_sdxl(str(tmp_path / "a.safetensors"), rows, make_rows(3, width=WIDTH_2))
    with pytest.raises(UserError, match="the first text encoder has 2 vectors but the second has 3"):
        formats.save_diffusers_sdxl(str(tmp_path / formats.DIFFUSERS_FILE), TOKEN, rows, make_rows(3, width=WIDTH_2))
    one_line_error(lambda: formats.save_diffusers_sdxl(str(tmp_path / "cat.safetensors"), TOKEN, rows, rows),
                   tmp_path / "cat.safetensors", "learned_embeds.safetensors and learned_embeds_2.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("step", [None, 40])
def test_sdxl_save_embedding_writes_each_half_of_a_runs_rows(tmp_path, step):
    # A run's rows are [N, D1 + D2], each row the CLIP-L and the bigG row side by side; every file
    # must hold every row's own half (each half is a strided view of the rows until written).
    rows = np.concatenate([make_rows(3), make_rows(3, seed=1, width=WIDTH_2)], axis=1)
    written = families.get("sdxl").save_embedding(str(tmp_path), TOKEN, rows, (WIDTH, WIDTH_2), step=step, bin=True)
    assert sorted(written) == ["diffusers", "diffusers_2", "diffusers_2_bin", "diffusers_bin", "sdxl"]
    # The {clip_l, clip_g} file is named after the token (A1111 and ComfyUI call it by its name).
    name = "cat-toy" if step is None else f"cat-toy-steps-{step}"
    assert os.path.basename(written["sdxl"]) == name + ".safetensors"
    halves = rows[:, :WIDTH].tobytes(), rows[:, WIDTH:].tobytes()
    for path in written.values():
        emb = formats.read_embedding(path)  # either file of the pair reads as the pair
        assert (emb.rows.tobytes(), emb.more["text_encoder_2"].tobytes()) == halves, path
    for kind, half in (("diffusers", halves[0]), ("diffusers_2", halves[1])):
        assert formats.load_diffusers(written[kind])[1].tobytes() == half  # each file on its own


@pytest.mark.parametrize("layout", ["diffusers", "a1111", "kohya", "comfyui"])
def test_sdxl_embedding_is_refused_by_one_encoder_layouts(tmp_path, layout):
    emb = dataclasses.replace(sdxl_embedding(), path=str(tmp_path / "src.safetensors"))
    out = tmp_path / "out.safetensors"
    one_line_error(lambda: formats.write(str(out), layout, emb, name=NAME), emb.path,
                   "is an SDXL embedding (clip_l/clip_g", "sdxl, diffusers-sdxl")
    assert not out.exists()


@pytest.mark.parametrize("layout", ["sdxl", "diffusers-sdxl"])
def test_one_encoder_embedding_is_refused_by_sdxl_layouts(tmp_path, layout):
    emb = formats.Embedding(TOKEN, make_rows(), "diffusers", path=str(tmp_path / "src.safetensors"))
    out = tmp_path / formats.DIFFUSERS_FILE
    one_line_error(lambda: formats.write(str(out), layout, emb), emb.path,
                   "is an SD 1.x / 2.x embedding", "diffusers, a1111, kohya")
    assert not out.exists()


def test_check_embedding_fits_counts_text_encoders(tmp_path):
    path = formats.save_sdxl(str(tmp_path / "x.safetensors"), make_rows(2), make_rows(2, width=WIDTH_2))
    emb = formats.read_embedding(path)
    message = one_line_error(lambda: formats.check_embedding_fits(emb, None, WIDTH), path)
    assert message.startswith(f"--initial_embeddings {path}: is an SDXL embedding (clip_l/clip_g); "
                              "this model has one text encoder")
    one_line_error(lambda: formats.check_embedding_fits(emb, 2, 768, what=f"--embeddings {path}"), path,
                   "this model has one text encoder")
    rows, rows_2 = formats.check_embedding_fits(emb, 2, (WIDTH, WIDTH_2))  # a model with two text encoders
    assert rows.shape == (2, WIDTH) and rows_2.shape == (2, WIDTH_2)
    one_line_error(lambda: formats.check_embedding_fits(emb, 2, (WIDTH, 1280)), path,
                   f"width is {WIDTH_2} but text_encoder_2's width is 1280")
    one_line_error(lambda: formats.check_embedding_fits(emb, 3, (WIDTH, WIDTH_2)), path, "pass --num_vectors 2")
    sd1 = formats.read_embedding(formats.save_diffusers(str(tmp_path / "sd1.safetensors"), TOKEN, make_rows()))
    one_line_error(lambda: formats.check_embedding_fits(sd1, None, (WIDTH, WIDTH_2)), sd1.path,
                   "is an SD 1.x / 2.x embedding (one text encoder); this model has 2")


def test_callers_refuse_an_sdxl_embedding_for_a_one_encoder_model(tmp_path):
    """ti_flax.generate's --embeddings and training's --initial_embeddings: one line, nothing changed."""
    from types import SimpleNamespace

    from ti_flax.commands import generate as generation
    from ti_flax.training import run

    class Tokenizer(dict):  # what load_concepts asks before an embedding is checked; a real one loads slowly
        get_vocab = dict.copy

    path = formats.save_sdxl(str(tmp_path / "sdxl.safetensors"), make_rows(2), make_rows(2, width=WIDTH_2))
    tokenizer = Tokenizer()
    spec = SimpleNamespace(base_vocab_size=0, vocab_bases=(0,), hidden_size=WIDTH, text_widths=(WIDTH,), family="sd1")
    one_line_error(lambda: generation.load_concepts(tokenizer, spec, [path]), path,
                   f"--embeddings {path}: is an SDXL embedding (clip_l/clip_g); this model has one text encoder")
    assert tokenizer == {}
    concept = SimpleNamespace(initial_embeddings=path, num_vectors=2)
    one_line_error(lambda: run.initial_rows(SimpleNamespace(allow_pickle=False), concept, SimpleNamespace(spec=spec), None),
                   path, f"--initial_embeddings {path}: is an SDXL embedding (clip_l/clip_g); this model has one text encoder")


def test_a_trained_sdxl_row_reads_back_from_every_file(tmp_path):
    """The SDXL family's save_embedding splits [N, D1 + D2] rows into strided halves; each file holds them exactly."""
    rows = make_rows(3, width=WIDTH + WIDTH_2)
    written = families.get("sdxl").save_embedding(str(tmp_path), TOKEN, rows, (WIDTH, WIDTH_2))
    for path in (written["diffusers"], written["sdxl"]):
        emb = formats.read_embedding(path, token=None if path == written["diffusers"] else TOKEN)
        got = np.concatenate(formats.check_embedding_fits(emb, 3, (WIDTH, WIDTH_2)), axis=1)
        np.testing.assert_array_equal(got, rows)
