"""The run's model card (README.md): for an SDXL run it says how each tool loads SDXL's files."""

import os

from ti_flax import TrainConfig, model_card
from ti_flax.concepts import Concept
from ti_flax.run import Learned

MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
HISTORY = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
FIRST = 'pipe.load_textual_inversion("{}learned_embeds.safetensors", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)'
SECOND = ('pipe.load_textual_inversion("{}learned_embeds_2.safetensors", text_encoder=pipe.text_encoder_2, '
          'tokenizer=pipe.tokenizer_2)')


def card(config, tokens, learned=(), sdxl=True):
    return open(model_card.write_model_card(config, tokens, HISTORY, {}, None, learned, sdxl)).read()


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
    text = card(TrainConfig(output_dir=str(tmp_path), pretrained_model_name_or_path="m"), ["<cat-toy>"], sdxl=False)
    assert 'pipe.load_textual_inversion("learned_embeds.safetensors")' in text and "text_encoder_2" not in text
    assert "--format a1111" in text
