"""Original single-file Stable Diffusion checkpoints -> the LoadedModel a diffusers folder gives.

AUTOMATIC1111, Forge and ComfyUI keep a model as one `.safetensors` (or pickled `.ckpt`) file in
the original LDM / Stability layout:

  prefix                                holds                                        becomes
  model.diffusion_model.                the UNet (input_blocks, middle_block, ...)    unet
  model_ema.diffusion_model...          its EMA copy, dots removed from the names     unet, if the only copy
  first_stage_model.                    the VAE (encoder.down.N.block.M, ...)         vae
  cond_stage_model.transformer.         SD 1.x: CLIP ViT-L, transformers' names       text_encoder
  cond_stage_model.model.               SD 2.x: OpenCLIP ViT-H (fused in_proj, ln_1)  text_encoder
  conditioner.embedders.0.transformer.  SDXL: CLIP ViT-L, transformers' names         text_encoder
  conditioner.embedders.1.model.        SDXL: OpenCLIP bigG, with text_projection     text_encoder_2

The family comes from the keys (here), every size from the shapes, and what the weights cannot say
(head counts, activation, the 768-v prediction type, the noise schedule, the VAE's scaling) from
the family, as diffusers' configs for SD 1.5, SD 2.x and SDXL base 1.0 state them. Each part is
converted by a table from our (diffusers / transformers) names to the file's, built from the
config (`ldm_layout.py`: the families, the configs and the tables): every weight we need is looked
up by name and its shape checked, so a file that does not fit is one line naming the weight.

When a file holds both the UNet and its EMA copy, the `model.diffusion_model.` weights are used,
as diffusers' `from_single_file` and A1111 do; a file with only the EMA copy loads that.

SDXL fine-tunes trained for v-prediction with a zero-terminal-SNR schedule may say so with two
empty marker tensors, `v_pred` and `ztsnr` (ComfyUI's model detection reads them; `ztsnr` only
counts beside `v_pred`): they are honoured unless --prediction_type / --zero_terminal_snr say otherwise.
"""

import os
import warnings

import numpy as np

from .. import files
from ..errors import UserError, short_list
from . import clip, schedulers, unet, vae
from .clip_vocab import PAD_TOKENS, build_tokenizer
from .ldm_layout import (
    EMA, LABEL_EMB, REFINER_BIG_G, SDXL_PREFIX, TEXT_PARTS, UNET, VAE, check_unet_covered, convert, first_attention,
    text_config, text_names, unet_config, unet_names, vae_config, vae_names,
)
from .model_folder import resolve_model_dir
from .spec import LoadedModel
from .tokenizers import load_tokenizer
from .weights import unflatten

V_PRED, ZTSNR = "v_pred", "ztsnr"  # ComfyUI's marker tensors (see the module docstring)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES

# What else people keep next to their checkpoints, told by a key: (test, what it is).
_OTHER_FILES = (
    (lambda k: k.startswith(("lora_", "lycoris_")) or any(p in k for p in (".lora_", ".lora.", ".hada_")), "a LoRA"),
    (lambda k: k.startswith(("emb_params", "string_to_param", "clip_l", "clip_g")), "a textual-inversion embedding"),
    (lambda k: k.startswith(("down_blocks.", "mid_block.", "up_blocks.", "conv_in.")),
     "one diffusers component's weights (pass the model folder instead)"),
)
# Other models whose weights may sit under model.diffusion_model. too.
_OTHER_MODELS = (
    (lambda k: "joint_blocks." in k, "a Stable Diffusion 3 model"),
    (lambda k: "double_blocks." in k, "a Flux model"),
    (lambda k: k.startswith("control_model.") or "input_hint_block." in k, "a ControlNet"),
    (lambda k: k in ("edm_mean", "edm_vpred.sigma_max"), "an EDM-schedule SDXL model (Playground v2.5 or an "
     "EDM v-prediction fine-tune), whose noise schedule ti_flax does not train"),
)
# Parts of an SD checkpoint saved on their own (a file without a UNet).
_PARTS = (
    (lambda k: k.startswith(("encoder.down.", "decoder.up.", "quant_conv.", "post_quant_conv.", VAE)), "a VAE"),
    (lambda k: k.startswith(("cond_stage_model.", SDXL_PREFIX, "text_model.", "transformer.resblocks.")),
     "a text encoder"),
)


