"""FLUX.1 loading: a diffusers FluxPipeline folder, and the files ComfyUI / Forge / kohya users keep
apart, read into the owned configs and weights (ti_flax.models.component_weights, flux_files,
bfl_layout, tokenizers.load_t5_tokenizer).

Two tiny FluxPipeline folders, [dev] and [schnell] (scripts/make_tiny_model.py --layout flux-dev /
flux-schnell), are built once per module. tests/flux_files.py writes the [dev] folder as the split
files with its own diffusers -> BFL mapping (fused q/k/v, norm_out's halves swapped), in float32,
bf16, fp16, fp8 (float8_e4m3fn) and ComfyUI's scaled fp8, so loading them back checks the loader.

What each check would catch:
  folder == PyTorch         a weight renamed, transposed, dropped or added in the folder path;
        CLIP's missing `text_model.` prefix (transformers 5) not restored.
  folder configs            a FluxConfig / T5Config field read wrongly or defaulted; [schnell] taken
        for [dev] (guidance_embeds).
  sharded / whole T5        the sharded index not followed; a whole T5ForConditionalGeneration's
        decoder read (its shard here is garbage: reading it fails) or refused; its token table, saved
        under the tied copy's name encoder.embed_tokens.weight, not folded onto shared.weight.
  bf16                      dtype= not honoured, or a float32 detour that rounds differently.
  BFL file == folder        a wrong BFL name, q/k/v or linear1 split at the wrong rows or in the wrong
        order, norm_out's shift/scale halves not swapped, a config inferred wrongly from the shapes
        ([dev]/[schnell], head count, block counts), the `model.diffusion_model.` prefix not removed;
        fp16/bf16/fp8 not read bitwise (fp8: safetensors' numpy reader cannot), scaled fp8's scales
        not applied or applied to the wrong tensor.
  clip_l / t5xxl / ae       the same for the text encoders and the autoencoder: `text_model.` prefix
        present or not, text_projection / logit_scale / position_ids read as weights, T5's tied copy,
        the ae's 1x1-conv attention weights, its missing quant convs, FLUX's scaling and shift.
  all-in-one                ComfyUI's one-file checkpoint's parts not found under their prefixes.
  T5 tokenizer              reading that needs the network, a tokenizer that differs from
        FluxPipeline's, a placeholder token that lands anywhere but right after the tokenizer (its
        row must be a learned one: ids in [len(tokenizer), table rows) are never the table's).
  refusals                  a Fill, Depth, Kontext or Redux model, a LoRA, an SD checkpoint, a file in
        the wrong slot, a missing encoder, a damaged file, an unreadable quantization, a misshapen or
        extra weight, parts of different models: anything but one line naming the file and the flag.
"""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

import flux_files as writer  # noqa: E402  (tests/flux_files.py)

from ti_flax.errors import UserError  # noqa: E402
from ti_flax.files import DamagedFile  # noqa: E402
from ti_flax.models import bfl_layout, component_weights, flux, flux_files, t5  # noqa: E402
from ti_flax.models.tokenizers import load_t5_tokenizer  # noqa: E402
from ti_flax.models.weights import flatten  # noqa: E402

KINDS = {"transformer": "transformer", "text_encoder": "text_encoder", "text_encoder_2": "t5", "vae": "vae"}
PROMPT = "a photo of a cat toy on a wooden table, watercolor"


# --------------------------------------------------------------------------------------------
# Fixtures: the folders, PyTorch's reading of them, the split files


@pytest.fixture(scope="module")
def folders(tiny_flux_dirs):
    """{"dev": folder, "schnell": folder}: the session's (conftest.tiny_flux_dirs)."""
    return tiny_flux_dirs


@pytest.fixture(scope="module")
def dev(folders):
    return folders["dev"]


