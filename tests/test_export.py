"""Tests for the embedding exporter: reading every layout, writing diffusers / A1111 / kohya,
loading the outputs with diffusers' own `load_textual_inversion`, --verify, and bad input."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from ti_flax.commands import export as exporting, verify
from ti_flax import families, formats
from ti_flax.formats import check_embedding_fits, read_embedding
from ti_flax.errors import UserError

WIDTH = 32  # the tiny model's text-encoder width
WIDTH_2 = 48  # the tiny SDXL model's second text encoder (clip_g)
TOKEN = "<cat-toy>"

# (format, file name) for every file layout the exporter writes.
OUTPUTS = [
    ("diffusers", "learned_embeds.safetensors"),
    ("diffusers", "learned_embeds.bin"),
    ("a1111", "cat-toy.pt"),
    ("a1111", "cat-toy.safetensors"),
    ("kohya", "cat-toy.safetensors"),
    ("kohya", "cat-toy.pt"),
    ("comfyui", "cat-toy.safetensors"),
]


def make_rows(n, width=WIDTH, seed=0):
    # Values with full float32 mantissas, so any rounding on the way would show.
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32) / 3


def diffusers_source(tmp_path, rows, token=TOKEN):
    return formats.save_diffusers(str(tmp_path / "src" / "learned_embeds.safetensors"), token, rows)


def run_cli(argv, capsys):
    code = exporting.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


# ---- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_vectors", [1, 3])
@pytest.mark.parametrize("fmt,filename", OUTPUTS)
def test_round_trip_through_every_layout_is_bitwise(tmp_path, fmt, filename, num_vectors):
    rows = make_rows(num_vectors)
    src = diffusers_source(tmp_path, rows)
    out = str(tmp_path / "out" / filename)
    assert exporting.export_embedding(src, out, format=fmt) == [out]
    written = read_embedding(out)
    assert written.rows.dtype == np.float32 and np.array_equal(written.rows, rows)
    # ...and back to diffusers: the token comes from the file, or from --token for kohya.
    back = str(tmp_path / "back" / "learned_embeds.safetensors")
    exporting.export_embedding(out, back, token=None if fmt.startswith(("diffusers", "a1111")) else TOKEN)
    again = read_embedding(back)
    assert np.array_equal(again.rows, rows)
    assert again.token == (TOKEN if fmt != "a1111" else "cat-toy")  # A1111 keeps the name, without <>


def test_a1111_pt_holds_what_a1111_loader_reads(tmp_path):
    rows = make_rows(2)
    src = str(tmp_path / "run" / "checkpoint-40")
    formats.save_diffusers(os.path.join(src, "learned_embeds.safetensors"), TOKEN, rows)
    [out] = exporting.export_embedding(src, tmp_path / "embeddings", format="a1111")
    assert out == str(tmp_path / "embeddings" / "cat-toy.pt")  # default name: token without <>
    data = torch.load(out, weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]) == ["*"]
    assert data["string_to_param"]["*"].dtype == torch.float32
    assert np.array_equal(data["string_to_param"]["*"].numpy(), rows)
    assert data["name"] == "cat-toy" and data["step"] == 40  # step from the checkpoint-N folder


def test_diffusers_and_kohya_safetensors_layouts(tmp_path):
    rows = make_rows(3)
    src = diffusers_source(tmp_path, rows)
    d = exporting.export_embedding(src, tmp_path / "d")[0]
    k = exporting.export_embedding(src, tmp_path / "k", format="kohya")[0]
    with safe_open(d, "numpy") as f:
        assert list(f.keys()) == [TOKEN] and f.metadata() == {"format": "pt"}
        assert f.get_tensor(TOKEN).shape == (3, WIDTH)
    with safe_open(k, "numpy") as f:
        assert list(f.keys()) == ["emb_params"] and np.array_equal(f.get_tensor("emb_params"), rows)
    assert os.path.basename(k) == "cat-toy.safetensors"


def test_single_vector_saved_as_1d_reads_as_one_row(tmp_path):
    row = make_rows(1)[0]
    path = tmp_path / "one.bin"
    torch.save({TOKEN: torch.from_numpy(row)}, path)
    emb = read_embedding(path)
    assert emb.rows.shape == (1, WIDTH) and np.array_equal(emb.rows[0], row)
    assert (emb.token, emb.format) == (TOKEN, "diffusers")


def test_bin_flag_writes_both_files(tmp_path):
    rows = make_rows(2)
    paths = exporting.export_embedding(diffusers_source(tmp_path, rows), tmp_path / "out", bin=True)
    assert [os.path.basename(p) for p in paths] == ["learned_embeds.safetensors", "learned_embeds.bin"]
    data = torch.load(paths[1], weights_only=True)
    assert list(data) == [TOKEN] and np.array_equal(data[TOKEN].numpy(), rows)


# ---- SDXL: the clip_l / clip_g file <-> diffusers' pair of files -------------------------------


def sdxl_pair_source(tmp_path, n=3):
    rows, rows_2 = make_rows(n), make_rows(n, WIDTH_2, seed=1)
    formats.save_diffusers_sdxl(str(tmp_path / "sdxl-out" / "learned_embeds.safetensors"), TOKEN, rows, rows_2)
    return tmp_path / "sdxl-out", rows, rows_2


def sdxl_parts_equal(emb, rows, rows_2):
    return (len(emb.parts) == 2 and emb.rows.tobytes() == rows.tobytes()
            and emb.more["text_encoder_2"].tobytes() == rows_2.tobytes())


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_sdxl_pair_to_single_file_and_back_is_bitwise(tmp_path, capsys, num_vectors):
    folder, rows, rows_2 = sdxl_pair_source(tmp_path, num_vectors)
    single = tmp_path / "embeddings" / "cat-toy.safetensors"
    code, stdout, err = run_cli([folder, "--format", "sdxl", "--output", single], capsys)
    assert code == 0, err
    assert f"sdxl layout, {num_vectors} x {WIDTH} + {WIDTH_2}" in stdout
    with safe_open(str(single), "numpy") as f:  # what A1111 / ComfyUI look up
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.get_tensor("clip_g").dtype == np.float32
    assert sdxl_parts_equal(read_embedding(single), rows, rows_2)

    # ...and back: the single file names no token, so --token names it in both files.
    back = tmp_path / "back"
    code, stdout, err = run_cli([single, "--format", "diffusers-sdxl", "--token", TOKEN, "--output", back], capsys)
    assert code == 0, err
    assert listing(back) == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]  # nothing else left
    assert stdout.count("wrote ") == 2 and f"{num_vectors} x {WIDTH_2}, token {TOKEN}" in stdout
    for name, want in (("learned_embeds.safetensors", rows), ("learned_embeds_2.safetensors", rows_2)):
        with safe_open(str(back / name), "numpy") as f:  # diffusers' own layout, one text encoder per file
            assert list(f.keys()) == [TOKEN] and f.metadata() == {"format": "pt"}
            assert f.get_tensor(TOKEN).tobytes() == want.tobytes()
    again = read_embedding(back)
    assert again.format == "diffusers-sdxl" and again.token == TOKEN and sdxl_parts_equal(again, rows, rows_2)


def test_sdxl_exports_name_their_files(tmp_path):
    folder, rows, rows_2 = sdxl_pair_source(tmp_path)
    # A folder output: NAME.safetensors from the token for the single file, NAME.pt as torch.
    assert exporting.export_embedding(folder, tmp_path / "out", format="sdxl") == [str(tmp_path / "out" / "cat-toy.safetensors")]
    [pt] = exporting.export_embedding(folder / "learned_embeds_2.safetensors", tmp_path / "x.pt", format="sdxl")
    assert sdxl_parts_equal(read_embedding(pt), rows, rows_2)  # the second file reads as the pair too
    # The pair at a checkpoint's name: learned_embeds-steps-S pairs with learned_embeds_2-steps-S.
    first = tmp_path / "steps" / "learned_embeds-steps-40.safetensors"
    paths = exporting.export_embedding(folder, first, format="diffusers-sdxl")
    assert paths == [str(first), str(tmp_path / "steps" / "learned_embeds_2-steps-40.safetensors")]
    assert read_embedding(first).step == 40 and sdxl_parts_equal(read_embedding(first), rows, rows_2)


def test_sdxl_pair_output_refuses_either_existing_file(tmp_path, capsys):
    folder, rows, _ = sdxl_pair_source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "learned_embeds_2.safetensors").write_bytes(b"old")
    code, _, err = run_cli([folder, "--format", "diffusers-sdxl", "-o", out], capsys)
    assert code == 2 and "learned_embeds_2.safetensors: already exists" in err and "--overwrite" in err
    assert listing(out) == ["learned_embeds_2.safetensors"]
    assert exporting.export_embedding(folder, out, format="diffusers-sdxl", overwrite=True)
    assert read_embedding(out).rows.tobytes() == rows.tobytes()


# ---- diffusers' own loader accepts what we write ----------------------------------------------


@pytest.fixture(scope="module")
def torch_pipe(tiny_model_dir):
    return verify.load_torch_pipeline(tiny_model_dir)


def load_in_diffusers(pipe, path, token=None):
    """(tokens -> ids, their rows) after diffusers' load_textual_inversion on fresh copies."""
    tokenizer, text_encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    pipe.load_textual_inversion(path, token=token, tokenizer=tokenizer, text_encoder=text_encoder)
    added = {t: i for t, i in tokenizer.get_added_vocab().items() if i >= tokenizer.vocab_size}
    table = text_encoder.get_input_embeddings().weight.detach().numpy()
    return added, table