# --------------------------------------------------------------------------------------------
# The file's tensors: names and shapes first, arrays on demand


class Checkpoint:
    """A single file's tensors by name: shapes from the header, arrays read only when asked.

    `name(n)` is where a UNet weight `model.diffusion_model.X` lives: there, or in the EMA copy
    (`model_ema.diffusion_modelX` with the dots removed) when that is the file's only UNet.
    """

    def __init__(self, path, shapes, read):
        self.path, self.shapes, self._read = path, shapes, read
        self.unet_from_ema = not any(k.startswith(UNET) for k in shapes) and any(
            k.startswith(EMA + "diffusion_model") for k in shapes)

    def name(self, name):
        if self.unet_from_ema and name.startswith(UNET):
            return EMA + name[len("model."):].replace(".", "")
        return name

    def has(self, name):
        return self.name(name) in self.shapes

    def shape(self, name):
        return tuple(self.shapes[self.name(name)])

    def count(self, pattern):
        """How many n make `pattern.format(n)` a tensor of the file, counting from 0."""
        n = 0
        while self.has(pattern.format(n)):
            n += 1
        return n

    def read(self, names):
        """{file name: float32 array} of the file's tensors `names`."""
        return {k: np.asarray(v, dtype=np.float32) for k, v in self._read(sorted(set(names))).items()}

    def under(self, prefix):
        """This file with `prefix` before every name: a part saved on its own (A1111's VAE files
        hold `encoder.down.0...`) read with the names it has inside a whole checkpoint."""
        read = self._read
        return Checkpoint(self.path, {prefix + k: v for k, v in self.shapes.items()},
                          lambda names: {prefix + k: v for k, v in read([n[len(prefix):] for n in names]).items()})


def open_checkpoint(path, allow_pickle=False):
    """A Checkpoint over a `.safetensors` file, or a pickled `.ckpt` when `allow_pickle`.

    Raises UserError: a pickle without allow_pickle (unpickling can run code), or a damaged or
    truncated file (files.DamagedFile).
    """
    if os.path.splitext(path)[1].lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"{path}: a pickled checkpoint, which can run code when loaded; pass --allow_pickle only "
                "for a file you trust, or use the model's .safetensors file"
            )
        warnings.warn(f"unpickling {path} (--allow_pickle): this can run code; use only files you trust",
                      stacklevel=3)
        data = files.read_torch(path, allow_pickle=True)
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]  # a PyTorch Lightning checkpoint: the weights and training state
        if not isinstance(data, dict):
            raise files.DamagedFile(path, f"not a checkpoint (holds a {type(data).__name__}, expected a dict)", None)
        tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
        return Checkpoint(path, {k: v.shape for k, v in tensors.items()}, lambda names: {k: tensors[k] for k in names})
    import ml_dtypes  # noqa: F401  (safetensors' numpy reader knows bfloat16 once it is imported)

    shapes = {k: shape for k, (shape, _) in files.safetensors_shapes(path).items()}
    return Checkpoint(path, shapes, lambda names: files.read_safetensors(path, keys=names))


# --------------------------------------------------------------------------------------------
# What the file is