@pytest.fixture(scope="module")
def pipeline(dev):
    """diffusers' FluxPipeline.from_pretrained of the [dev] folder."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(dev)


@pytest.fixture(scope="module")
def loaded(dev):
    """{part: (config, float32 params)} of the [dev] folder, through component_weights."""
    return {part: component_weights.load_component(os.path.join(dev, part), kind) for part, kind in KINDS.items()}


@pytest.fixture(scope="module")
def split(dev, tmp_path_factory):
    """{name: (path, what a correct loader reads back, float32, ours names)}: the [dev] folder as files."""
    out_dir = tmp_path_factory.mktemp("flux-files")
    rng = np.random.default_rng(0)
    transformer = writer.folder_state(dev, "transformer")
    bfl = writer.to_bfl(transformer)
    files = {}

    def write(name, state, dtype, scaled=(), back=None, prefix=""):
        tensors, read_back = writer.store(state, dtype, scaled)
        path = writer.save(writer.prefixed(tensors, prefix), str(out_dir / name))
        files[name] = (path, back(read_back) if back else read_back)

    def from_bfl(state):
        return writer.from_bfl(state, transformer)

    write("flux1-dev.safetensors", bfl, "float32", back=from_bfl)
    write("flux1-dev-bf16.safetensors", bfl, "bfloat16", back=from_bfl)
    write("flux1-dev-fp8.safetensors", bfl, "float8_e4m3fn", back=from_bfl)
    write("flux1-dev-fp8-scaled.safetensors", bfl, "bfloat16", writer.linear_weights(bfl), back=from_bfl)
    write("flux1-dev-comfy.safetensors", bfl, "bfloat16", back=from_bfl, prefix="model.diffusion_model.")
    text = writer.folder_state(dev, "text_encoder")

    def text_back(state):
        return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()
                if "position_ids" not in k and not k.startswith(("text_projection", "logit_scale"))}

    write("clip_l.safetensors", writer.to_clip_l(text, rng), "float16", back=text_back)
    write("clip_l-no-prefix.safetensors", writer.to_clip_l(text, rng, prefix=False, projection=False), "float32",
          back=text_back)
    t5_state = writer.folder_state(dev, "text_encoder_2")
    write("t5xxl_fp16.safetensors", t5_state, "float16")
    write("t5xxl_fp8_e4m3fn.safetensors", t5_state, "float8_e4m3fn")
    write("t5xxl_fp8_e4m3fn_scaled.safetensors", t5_state, "float16", writer.linear_weights(t5_state))
    tied = dict(t5_state, **{t5.TIED_COPY: t5_state[t5.TABLE]})
    write("t5xxl-tied-copy.safetensors", {k: v for k, v in tied.items() if k != t5.TABLE}, "float32",
          back=lambda s: {t5.TABLE if k == t5.TIED_COPY else k: v for k, v in s.items()})
    vae_state = writer.folder_state(dev, "vae")
    ae = writer.to_ae(vae_state)
    ae_back = {k: v for k, v in vae_state.items()}
    write("ae.safetensors", ae, "float32", back=lambda _: ae_back)
    write("ae.sft", ae, "float32", back=lambda _: ae_back)  # kohya's docs call BFL's ae file ae.sft
    # ComfyUI's all-in-one checkpoint: every part in one file, under its prefix.
    tensors = {}
    for prefix, state, dtype in (("model.diffusion_model.", bfl, "bfloat16"),
                                 ("text_encoders.clip_l.transformer.", writer.to_clip_l(text, rng), "float16"),
                                 ("text_encoders.t5xxl.transformer.", t5_state, "float16"), ("vae.", ae, "bfloat16")):
        tensors.update(writer.prefixed(writer.store(state, dtype)[0], prefix))
    files["flux1-dev-fp8-all-in-one.safetensors"] = (writer.save(tensors, str(out_dir / "all-in-one.safetensors")),
                                                     None)
    return files


def same(got_tree, want, what):
    """Two {name: array} hold the same names and bitwise the same values (and dtype `float32`)."""
    got = flatten(got_tree)
    assert sorted(got) == sorted(want), what
    for name in want:
        assert got[name].dtype == np.float32, (what, name)
        np.testing.assert_array_equal(got[name], np.asarray(want[name], np.float32), err_msg=f"{what}: {name}")


def one_line(excinfo, *needles):
    """The UserError's message is one line naming each of `needles` (the file, the flag, ...)."""
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 400, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --------------------------------------------------------------------------------------------
# The diffusers folder


