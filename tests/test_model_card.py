"""The run's model card (README.md): for an SDXL run it says how each tool loads SDXL's files."""

import os

import pytest

from ti_flax import TrainConfig, families
from ti_flax.training import model_card
from ti_flax.config.concepts import Concept
from ti_flax.training.run import Learned

MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
HISTORY = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
FIRST = 'pipe.load_textual_inversion("{}learned_embeds.safetensors", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)'
SECOND = ('pipe.load_textual_inversion("{}learned_embeds_2.safetensors", text_encoder=pipe.text_encoder_2, '
          'tokenizer=pipe.tokenizer_2)')


def card(config, tokens, learned=(), family="sdxl"):
    return open(model_card.write_model_card(config, tokens, HISTORY, {}, families.get(family), None, learned)).read()


def test_sdxl_card_names_both_files_and_the_two_diffusers_calls(tmp_path):
    text = card(TrainConfig(output_dir=str(tmp_path), pretrained_model_name_or_path=MODEL), ["<cat-toy>", "<cat-toy>_1"])
    assert f'StableDiffusionXLPipeline.from_pretrained("{MODEL}")' in text
    assert FIRST.format("") in text and SECOND.format("") in text
    # A1111 / Forge, ComfyUI and kohya: the {clip_l, clip_g} file, called by its file name.
    assert "copy `cat-toy.safetensors`" in text and "`embedding:cat-toy`" in text
    assert "--textual_inversion_embeddings cat-toy.safetensors" in text
    # None of the SD 1.x / 2.x advice, which would load one text encoder's rows only.
    assert "StableDiffusionPipeline" not in text and "--format a1111" not in text
    assert 'load_textual_inversion("learned_embeds.safetensors")' not in text


def test_sdxl_concepts_card_loads_each_concepts_pair(tmp_path):
    learned = tuple(Learned(Concept(tok, "images", "toy"), (tok,), slice(i, i + 1), os.path.join(str(tmp_path), tok))
                    for i, tok in enumerate(["<a>", "<b>"]))
    config = TrainConfig(output_dir=str(tmp_path), pretrained_model_name_or_path=MODEL, concepts="concepts.json")
    text = card(config, ["<a>", "<b>"], learned)
    for tok, name in (("<a>", "a"), ("<b>", "b")):
        assert FIRST.format(tok + "/") in text and SECOND.format(tok + "/") in text
        assert f"`{tok}/{name}.safetensors`" in text and f"`embedding:{name}`" in text


def test_sd_card_keeps_its_one_file_advice(tmp_path):
    text = card(TrainConfig(output_dir=str(tmp_path), pretrained_model_name_or_path="m"), ["<cat-toy>"], family="sd1")
    assert 'pipe.load_textual_inversion("learned_embeds.safetensors")' in text and "text_encoder_2" not in text
    assert "--format a1111" in text


def test_loss_plot_is_a_readable_png_the_card_links(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    history = [{"step": s, "loss": 0.5 + 0.3 * np.sin(s) / s} for s in range(1, 41)]
    validation = [{"step": 20, "loss": 0.45}, {"step": 40, "loss": 0.4}]
    config = TrainConfig(output_dir=str(tmp_path), pretrained_model_name_or_path="m", save_steps=10,
                         validation_loss_steps=20)
    text = open(model_card.write_model_card(config, ["<cat-toy>"], history, {}, families.get("sd1"), None, (),
                                            validation)).read()
    assert f"]({model_card.LOSS_PLOT})" in text and "validation loss" in text and "0.4000" in text
    image = Image.open(tmp_path / model_card.LOSS_PLOT)
    assert image.format == "PNG" and image.size == (800, 400)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 10  # drawn, not one colour
    # The validation points are drawn in their own colour (matplotlib's tab:orange, #ff7f0e),
    # which the plot without them lacks.
    orange = lambda png: int((np.abs(np.asarray(Image.open(png).convert("RGB"), int) - [255, 127, 14]).sum(-1)  # noqa: E731
                              < 30).sum())
    without = io.BytesIO(model_card.loss_plot(history, (), 10))
    assert orange(tmp_path / model_card.LOSS_PLOT) > 50 and orange(without) == 0


def test_smoothing_is_a_debiased_exponential_average():
    # alpha = 2 / (span + 1); each average divided by 1 - (1 - alpha)^k, so a constant stays constant.
    assert model_card.smoothed([3.0, 3.0, 3.0], span=9) == pytest.approx([3.0, 3.0, 3.0])
    alpha = 0.2
    raw = [1.0, 0.0]
    want = [1.0, (1 - alpha) * alpha * 1.0 / (1 - (1 - alpha) ** 2)]
    assert model_card.smoothed(raw, span=9) == pytest.approx(want)
