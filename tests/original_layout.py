"""diffusers folders -> one file in the original (LDM / Stability) key layout, as A1111, Forge and
ComfyUI keep models: the tests' own mapping, written independently of ti_flax's loader
(ti_flax/models/single_file.py) so that loading the file back checks the loader; and what the
single-file tests share to check it (tests/test_single_file.py, tests/test_sdxl_single_file.py)."""

import json
import os
import warnings

import numpy as np

from ti_flax import families
from ti_flax.models.weights import flatten

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's


def _resnet(rest, table):
    for ours, theirs in table:
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def unet_key(name, config):
    """diffusers UNet2DConditionModel name -> `input_blocks.N.M...` name (without the prefix)."""
    per = config["layers_per_block"] + 1  # resnets per level in the input blocks, +downsampler
    module, leaf = name.rsplit(".", 1)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    p = name.split(".")
    if p[0] == "mid_block":
        slot = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
        rest = ".".join(p[3:])
        return f"middle_block.{slot}." + (_resnet(rest, _UNET_RESNET) if p[1] == "resnets" else rest)
    i = int(p[1])
    if p[0] == "down_blocks":
        if p[2] == "downsamplers":  # down_blocks.i.downsamplers.0.conv.weight
            return f"input_blocks.{(i + 1) * per}.0.op.{p[-1]}"
        block, rest = 1 + i * per + int(p[3]), ".".join(p[4:])
        return f"input_blocks.{block}.0.{_resnet(rest, _UNET_RESNET)}" if p[2] == "resnets" else \
            f"input_blocks.{block}.1.{rest}"
    if p[2] == "upsamplers":  # the last output block of the level, after its attention if it has one
        slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
        return f"output_blocks.{i * per + per - 1}.{slot}.conv.{p[-1]}"
    block, rest = i * per + int(p[3]), ".".join(p[4:])
    return f"output_blocks.{block}.0.{_resnet(rest, _UNET_RESNET)}" if p[2] == "resnets" else \
        f"output_blocks.{block}.1.{rest}"


def vae_key(name, levels):
    """diffusers AutoencoderKL name -> `encoder.down.N.block.M...` name, and whether a Linear was a 1x1 conv."""
    p = name.split(".")
    if p[1] in ("conv_norm_out",):
        return f"{p[0]}.norm_out.{p[-1]}", False
    if p[1] == "mid_block":
        if p[2] == "resnets":
            return f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}", False
        rest = ".".join(p[4:])
        renames = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
        for ours, theirs in renames:
            if rest.startswith(ours + "."):
                return f"{p[0]}.mid.attn_1.{theirs}{rest[len(ours):]}", ours != "group_norm"
    if p[1] in ("down_blocks", "up_blocks"):
        level = int(p[2]) if p[0] == "encoder" else levels - 1 - int(p[2])
        where = f"{p[0]}.{'down' if p[0] == 'encoder' else 'up'}.{level}"
        if p[3] in ("downsamplers", "upsamplers"):
            return f"{where}.{'downsample' if p[0] == 'encoder' else 'upsample'}.conv.{p[-1]}", False
        rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{where}.block.{p[4]}.{rest}", False
    return name, False