def test_folder_components_load_what_pytorch_loads(pipeline, loaded):
    modules = {"transformer": pipeline.transformer, "text_encoder": pipeline.text_encoder,
               "text_encoder_2": pipeline.text_encoder_2, "vae": pipeline.vae}
    for part, module in modules.items():
        state = {k: v.numpy() for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        if part == "text_encoder_2":  # one tensor under two names in PyTorch; ours keeps shared.weight
            np.testing.assert_array_equal(state.pop(t5.TIED_COPY), state[t5.TABLE])
        if part == "text_encoder":  # transformers 5's CLIPTextModel has no text_model. level; 4.x's and ours do
            state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
        same(loaded[part][1], state, part)


def test_folder_configs_are_pytorchs(folders, pipeline, loaded):
    transformer = pipeline.transformer.config
    assert loaded["transformer"][0] == flux.FluxConfig.from_dict(dict(transformer))
    assert loaded["transformer"][0].guidance_embeds and loaded["transformer"][0].num_layers == 2
    schnell = component_weights.read_config(os.path.join(folders["schnell"], "transformer"), "transformer")
    assert not schnell.guidance_embeds and flux_files.variant(schnell) == "schnell"
    assert flux_files.variant(loaded["transformer"][0]) == "dev"
    t5_config = pipeline.text_encoder_2.config
    assert loaded["text_encoder_2"][0] == t5.T5Config(
        vocab_size=t5_config.vocab_size, d_model=t5_config.d_model, d_kv=t5_config.d_kv, d_ff=t5_config.d_ff,
        num_layers=t5_config.num_layers, num_heads=t5_config.num_heads,
        relative_attention_num_buckets=t5_config.relative_attention_num_buckets,
        relative_attention_max_distance=t5_config.relative_attention_max_distance,
        layer_norm_epsilon=t5_config.layer_norm_epsilon, feed_forward_proj=t5_config.feed_forward_proj)
    vae_config = loaded["vae"][0]
    assert (vae_config.latent_channels, vae_config.scaling_factor, vae_config.shift_factor) == (16, 0.3611, 0.1159)
    assert not vae_config.use_quant_conv and not vae_config.use_post_quant_conv
    for variant, folder in folders.items():
        assert flux_files.read_scheduler_config(folder)["shift"] == flux_files.SCHEDULERS[variant]["shift"]
        flux_files.check_folder(folder)


def test_load_folder_returns_every_part(dev, loaded):
    parts = flux_files.load_folder(dev)
    for part in flux_files.PARTS:
        assert parts[part][0] == loaded[part][0]
        same(parts[part][1], flatten(loaded[part][1]), part)


def test_sharded_transformer_and_a_whole_t5(dev, pipeline, loaded, tmp_path):
    folder = str(tmp_path / "transformer")
    pipeline.transformer.save_pretrained(folder, max_shard_size="4MB")
    assert os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
    assert len([n for n in os.listdir(folder) if n.endswith(".safetensors")]) > 2
    same(component_weights.load_component(folder, "transformer")[1], flatten(loaded["transformer"][1]), "shards")

    # A T5ForConditionalGeneration folder: the encoder in one shard, its token table under the tied
    # copy's name only (as older saves have it), the decoder and LM head in a damaged shard, which
    # must not be read.
    whole = tmp_path / "t5"
    whole.mkdir()
    config = json.load(open(os.path.join(dev, "text_encoder_2", "config.json")))
    json.dump(dict(config, architectures=["T5ForConditionalGeneration"]), open(whole / "config.json", "w"))
    encoder = writer.folder_state(dev, "text_encoder_2")
    encoder[t5.TIED_COPY] = encoder.pop(t5.TABLE)
    writer.save(writer.store(encoder, "float32")[0], str(whole / "model-00001-of-00002.safetensors"))
    (whole / "model-00002-of-00002.safetensors").write_bytes(b"not a safetensors file")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in encoder}
    weight_map.update({"decoder.block.0.layer.0.SelfAttention.q.weight": "model-00002-of-00002.safetensors",
                       "lm_head.weight": "model-00002-of-00002.safetensors"})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(whole / "model.safetensors.index.json", "w"))
    config_got, params = component_weights.load_component(str(whole), "t5")
    assert config_got == loaded["text_encoder_2"][0]
    same(params, flatten(loaded["text_encoder_2"][1]), "whole T5")