def detect_layout(ckpt, layouts):
    """The one of `layouts` (ldm_layout.SingleFileLayout, each family's) that a checkpoint is in; a
    one-line UserError naming what else it is."""
    path, names = ckpt.path, list(ckpt.shapes)
    if not names:
        raise UserError(f"{path}: holds no tensors; not a Stable Diffusion checkpoint")
    for matches, what in _OTHER_MODELS:
        if any(matches(k) for k in names):
            raise UserError(f"{path}: {what}, not a Stable Diffusion 1.x/2.x or SDXL checkpoint")
    if not (any(k.startswith(UNET) for k in names) or ckpt.unet_from_ema):
        for matches, what in _OTHER_FILES:
            found = [k for k in names if matches(k)]
            if found:
                raise UserError(f"{path}: {what} (tensors like {found[0]}), not a Stable Diffusion checkpoint")
        parts = [what for matches, what in _PARTS if any(matches(k) for k in names)]
        if parts:
            raise UserError(f"{path}: {' and '.join(parts)} only (no UNet, {UNET}*), not a complete Stable "
                            "Diffusion checkpoint")
        raise UserError(f"{path}: not a Stable Diffusion checkpoint (no {UNET}* UNet); its {len(names)} tensors "
                        f"are like {short_list(sorted(names)[:3])}")
    if any(k.startswith(REFINER_BIG_G) for k in names):
        raise UserError(f"{path}: an SDXL refiner (one text encoder, OpenCLIP bigG at {REFINER_BIG_G}*); ti_flax "
                        "trains SDXL base models and their fine-tunes, whose prompts go through CLIP ViT-L and bigG")
    if not ckpt.has(UNET + "input_blocks.0.0.weight"):
        raise UserError(f"{path}: the UNet has no {UNET}input_blocks.0.0.weight; not an SD 1.x/2.x or SDXL UNet")
    if not any(k.startswith(VAE) for k in names):
        raise UserError(f"{path}: has a UNet but no VAE ({VAE}*); not a complete Stable Diffusion checkpoint")
    present = {e.prefix for f in layouts for e in f.encoders if any(k.startswith(e.prefix) for k in names)}
    texts = [f for f in layouts if present & {e.prefix for e in f.encoders}]
    if not texts:
        prefixes = [e.prefix + "*" for f in layouts for e in f.encoders]
        raise UserError(f"{path}: has a UNet but no text encoder ({', '.join(prefixes[:-1])} or {prefixes[-1]}); "
                        "not a complete Stable Diffusion checkpoint")
    if len(texts) > 1:
        raise UserError(f"{path}: holds the text encoders of {' and '.join(f.title for f in texts)} "
                        f"({', '.join(f.text for f in texts)}); the file mixes two model families")
    text = texts[0]
    missing = [e for e in text.encoders if e.prefix not in present]
    if missing:
        raise UserError(f"{path}: an {text.title} checkpoint without its {missing[0].title} text encoder "
                        f"({missing[0].prefix}*); {text.title} needs {text.text}")
    # The UNet's kind: 1x1-conv or linear attention projections, with or without added conditioning.
    linear = len(ckpt.shape(first_attention(ckpt) + "proj_in.weight")) == 2
    added = ckpt.has(LABEL_EMB + "0.weight")
    unets = [f for f in layouts if (f.linear_projection, f.added_conditioning) == (linear, added)]
    if text not in unets:
        unet = f"{unets[0].title}'s ({unets[0].unet})" if unets else "of no family ti_flax trains"
        raise UserError(f"{path}: the text encoder is {text.title}'s {text.text} but the UNet is "
                        f"{unet}; the file mixes two model families")
    in_channels = ckpt.shape(UNET + "input_blocks.0.0.weight")[1]
    if in_channels != 4:
        raise UserError(f"{path}: the {text.title} UNet takes {in_channels} input channels (an inpainting or "
                        "instruct-pix2pix model); ti_flax trains text-to-image models (4 channels)")
    return text


def markers(ckpt):
    """{"prediction_type": "v_prediction", "zero_terminal_snr": True} as far as the file's marker
    tensors say (ComfyUI: `v_pred`, and `ztsnr` beside it); {} for a file without them."""
    if V_PRED not in ckpt.shapes:
        return {}
    return {"prediction_type": "v_prediction", **({"zero_terminal_snr": True} if ZTSNR in ckpt.shapes else {})}