@pytest.mark.parametrize("num_vectors", [1, 3])
@pytest.mark.parametrize("fmt,filename", [o for o in OUTPUTS if o[0] != "comfyui"])
def test_diffusers_load_textual_inversion_accepts_outputs(tmp_path, torch_pipe, fmt, filename, num_vectors):
    rows = make_rows(num_vectors, seed=num_vectors)
    [out] = exporting.export_embedding(diffusers_source(tmp_path, rows), tmp_path / "out" / filename, format=fmt)
    added, table = load_in_diffusers(torch_pipe, out, token=None if fmt == "diffusers" else TOKEN)
    expected = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, num_vectors)]
    base = torch_pipe.tokenizer.vocab_size
    assert added == {t: base + i for i, t in enumerate(expected)}
    assert np.array_equal(table[base:], rows)


def test_diffusers_reads_a1111_name_as_token(tmp_path, torch_pipe):
    rows = make_rows(2)
    [out] = exporting.export_embedding(diffusers_source(tmp_path, rows), tmp_path / "x.pt", format="a1111", name="catty")
    added, _ = load_in_diffusers(torch_pipe, out)
    assert set(added) == {"catty", "catty_1"}


# ---- --verify ---------------------------------------------------------------------------------


def test_verify_passes_on_tiny_model(tmp_path, tiny_model_dir, capsys):
    rows = make_rows(3)
    out = tmp_path / "out"
    code, stdout, err = run_cli([diffusers_source(tmp_path, rows), "-o", out, "--format", "kohya",
                                 "--verify", tiny_model_dir], capsys)
    assert code == 0, err
    assert "verified" in stdout and "max abs difference" in stdout
    diff = float(stdout.split("max abs difference to Flax ")[1].split()[0])
    assert diff <= 1e-4
    assert listing(out) == ["cat-toy.safetensors"]