def bits(array):
    """The bf16 bit patterns of a float32 array rounded to bf16."""
    return array.astype(ml_dtypes.bfloat16).view(np.uint16)


def test_bf16_loading_is_the_float32_weights_cast(dev, loaded, split):
    for part, kind in KINDS.items():
        _, params = component_weights.load_component(os.path.join(dev, part), kind, dtype="bfloat16")
        got, want = flatten(params), flatten(loaded[part][1])
        assert sorted(got) == sorted(want)
        for name in want:
            assert got[name].dtype == ml_dtypes.bfloat16, name
            np.testing.assert_array_equal(got[name].view(np.uint16), bits(want[name]))
    for name, loader in (("flux1-dev-fp8-scaled.safetensors", flux_files.load_transformer),
                         ("t5xxl_fp8_e4m3fn.safetensors", flux_files.load_t5xxl),
                         ("clip_l.safetensors", flux_files.load_clip_l), ("ae.safetensors", flux_files.load_ae)):
        path, _ = split[name]
        got, want = flatten(loader(path, dtype="bfloat16")[1]), flatten(loader(path)[1])
        for key in want:
            assert got[key].dtype == ml_dtypes.bfloat16, (name, key)
            np.testing.assert_array_equal(got[key].view(np.uint16), bits(want[key]))


# --------------------------------------------------------------------------------------------
# The files ComfyUI users keep apart


@pytest.mark.parametrize("name", ["flux1-dev.safetensors", "flux1-dev-bf16.safetensors", "flux1-dev-fp8.safetensors",
                                  "flux1-dev-fp8-scaled.safetensors", "flux1-dev-comfy.safetensors"])
def test_bfl_transformer_file_is_the_folders(name, split, loaded):
    path, want = split[name]
    config, params = flux_files.load_transformer(path)
    assert config == loaded["transformer"][0]  # [dev], 2 + 2 blocks, 2 heads of 128: from the shapes
    same(params, want, name)
    if name == "flux1-dev.safetensors":  # float32: the folder's weights themselves
        same(params, flatten(loaded["transformer"][1]), name)


def test_bfl_names_fill_every_weight_once(folders):
    for folder in folders.values():
        config = component_weights.read_config(os.path.join(folder, "transformer"), "transformer")
        filled = [n for ours, _ in bfl_layout.transformer_names(config).values() for n in ours]
        assert sorted(filled) == sorted(flux.param_shapes(config))