def read_single_file(ckpt, family, prediction_type="epsilon"):
    """({part: config dict}, {part: float32 params tree}) of an opened checkpoint in the layout
    `family` (an ldm_layout.SingleFileLayout): "text_encoder", "unet", "vae", and "text_encoder_2"
    for a second text encoder (SDXL's).

    Raises UserError (one line) for anything that is not a complete checkpoint of the family.
    """
    sample_size = family.sample_size
    if family.v_sample_size and prediction_type == "v_prediction":
        sample_size = family.v_sample_size  # SD 2.x 768-v
    texts = {part: clip.CLIPTextConfig.from_dict(text_config(ckpt, family, encoder))
             for part, encoder in zip(TEXT_PARTS, family.encoders)}
    pooled_dim = texts["text_encoder_2"].projection_dim if "text_encoder_2" in texts else None
    vae_dict = dict(vae_config(ckpt, family.scaling_factor))
    vae_dict["sample_size"] = sample_size * 2 ** (len(vae_dict["block_out_channels"]) - 1)  # pixels
    owned = {"unet": unet.UNetConfig.from_dict(unet_config(ckpt, family, sample_size, pooled_dim)),
             "vae": vae.VAEConfig.from_dict(vae_dict), **texts}
    context = sum(t.hidden_size for t in texts.values())  # SDXL: both encoders' states side by side
    if owned["unet"].cross_dims[0] != context:
        raise UserError(f"{ckpt.path}: the UNet attends to {owned['unet'].cross_dims[0]}-wide text states but the "
                        f"text encoder{'s are' if len(texts) > 1 else ' is'} {context} wide; the parts do not belong "
                        "together")
    tables = {"unet": unet_names(owned["unet"]), "vae": vae_names(owned["vae"]),
              **{part: text_names(texts[part], encoder) for part, encoder in zip(TEXT_PARTS, family.encoders)}}
    check_unet_covered(ckpt, tables["unet"])
    shapes = {"unet": unet.param_shapes(owned["unet"]), "vae": vae.param_shapes(owned["vae"]),
              **{part: clip.param_shapes(config) for part, config in texts.items()}}
    whats = {"unet": "UNet", "vae": "VAE", **{part: f"{family.title} {encoder.title} text encoder"
                                               for part, encoder in zip(TEXT_PARTS, family.encoders)}}
    params = {part: unflatten(convert(ckpt, tables[part], shapes[part], whats[part])) for part in tables}
    return {part: c.to_dict() for part, c in owned.items()}, params


def load_vae(path, scaling_factor, allow_pickle=False, check=None):
    """(vae.VAEConfig, float32 params tree) of a VAE in the original layout: a VAE file as A1111's
    models/VAE holds (`encoder.down.N...`, `decoder.up.N...`), or the `first_stage_model.*` of a
    whole checkpoint. `scaling_factor` is the model's: a VAE file does not state its latents' scale.

    `check(config)` (e.g. that the model's UNet takes its latents) runs before the weights are read.
    Raises UserError (one line): not a file, a pickle without allow_pickle, a VAE in diffusers'
    layout (its folder, with config.json, is what to pass), or no VAE at all.
    """
    flag = "--pretrained_vae_model_name_or_path"
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path!r}: {'not a file' if os.path.exists(path) else 'no such file or folder'}")
    ckpt = open_checkpoint(path, allow_pickle)
    names = list(ckpt.shapes)
    if not any(k.startswith(VAE) for k in names):
        if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in names):
            raise UserError(f"{flag} {path}: a VAE in diffusers' layout; pass the folder that holds it and its "
                            "config.json (an AutoencoderKL folder or Hub id)")
        if not any(k.startswith(("encoder.down.", "decoder.up.")) for k in names):
            raise UserError(f"{flag} {path}: not a VAE (no encoder.down.* / decoder.up.* tensors, nor {VAE}*)")
        ckpt = ckpt.under(VAE)
    config = vae.VAEConfig.from_dict(vae_config(ckpt, scaling_factor))
    if check is not None:
        check(config)
    return config, unflatten(convert(ckpt, vae_names(config), vae.param_shapes(config), "VAE"))


# --------------------------------------------------------------------------------------------
# The LoadedModel