def test_verify_fails_on_wrong_width_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    src = diffusers_source(tmp_path, make_rows(2, width=WIDTH + 8))
    code, stdout, err = run_cli([src, "-o", tmp_path / "out", "--verify", tiny_model_dir], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "width is 40" in err and "width is 32" in err
    assert not (tmp_path / "out").exists()


def test_verify_detects_rows_that_differ_from_the_file(tmp_path, tiny_model_dir):
    rows = make_rows(2)
    src = diffusers_source(tmp_path, rows)
    with pytest.raises(UserError, match="rows diffusers loaded differ"):
        verify.verify_files(tiny_model_dir, rows + 0.01, [(src, TOKEN, False)])


def test_verify_fails_when_flax_and_pytorch_disagree(tmp_path, tiny_model_dir, monkeypatch):
    from ti_flax import models

    encode_text = models.encode_text
    monkeypatch.setattr(models, "encode_text", lambda *args: encode_text(*args) + 1e-3)
    src = diffusers_source(tmp_path, make_rows(1))
    with pytest.raises(UserError, match="differ by 0.001"):
        verify.verify_files(tiny_model_dir, make_rows(1), [(src, TOKEN, False)])


# ---- other sources: diffusers' Flax script, pipelines, checkpoints ----------------------------


def write_reference_npy(path, token, row):
    import jax.numpy as jnp

    # Exactly how diffusers' textual_inversion_flax.py saves: a pickled dict in a 0-d array.
    jnp.save(path, {token: row})


def test_flax_script_npy_converts_with_allow_pickle(tmp_path, capsys):
    import jax.numpy as jnp

    row = jnp.asarray(make_rows(1)[0])
    folder = tmp_path / "sd-flax-out"
    folder.mkdir()
    write_reference_npy(str(folder / "learned_embeds.npy"), TOKEN, row)
    out = tmp_path / "out"
    code, _, err = run_cli([folder / "learned_embeds.npy", "-o", out], capsys)
    assert code == 2 and "pickle" in err and "--allow-pickle" in err and "trust" in err
    assert not out.exists()
    code, stdout, err = run_cli([folder, "-o", out, "--allow-pickle"], capsys)  # the folder finds the .npy
    assert code == 0, err
    emb = read_embedding(out)
    assert emb.token == TOKEN and emb.rows.shape == (1, WIDTH)
    assert np.array_equal(emb.rows[0], np.asarray(row))


def test_pipeline_folder_reads_rows_of_token(tmp_path, tiny_model_dir, capsys):
    from ti_flax import tokens

    model = families.load_model(tiny_model_dir)
    rows = make_rows(3)
    names = tokens.placeholder_tokens(TOKEN, 3)
    tokenizer = copy.deepcopy(model.tokenizer)
    tokens.add_placeholder_tokens(tokenizer, names)
    pipeline = str(tmp_path / "pipeline")
    families.of(model.spec).save_pipeline(model, rows, pipeline, (tokenizer,))

    code, _, err = run_cli([pipeline, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "--token" in err and TOKEN in err  # lists the learned tokens
    emb = read_embedding(pipeline, token=TOKEN)
    assert emb.format == "pipeline" and np.array_equal(emb.rows, rows)
    with pytest.raises(UserError, match="not a token added"):
        read_embedding(pipeline, token="<dog>")
    [out] = exporting.export_embedding(pipeline, tmp_path / "out", format="a1111", token=TOKEN)
    assert np.array_equal(read_embedding(out).rows, rows)

    # diffusers' Flax script leaves learned_embeds.npy beside the pipeline: --token avoids pickle.
    write_reference_npy(os.path.join(pipeline, "learned_embeds.npy"), TOKEN, rows[0])
    code, _, err = run_cli([pipeline, "-o", tmp_path / "out2"], capsys)
    assert code == 2 and "--token" in err and "--allow-pickle" in err
    assert np.array_equal(read_embedding(pipeline, token=TOKEN).rows, rows)
    assert read_embedding(pipeline, allow_pickle=True).format == "flax-npy"


def test_python_m_entry_point(tmp_path):
    rows = make_rows(2)
    src = diffusers_source(tmp_path, rows)
    out = tmp_path / "k.safetensors"
    proc = subprocess.run([sys.executable, "-m", "ti_flax.export", src, "--output", str(out), "--format", "comfyui"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and np.array_equal(read_embedding(out).rows, rows)


# ---- bad input: one line, exit 2, nothing written ---------------------------------------------


def bad_sources(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    save_file({"a": make_rows(1), "b": make_rows(1)}, str(d / "two.safetensors"))
    nan = make_rows(2)
    nan[1, 3] = np.nan
    save_file({TOKEN: nan}, str(d / "nan.safetensors"))
    torch.save({"name": "x", "vectors": [1, 2]}, d / "nolayout.pt")
    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH), "+": torch.zeros(1, WIDTH)}}, d / "twoparams.pt")
    torch.save({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, d / "sdxl.pt")
    formats.save_diffusers_sdxl(str(d / "pair" / "learned_embeds.safetensors"), TOKEN, make_rows(2), make_rows(2, WIDTH_2))
    formats.save_sdxl(str(d / "sdxl.safetensors"), make_rows(2), make_rows(2, WIDTH_2))
    save_file({"clip_l": make_rows(2)}, str(d / "only-l.safetensors"))
    save_file({"clip_l": make_rows(1), "clip_g": make_rows(2, WIDTH_2)}, str(d / "counts.safetensors"))
    torch.save({TOKEN: torch.nn.Linear(2, 2)}, d / "module.pt")  # a pickled object: not weights-only
    save_file({TOKEN: np.zeros((2, 3, 4), np.float32)}, str(d / "3d.safetensors"))
    (d / "notes.txt").write_text("hi")
    return d


# Each case: the CLI arguments (given the folder of bad files, a good source and the output
# folder) and a phrase the one-line error must contain.
BAD_INPUT = {
    "several keys": (lambda d, good, out: [d / "two.safetensors", "-o", out], "2 entries"),
    "NaN": (lambda d, good, out: [d / "nan.safetensors", "-o", out], "NaN"),
    "no layout": (lambda d, good, out: [d / "nolayout.pt", "-o", out], "no embedding layout"),
    "two A1111 terms": (lambda d, good, out: [d / "twoparams.pt", "-o", out], "exactly one tensor in string_to_param"),
    "SDXL": (lambda d, good, out: [d / "sdxl.pt", "-o", out], "sdxl.pt: is an SDXL embedding (clip_l/clip_g"),
    "SDXL to a1111": (lambda d, good, out: [d / "sdxl.safetensors", "-o", out, "--format", "a1111"],
                      "--format a1111 holds one text encoder's rows (SD 1.x / 2.x): choose one of the SDXL layouts: "
                      "sdxl, diffusers-sdxl"),
    "SDXL pair to comfyui": (lambda d, good, out: [d / "pair", "-o", out, "--format", "comfyui"],
                             "pair/learned_embeds.safetensors: is an SDXL embedding"),
    "SD 1.x to sdxl": (lambda d, good, out: [good, "-o", out, "--format", "sdxl"],
                       "is an SD 1.x / 2.x embedding (one text encoder, 1 x 32); --format sdxl needs rows for SDXL's two "
                       "text encoders (clip_l and clip_g): choose one of diffusers, a1111, kohya"),
    "SD 1.x to diffusers-sdxl": (lambda d, good, out: [good, "-o", out, "--format", "diffusers-sdxl"],
                                 "--format diffusers-sdxl needs rows for SDXL's two text encoders"),
    "SDXL --verify not a model": (lambda d, good, out: [d / "pair", "-o", out, "--format", "sdxl", "--verify", d],
                                  "not a Stable Diffusion model folder (no text_encoder/config.json)"),
    "pair to a file name": (lambda d, good, out: [d / "pair", "-o", out / "cat.safetensors", "--format", "diffusers-sdxl"],
                            "diffusers' SDXL pair is two files"),
    "SDXL file to pair without token": (lambda d, good, out: [d / "sdxl.safetensors", "-o", out, "--format", "diffusers-sdxl"],
                                        "sdxl.safetensors: the sdxl file does not name its token; pass --token"),
    "--bin with diffusers-sdxl": (lambda d, good, out: [d / "pair", "-o", out, "--bin", "--format", "diffusers-sdxl"],
                                  "--bin"),
    "SDXL file with clip_l only": (lambda d, good, out: [d / "only-l.safetensors", "-o", out, "--format", "sdxl"],
                                   "this file only clip_l"),
    "SDXL vector counts": (lambda d, good, out: [d / "counts.safetensors", "-o", out, "--format", "diffusers-sdxl"],
                           "clip_l has 1 vectors but clip_g has 2"),
    "pickled object": (lambda d, good, out: [d / "module.pt", "-o", out], "not loaded for safety"),
    "3-D tensor": (lambda d, good, out: [d / "3d.safetensors", "-o", out], "shape [2, 3, 4]"),
    "not an embedding": (lambda d, good, out: [d / "notes.txt", "-o", out], "unknown embedding file type"),
    "missing source": (lambda d, good, out: [d / "missing.safetensors", "-o", out], "no such embedding"),
    "unknown format": (lambda d, good, out: [good, "-o", out, "--format", "webui"], "--format 'webui': unknown"),
    "--bin with a1111": (lambda d, good, out: [good, "-o", out, "--bin", "--format", "a1111"], "--bin"),
    "token with space": (lambda d, good, out: [good, "-o", out, "--token", "two words"], "one word"),
    "wrong extension": (lambda d, good, out: [good, "-o", out / "x.npy", "--format", "a1111"], "ends in .pt or .safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, case):
    argv, message = BAD_INPUT[case]
    d = bad_sources(tmp_path)
    good = diffusers_source(tmp_path, make_rows(1))
    before = listing(tmp_path)
    code, _, err = run_cli(argv(d, good, tmp_path / "out"), capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert listing(tmp_path) == before  # no output, no stray temporary file


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cat-toy.pt").write_bytes(b"old")
    src = diffusers_source(tmp_path, make_rows(2))
    code, _, err = run_cli([src, "-o", out, "--format", "a1111"], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert listing(out) == ["cat-toy.pt"] and (out / "cat-toy.pt").read_bytes() == b"old"


def test_overwrite_replaces_existing_file(tmp_path):
    out = tmp_path / "out" / "learned_embeds.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"old")
    rows = make_rows(2)
    exporting.export_embedding(diffusers_source(tmp_path, rows), out.parent, overwrite=True)
    assert np.array_equal(read_embedding(out).rows, rows)


def test_bare_array_npy_needs_no_pickle(tmp_path):
    rows = make_rows(2)
    np.save(tmp_path / "rows.npy", rows)
    emb = read_embedding(tmp_path / "rows.npy")
    assert (emb.token, emb.format) == (None, "npy") and np.array_equal(emb.rows, rows)
    [out] = exporting.export_embedding(tmp_path / "rows.npy", tmp_path / "out", token=TOKEN)
    assert read_embedding(out).token == TOKEN


def test_kohya_source_to_diffusers_needs_a_token(tmp_path):
    src = str(tmp_path / "k.safetensors")
    save_file({"emb_params": make_rows(2)}, src)
    with pytest.raises(UserError, match="--token"):
        exporting.export_embedding(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- the trainer's --initial_embeddings check -------------------------------------------------


def test_check_embedding_fits(tmp_path):
    emb = read_embedding(diffusers_source(tmp_path, make_rows(3)))
    assert check_embedding_fits(emb, 3, WIDTH).shape == (3, WIDTH)
    assert check_embedding_fits(emb, None, WIDTH).shape == (3, WIDTH)
    with pytest.raises(UserError, match="--num_vectors is 2; pass --num_vectors 3"):
        check_embedding_fits(emb, 2, WIDTH)
    with pytest.raises(UserError, match="width is 3 but the text encoder's width is 768"):
        check_embedding_fits(np.zeros((1, 3)), 1, 768)