# FLUX.1 [dev]'s and T5-XXL's published configs (black-forest-labs/FLUX.1-dev transformer/ and
# text_encoder_2/config.json); [schnell]'s transformer differs in guidance_embeds.
FLUX_DEV = flux.FluxConfig(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                           joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                           axes_dims_rope=(16, 56, 56))
T5_XXL = t5.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu")


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_full_size_shapes_imply_the_published_configs(guidance):
    """The real files' shapes (no weights: a Checkpoint of shapes) give FLUX.1's and T5-XXL's configs,
    and our BFL names are exactly the keys diffusers' own converter reads (on meta tensors)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from ti_flax.models.single_file import Checkpoint

    config = flux.FluxConfig(**dict(FLUX_DEV.to_dict(), guidance_embeds=guidance))
    expected = flux.param_shapes(config)
    table = bfl_layout.transformer_names(config)
    shapes = {name: bfl_layout.file_shape(ours, how, expected) for name, (ours, how) in table.items()}
    assert flux.FluxConfig.from_dict(bfl_layout.transformer_config(Checkpoint("flux1.safetensors", shapes, None))) \
        == config
    checkpoint = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint  # diffusers popped every key we name ...
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected  # ... into the weights we fill
    t5_shapes = dict(t5.param_shapes(T5_XXL))
    assert t5.T5Config.from_dict(bfl_layout.t5_config(Checkpoint("t5xxl.safetensors", t5_shapes, None))) == T5_XXL


def test_schnell_file_is_told_from_dev(folders, tmp_path):
    state = writer.folder_state(folders["schnell"], "transformer")
    path = writer.save(writer.store(writer.to_bfl(state), "bfloat16")[0], str(tmp_path / "flux1-schnell.safetensors"))
    config, _ = flux_files.load_transformer(path)
    assert not config.guidance_embeds
    assert config == component_weights.read_config(os.path.join(folders["schnell"], "transformer"), "transformer")


@pytest.mark.parametrize("name", ["clip_l.safetensors", "clip_l-no-prefix.safetensors"])
def test_clip_l_file_is_the_folders(name, split, loaded):
    path, want = split[name]
    config, params = flux_files.load_clip_l(path)
    assert config == loaded["text_encoder"][0]
    same(params, want, name)


@pytest.mark.parametrize("name", ["t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors",
                                  "t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl-tied-copy.safetensors"])
def test_t5xxl_file_is_the_folders(name, split, loaded):
    path, want = split[name]
    config, params = flux_files.load_t5xxl(path)
    assert config == loaded["text_encoder_2"][0]
    same(params, want, name)
    if name == "t5xxl_fp16.safetensors":
        reference = flatten(loaded["text_encoder_2"][1])
        same(params, {k: v.astype(np.float16).astype(np.float32) for k, v in reference.items()}, "fp16-rounded")
    if name == "t5xxl_fp8_e4m3fn.safetensors":
        reference = flatten(loaded["text_encoder_2"][1])
        rounded = {k: torch.from_numpy(v).to(torch.float8_e4m3fn).float().numpy() for k, v in reference.items()}
        same(params, rounded, "fp8-rounded")


@pytest.mark.parametrize("name", ["ae.safetensors", "ae.sft"])
def test_ae_file_is_the_folders(name, split, loaded):
    path, want = split[name]
    config, params = flux_files.load_ae(path)
    assert config == loaded["vae"][0]  # 16 latent channels, no quant convs, FLUX's scaling and shift
    same(params, want, name)


def test_load_files_and_the_all_in_one_checkpoint(split, loaded):
    parts = flux_files.load_files(split["flux1-dev.safetensors"][0], split["clip_l-no-prefix.safetensors"][0],
                                  split["t5xxl-tied-copy.safetensors"][0], split["ae.safetensors"][0])
    for part in flux_files.PARTS:
        assert parts[part][0] == loaded[part][0]
        same(parts[part][1], flatten(loaded[part][1]), part)  # all float32 files: the folder's weights

    everything = flux_files.load_files(split["flux1-dev-fp8-all-in-one.safetensors"][0])
    for part in flux_files.PARTS:
        assert everything[part][0] == loaded[part][0], part
    same(everything["transformer"][1], split["flux1-dev-comfy.safetensors"][1], "all-in-one transformer")
    same(everything["text_encoder"][1], split["clip_l.safetensors"][1], "all-in-one CLIP-L")
    same(everything["text_encoder_2"][1], split["t5xxl_fp16.safetensors"][1], "all-in-one T5")


# --------------------------------------------------------------------------------------------
# The T5 tokenizer


def test_t5_tokenizer_reads_offline_and_places_a_new_token(dev, pipeline, loaded, tmp_path):
    tokenizer = load_t5_tokenizer(os.path.join(dev, "tokenizer_2"))
    want = pipeline.tokenizer_2(PROMPT, padding="max_length", max_length=32).input_ids
    assert tokenizer(PROMPT, padding="max_length", max_length=32).input_ids == want
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    size, rows = len(tokenizer), loaded["text_encoder_2"][0].vocab_size
    assert size == 300 and rows == 320  # T5-XXL: 32100 tokens, 32128 rows
    assert tokenizer.add_tokens(["<cat-toy>"]) == 1
    placeholder = tokenizer.convert_tokens_to_ids("<cat-toy>")
    assert placeholder == size < rows  # a learned row: at or past len(tokenizer), never the table's
    assert placeholder in tokenizer("a <cat-toy> on a table").input_ids

    for keep in ("spiece.model", "tokenizer.json"):  # either file alone is a T5 tokenizer
        folder = tmp_path / keep
        folder.mkdir()
        shutil.copy(os.path.join(dev, "tokenizer_2", keep), folder / keep)
        alone = load_t5_tokenizer(str(folder))
        assert len(alone) == size and alone(PROMPT).input_ids == tokenizer(PROMPT).input_ids


def test_t5_tokenizer_refusals_are_one_line(dev, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "spiece.model").write_bytes(b"\x00garbage" * 8)
    with pytest.raises(DamagedFile) as excinfo:
        load_t5_tokenizer(str(damaged))
    one_line(excinfo, str(damaged / "spiece.model"))
    with pytest.raises(UserError) as excinfo:
        load_t5_tokenizer(os.path.join(dev, "tokenizer"))  # CLIP's
    one_line(excinfo, "BPE", "tokenizer_2")  # tokenizer.json (transformers 5) or vocab.json + merges.txt (4.x)
    with pytest.raises(UserError) as excinfo:
        load_t5_tokenizer(os.path.join(dev, "vae"))
    one_line(excinfo, "spiece.model or tokenizer.json")


# --------------------------------------------------------------------------------------------
# Refusals: one line naming the file and the flag


def zeros(shapes):
    return {k: np.zeros(s, np.float32) for k, s in shapes.items()}


def _variant_file(split, tmp_path, name, inputs=None, extra=None):
    """The [dev] file's shapes, with img_in taking `inputs` and `extra` tensors added, as zeros."""
    raw = flux_files.SafetensorsFile(split["flux1-dev.safetensors"][0])
    shapes = dict(raw.shapes)
    if inputs:
        shapes["img_in.weight"] = (shapes["img_in.weight"][0], inputs)
    state = dict(zeros(shapes), **(extra or {}))
    return writer.save(writer.store(state, "bfloat16")[0], str(tmp_path / name))