def load(path, layouts, make_spec, revision=None, tokenizer_name=None, prediction_type=None, allow_pickle=False,
         zero_terminal_snr=None):
    """The LoadedModel of a single-file SD 1.x/2.x or SDXL checkpoint, as a folder of its family gives.

    Args:
      path: a `.safetensors` file (or `.ckpt` with `allow_pickle`) in the original layout.
      layouts: the ldm_layout.SingleFileLayout of every family that has one; the file's is detected.
      make_spec: `make_spec(layout name, {part: owned config}, prediction_type, num_train_timesteps,
        tokenizers) -> ModelSpec`, the detected family's spec of its parts.
      revision, tokenizer_name: a tokenizer folder or Hub id to use instead of the built-in CLIP one
        (one text encoder only: a file of two brings none, and two are needed).
      prediction_type: "epsilon" or "v_prediction"; None: the file's `v_pred` marker, else epsilon,
        with a warning where the layout cannot tell (SD 2.x: a 768-v model looks like the base).
      allow_pickle: unpickle a `.ckpt` (it can run code: trusted files only).
      zero_terminal_snr: True / False to rescale the noise schedule to zero terminal SNR or not;
        None: the file's `ztsnr` marker (beside `v_pred`), else not.
    Returns:
      the LoadedModel; its `notes` say which settings came from the file's markers.
    Raises:
      UserError (one line) before anything is written, for anything but a complete checkpoint.
    """
    if not os.path.isfile(path):
        what = "not a file" if os.path.exists(path) else "no such file"
        raise UserError(f"--pretrained_model_name_or_path {path!r}: {what}")
    ckpt = open_checkpoint(path, allow_pickle)
    family = detect_layout(ckpt, layouts)
    if tokenizer_name and len(family.encoders) > 1:
        raise UserError(f"--tokenizer_name: not supported for {family.title} models, which carry "
                        f"{len(family.encoders)} tokenizers; drop the flag to use the model's own")
    marked, notes = markers(ckpt), []
    if prediction_type is None and "prediction_type" in marked:
        prediction_type = marked["prediction_type"]
        notes.append(f"{prediction_type} from the file's {V_PRED} key")
    if zero_terminal_snr is None and "zero_terminal_snr" in marked:
        zero_terminal_snr = True
        notes.append(f"zero terminal SNR from the file's {ZTSNR} key")
    configs, params = read_single_file(ckpt, family, prediction_type or "epsilon")
    if prediction_type is None and family.prediction_unknown:
        warnings.warn(f"{path} is an {family.title} model: using epsilon prediction (the base model, 512 px); for a "
                      "768-v model pass --prediction_type v_prediction (the weights cannot tell them apart)",
                      stacklevel=2)
    prediction_type = prediction_type or "epsilon"
    if tokenizer_name:
        tokenizers = [load_tokenizer(resolve_model_dir(tokenizer_name, revision))]
    else:  # the CLIP tokenizer(s) the family's diffusers folders ship (single files carry none)
        tokenizers = [build_tokenizer(pad_token=PAD_TOKENS[encoder.pad]) for encoder in family.encoders]
    for part, tokenizer in zip(TEXT_PARTS, tokenizers):
        if configs[part]["vocab_size"] != len(tokenizer):
            raise UserError(f"{path}: the text encoder has {configs[part]['vocab_size']} token rows but the "
                            f"tokenizer has {len(tokenizer)}; pass the model's own tokenizer with --tokenizer_name")
    scheduler_config = schedulers.with_zero_terminal_snr(dict(family.scheduler, prediction_type=prediction_type),
                                                         zero_terminal_snr)
    owned = {"unet": unet.UNetConfig.from_dict(configs["unet"]), "vae": vae.VAEConfig.from_dict(configs["vae"]),
             **{part: clip.CLIPTextConfig.from_dict(configs[part]) for part in TEXT_PARTS if part in configs}}
    spec = make_spec(family.name, owned, prediction_type, scheduler_config["num_train_timesteps"], tokenizers)
    return LoadedModel(spec, params, tokenizers[0], schedulers.alphas_cumprod(scheduler_config), path,
                       scheduler_config, tokenizers[1] if len(tokenizers) > 1 else None, notes=tuple(notes))