def open_clip_keys(text, extra_layer, rng, prefix="cond_stage_model.model."):
    """transformers CLIPTextModel(WithProjection) weights -> OpenCLIP's (fused in_proj, ln_1, c_fc, ...);
    with `extra_layer`, the whole tower as SD 2.x's original checkpoints hold it: a last resblock
    SD 2.x does not use, the projection and the logit scale (without: as diffusers' conversion back
    writes it). SDXL's bigG (`text_projection.weight` in `text`): every block, its projection stored
    transposed ([hidden, projection], used as x @ text_projection) and the logit scale."""
    out = {}
    tm = "text_model."
    out[prefix + "token_embedding.weight"] = text[tm + "embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = text[tm + "embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = text[tm + "final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = text[tm + "final_layer_norm.bias"]
    hidden = out[prefix + "ln_final.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in text if k.startswith(tm + "encoder.layers."))
    for i in range(layers + (1 if extra_layer else 0)):
        # The extra (unused) last block: the one before it, shifted, so using it would show.
        src, shift = f"{tm}encoder.layers.{min(i, layers - 1)}.", 0.0 if i < layers else 1.0
        dst = f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = shift + np.concatenate(
                [text[f"{src}self_attn.{q}_proj.{leaf}"] for q in ("q", "k", "v")])
            out[f"{dst}attn.out_proj.{leaf}"] = shift + text[f"{src}self_attn.out_proj.{leaf}"]
            out[f"{dst}ln_1.{leaf}"] = shift + text[f"{src}layer_norm1.{leaf}"]
            out[f"{dst}ln_2.{leaf}"] = shift + text[f"{src}layer_norm2.{leaf}"]
            out[f"{dst}mlp.c_fc.{leaf}"] = shift + text[f"{src}mlp.fc1.{leaf}"]
            out[f"{dst}mlp.c_proj.{leaf}"] = shift + text[f"{src}mlp.fc2.{leaf}"]
    if "text_projection.weight" in text:
        out[prefix + "text_projection"] = np.ascontiguousarray(text["text_projection.weight"].T)
        out[prefix + "logit_scale"] = np.array(4.6, np.float32)
    elif extra_layer:  # the whole tower, as open_clip saves it
        out[prefix + "text_projection"] = rng.standard_normal((hidden, hidden)).astype(np.float32)
        out[prefix + "logit_scale"] = np.array(4.6, np.float32)
    return out


def to_original(model_dir, family, ema=None, seed=0, whole_text_tower=True):
    """{original key: array} of a diffusers folder, as A1111 / ComfyUI save it.

    family: "sd1", "sd2" or "sdxl" (CLIP-L at conditioner.embedders.0.transformer., bigG at
    conditioner.embedders.1.model., the UNet's added conditioning at label_emb.0).
    ema: None (no EMA copy), "only" (the UNet only as model_ema.*), "both" (model_ema.* holds
    other values: the loader must take model.diffusion_model.*).
    whole_text_tower: SD 2.x's OpenCLIP tower with its unused last block and projection, as in the
    original checkpoints (False: only the blocks SD uses, as a file converted from diffusers has).
    """
    model = families.load_model(model_dir)
    params = {part: flatten(tree) for part, tree in model.params.items()}
    rng = np.random.default_rng(seed)
    unet_config = json.load(open(os.path.join(model_dir, "unet", "config.json")))
    vae_levels = len(json.load(open(os.path.join(model_dir, "vae", "config.json")))["block_out_channels"])
    out = {}
    for name, value in params["unet"].items():
        key = unet_key(name, unet_config)
        if ema != "only":
            out["model.diffusion_model." + key] = value
        if ema:
            flat = "model_ema.diffusion_model" + key.replace(".", "")
            out[flat] = value if ema == "only" else value + 1.0
    if ema:
        out["model_ema.decay"] = np.array(0.9999, np.float32)
        out["model_ema.num_updates"] = np.array(1000, np.int32)
    for name, value in params["vae"].items():
        key, was_conv = vae_key(name, vae_levels)
        out["first_stage_model." + key] = value[:, :, None, None] if was_conv and value.ndim == 2 else value
    if family in ("sd1", "sdxl"):
        clip_l = "cond_stage_model.transformer." if family == "sd1" else "conditioner.embedders.0.transformer."
        for name, value in params["text_encoder"].items():
            out[clip_l + name] = value
        out[clip_l + "text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    else:
        out.update(open_clip_keys(params["text_encoder"], extra_layer=whole_text_tower, rng=rng))
    if family == "sdxl":
        out.update(open_clip_keys(params["text_encoder_2"], False, rng, prefix="conditioner.embedders.1.model."))
    else:  # the DDPM buffers every SD 1.x / 2.x original checkpoint carries
        out["alphas_cumprod"] = np.asarray(model.alphas_cumprod, np.float32)
        out["betas"] = np.linspace(0.00085, 0.012, 1000, dtype=np.float32)
    return out


def save_original(state, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    return path


def zeros(*shape):
    """A float32 tensor of zeros, for files whose keys and shapes are all that matter."""
    return np.zeros(shape, np.float32)


def load_warned(path, **kwargs):
    """(families.load_model(path, **kwargs), the messages of the warnings it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = families.load_model(path, **kwargs)
    return model, [str(w.message) for w in caught]


def assert_same_weights(got, want, what):
    """Two params trees hold the same names and bitwise the same float32 values."""
    got, want = flatten(got), flatten(want)
    assert sorted(got) == sorted(want), what
    for name in want:
        assert got[name].dtype == np.float32, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")


def run_train_cli(model, tmp_path, capsys, *extra):
    """The training command's one error line for `model`, checked to exit 2 having written nothing."""
    from ti_flax.commands.train import main

    out = tmp_path / "out"
    code = main(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(tmp_path),
                 "--placeholder_token", "<x>", "--initializer_token", "toy", "--output_dir", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err