@pytest.mark.parametrize("name, inputs, needle", [
    ("flux1-fill-dev.safetensors", 384, "Fill"),
    ("flux1-depth-dev.safetensors", 128, "Depth or Canny"),
    ("flux1-kontext-dev.safetensors", None, "Kontext"),
    ("odd.safetensors", 96, "96 inputs"),
])
def test_other_flux_models_are_refused(name, inputs, needle, split, tmp_path):
    path = _variant_file(split, tmp_path, name, inputs)
    with pytest.raises(UserError) as excinfo:
        flux_files.load_transformer(path)
    one_line(excinfo, "--pretrained_model_name_or_path", path, needle)


LORA_KEYS = {
    "kohya": "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
    "peft": "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
    "bfl": "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight",
}


@pytest.mark.parametrize("kind, state, flag, needle", [
    *[(f"lora-{k}", {key: np.zeros((4, 8), np.float32)}, "--pretrained_model_name_or_path", "a LoRA")
      for k, key in LORA_KEYS.items()],
    ("redux", {"redux_up.weight": np.zeros((8, 4), np.float32), "redux_down.weight": np.zeros((4, 8), np.float32)},
     "--pretrained_model_name_or_path", "Redux"),
    ("sd-checkpoint", {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4, 3, 3), np.float32),
                       "first_stage_model.encoder.conv_in.weight": np.zeros((4, 3, 3, 3), np.float32),
                       "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.zeros(4, np.float32)},
     "--pretrained_model_name_or_path", "Stable Diffusion"),
    ("ti-embedding", {"clip_l": np.zeros((1, 64), np.float32), "t5": np.zeros((1, 32), np.float32)},
     "--clip_l", "textual-inversion"),
    ("nf4", {"double_blocks.0.img_attn.qkv.weight.absmax": np.zeros(4, np.float32)},
     "--pretrained_model_name_or_path", "bitsandbytes"),
    ("diffusers-vae", {"encoder.down_blocks.0.resnets.0.conv1.weight": np.zeros((4, 4, 3, 3), np.float32)},
     "--ae", "diffusers' layout"),
    ("empty", {"something.else": np.zeros(3, np.float32)}, "--t5xxl", "not a T5 text encoder"),
])
def test_foreign_files_are_one_line(kind, state, flag, needle, tmp_path):
    path = writer.save(writer.store(state, "float32")[0], str(tmp_path / f"{kind}.safetensors"))
    part = next(p for p, f in flux_files.FLAGS.items() if f == flag)
    with pytest.raises(UserError) as excinfo:
        flux_files.LOADERS[part](path)
    one_line(excinfo, flag, path, needle)


