"""An SDXL run's results checked in PyTorch diffusers: `ti_flax.export --verify` of both SDXL
layouts (a StableDiffusionXLPipeline's encode_prompt against models.condition), and the
--save_as_full_pipeline folder (StableDiffusionXLPipeline.from_pretrained reads it, both
tokenizers and text encoders hold the learned tokens, ti_flax loads it again)."""

import json
import os

import numpy as np
import pytest

from ti_flax import export, formats, models, verify
from ti_flax.errors import UserError

pytestmark = pytest.mark.slow

WIDTHS = (32, 48)  # the tiny SDXL model's text encoders: CLIP-L-like, bigG-like
TOKEN = "<cat-toy>"


def make_rows(n, width, seed):
    # Values with full float32 mantissas, so any rounding on the way would show.
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32) / 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """diffusers' SDXL pair of 2 vectors: (first file, rows for text_encoder, rows for text_encoder_2)."""
    rows, rows_2 = make_rows(2, WIDTHS[0], 0), make_rows(2, WIDTHS[1], 1)
    first, _ = formats.save_diffusers_sdxl(str(tmp_path_factory.mktemp("src") / "learned_embeds.safetensors"), TOKEN,
                                           rows, rows_2)
    return first, rows, rows_2


def run_cli(argv, capsys):
    code = export.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


# ---- --verify ---------------------------------------------------------------------------------


def test_verify_passes_for_both_sdxl_layouts(tmp_path, tiny_sdxl_model_dir, pair, capsys):
    first = pair[0]
    code, stdout, err = run_cli([first, "-o", tmp_path / "pair", "--format", "diffusers-sdxl",
                                 "--verify", tiny_sdxl_model_dir], capsys)
    assert code == 0, err
    pair_out = [str(tmp_path / "pair" / name) for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors")]
    assert f"verified {pair_out[0]} + {pair_out[1]} in diffusers (PyTorch) as {TOKEN}" in stdout
    code, stdout_2, err = run_cli([first, "-o", tmp_path / "one", "--format", "sdxl", "--verify", tiny_sdxl_model_dir],
                                  capsys)
    assert code == 0, err
    assert f"verified {tmp_path / 'one' / 'cat-toy.safetensors'} in diffusers (PyTorch)" in stdout_2
    for out in (stdout, stdout_2):
        assert "(ids [49408, 49409])" in out
        assert float(out.split("max abs difference to Flax ")[1].split()[0]) <= verify.TOLERANCE
    assert listing(tmp_path / "pair") == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    assert listing(tmp_path / "one") == ["cat-toy.safetensors"]


def test_verify_finds_rows_changed_in_one_text_encoder(tiny_sdxl_model_dir, pair):
    first, rows, rows_2 = pair
    second = first.replace("learned_embeds", "learned_embeds_2")
    tampered = rows_2.copy()
    tampered[1, 5] += 0.01  # what the second file should hold, but does not
    with pytest.raises(UserError, match=r"rows diffusers loaded \(tokenizer_2, text_encoder_2\) differ"):
        verify.verify_sdxl_files(tiny_sdxl_model_dir, rows, tampered, [((first, second), TOKEN, False)])


def test_verify_fails_in_one_line_when_flax_and_pytorch_disagree(tmp_path, tiny_sdxl_model_dir, pair, capsys,
                                                                  monkeypatch):
    condition = models.condition

    def off_pooled(*args):
        cond = condition(*args)
        return cond._replace(text_embeds=cond.text_embeds + 1e-3)

    monkeypatch.setattr(models, "condition", off_pooled)
    code, _, err = run_cli([pair[0], "-o", tmp_path / "out", "--format", "sdxl", "--verify", tiny_sdxl_model_dir],
                           capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "differ by 0.001" in err and "pooled_prompt_embeds" in err
    assert not (tmp_path / "out").exists() or listing(tmp_path / "out") == []


def test_verify_refuses_a_model_of_the_other_family_in_one_line(tmp_path, tiny_sdxl_model_dir, pair, capsys):
    sd_model = tmp_path / "sd"  # all the width check reads of an SD 1.x folder
    (sd_model / "text_encoder").mkdir(parents=True)
    (sd_model / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": WIDTHS[0]}))
    sd_file = formats.save_diffusers(str(tmp_path / "sd1" / "learned_embeds.safetensors"), TOKEN, make_rows(1, 32, 2))
    cases = [
        ([pair[0], "--format", "sdxl", "--verify", sd_model], "not an SDXL model (no text_encoder_2/)"),
        ([sd_file, "--verify", tiny_sdxl_model_dir], "an SDXL model, but the embedding holds one text encoder's rows"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(argv + ["-o", tmp_path / "out"], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