@pytest.mark.parametrize("name, part, needle", [
    ("t5xxl_fp16.safetensors", "text_encoder", "a T5 text encoder, not a CLIP-L text encoder; pass it as --t5xxl"),
    ("clip_l.safetensors", "text_encoder_2", "a CLIP-L text encoder, not a T5 text encoder; pass it as --clip_l"),
    ("t5xxl_fp16.safetensors", "transformer", "pass it as --t5xxl"),
    ("ae.safetensors", "text_encoder_2", "pass it as --ae"),
    ("flux1-dev.safetensors", "vae", "pass it as --pretrained_model_name_or_path"),
])
def test_a_file_in_the_wrong_slot_is_one_line(name, part, needle, split):
    path = split[name][0]
    with pytest.raises(UserError) as excinfo:
        flux_files.LOADERS[part](path)
    one_line(excinfo, flux_files.FLAGS[part], path, needle)


def test_missing_parts_and_damaged_files_are_one_line(split, tmp_path):
    transformer = split["flux1-dev.safetensors"][0]
    with pytest.raises(UserError) as excinfo:
        flux_files.load_files(transformer, split["clip_l.safetensors"][0], None, split["ae.safetensors"][0])
    one_line(excinfo, "--t5xxl: missing", transformer, "t5xxl_fp16.safetensors")
    with pytest.raises(UserError) as excinfo:
        flux_files.load_files(transformer, str(tmp_path / "nowhere.safetensors"))
    one_line(excinfo, "--clip_l", "nowhere.safetensors", "no such file")
    truncated = tmp_path / "t5xxl_truncated.safetensors"
    truncated.write_bytes(open(split["t5xxl_fp16.safetensors"][0], "rb").read()[:-100])
    with pytest.raises(DamagedFile) as excinfo:
        flux_files.load_t5xxl(str(truncated))
    one_line(excinfo, "--t5xxl", str(truncated), "truncated")
    with pytest.raises(UserError) as excinfo:
        flux_files.load_transformer(str(tmp_path / "flux1-dev-Q8_0.gguf"))
    one_line(excinfo, "no such file")
    gguf = tmp_path / "flux1-dev-Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UserError) as excinfo:
        flux_files.load_transformer(str(gguf))
    one_line(excinfo, str(gguf), "GGUF")


def test_weights_that_do_not_fit_are_one_line(split, tmp_path):
    raw = flux_files.SafetensorsFile(split["t5xxl_fp16.safetensors"][0])
    state = zeros(raw.shapes)
    state["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 40), np.float32)
    path = writer.save(writer.store(state, "float16")[0], str(tmp_path / "misshapen.safetensors"))
    with pytest.raises(UserError) as excinfo:
        flux_files.load_t5xxl(path)
    one_line(excinfo, "--t5xxl", path, "encoder.block.1.layer.1.DenseReluDense.wo.weight", "(32, 40)")

    path = _variant_file(split, tmp_path, "extra.safetensors", extra={"double_blocks.0.img_attn.extra.weight": np.zeros(
        (2, 2), np.float32)})
    with pytest.raises(UserError) as excinfo:
        flux_files.load_transformer(path)
    one_line(excinfo, "--pretrained_model_name_or_path", path,
             "unexpected weight double_blocks.0.img_attn.extra.weight")

    raw = flux_files.SafetensorsFile(split["flux1-dev.safetensors"][0])
    state = zeros({k: v for k, v in raw.shapes.items() if k != "single_blocks.1.linear2.bias"})
    path = writer.save(writer.store(state, "bfloat16")[0], str(tmp_path / "incomplete.safetensors"))
    with pytest.raises(UserError) as excinfo:
        flux_files.load_transformer(path)
    one_line(excinfo, "--pretrained_model_name_or_path", path, "single_blocks.1.linear2.bias is missing")

    quantized = dict(writer.store(zeros(raw.shapes), "bfloat16")[0])
    config = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)  # ComfyUI's per-layer quantization config
    quantized["double_blocks.0.img_attn.qkv.comfy_quant"] = config
    path = writer.save(quantized, str(tmp_path / "nvfp4.safetensors"))
    with pytest.raises(UserError) as excinfo:
        flux_files.load_transformer(path)
    one_line(excinfo, "--pretrained_model_name_or_path", path, "double_blocks.0.img_attn.qkv is quantized as nvfp4")


def test_parts_of_different_models_are_one_line(split, tmp_path):
    config = t5.T5Config(vocab_size=320, d_model=48, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                         feed_forward_proj="gated-gelu")
    path = writer.save(writer.store(zeros(t5.param_shapes(config)), "float16")[0], str(tmp_path / "t5-48.safetensors"))
    with pytest.raises(UserError) as excinfo:
        flux_files.load_files(split["flux1-dev.safetensors"][0], split["clip_l.safetensors"][0], path,
                              split["ae.safetensors"][0])
    one_line(excinfo, "--t5xxl", path, "48-wide text states", "takes 32")


@pytest.mark.parametrize("pipeline_class, needle", [
    ("FluxFillPipeline", "FLUX.1 Fill"), ("FluxKontextPipeline", "FLUX.1 Kontext"),
    ("FluxPriorReduxPipeline", "FLUX.1 Redux"), ("FluxControlPipeline", "Depth or Canny"),
    ("StableDiffusionPipeline", "not a FLUX.1 pipeline"),
])
def test_other_flux_folders_are_one_line(pipeline_class, needle, dev, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    index = json.load(open(os.path.join(dev, "model_index.json")))
    json.dump(dict(index, _class_name=pipeline_class), open(folder / "model_index.json", "w"))
    with pytest.raises(UserError) as excinfo:
        flux_files.check_folder(str(folder))
    one_line(excinfo, str(folder), pipeline_class, needle)


def test_incomplete_or_relabelled_folders_are_one_line(dev, tmp_path):
    folder = tmp_path / "no-t5"
    shutil.copytree(dev, folder, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(UserError) as excinfo:
        flux_files.load_folder(str(folder))
    one_line(excinfo, str(folder), "text_encoder_2/")
    fill = tmp_path / "fill"
    shutil.copytree(dev, fill)
    config = json.load(open(fill / "transformer" / "config.json"))
    json.dump(dict(config, in_channels=384), open(fill / "transformer" / "config.json", "w"))
    with pytest.raises(UserError) as excinfo:
        flux_files.check_folder(str(fill))
    one_line(excinfo, str(fill), "384 inputs", "Fill")
    with pytest.raises(UserError) as excinfo:
        component_weights.read_config(os.path.join(dev, "text_encoder"), "t5")
    one_line(excinfo, "config.json", "not a T5 encoder")
