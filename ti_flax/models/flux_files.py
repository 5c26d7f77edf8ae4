"""FLUX.1 [dev] and [schnell] as their users keep them: a diffusers folder, or the files ComfyUI,
Forge and kohya's sd-scripts keep apart (kohya's flags name them):

  file (flag)                          holds                                 names
  flux1-dev.safetensors (the model)    the transformer, bf16 / fp16 / fp8    BFL's (bfl_layout.py)
  clip_l.safetensors (--clip_l)        CLIP ViT-L's text model               transformers', with or without
                                                                             `text_model.`; a text_projection and
                                                                             logit_scale may ride along
  t5xxl_fp16.safetensors,              T5-XXL v1.1's encoder                 transformers' (`shared.weight`,
  t5xxl_fp8_e4m3fn.safetensors (--t5xxl)                                     `encoder.block.N...`)
  ae.safetensors / ae.sft (--ae)       the autoencoder (16 latent channels)  the original LDM VAE's, without
                                                                             `first_stage_model.` and quant convs

ComfyUI's all-in-one checkpoints (Comfy-Org's flux1-dev-fp8.safetensors) hold all four, under
`model.diffusion_model.`, `text_encoders.clip_l.transformer.`, `text_encoders.t5xxl.transformer.`
and `vae.`: each part is looked for under its own file's names and under those prefixes.

Precision. Weights are read in the dtype they are stored in (float32, bf16, fp16, or fp8:
float8_e4m3fn / e5m2, which numpy reads through ml_dtypes) and converted one at a time to the asked
dtype (`dtype=`, float32 by default), so FLUX.1 [dev] (12B weights) loads as bf16 in 24 GB without
a 48 GB float32 copy. ComfyUI's *scaled* fp8 files store each Linear's weight divided by a
per-tensor scale, `<module>.scale_weight` (with a `scaled_fp8` marker; newer files:
`<module>.weight_scale` with a `comfy_quant` config or `_quantization_metadata`); the weight is
`float32(fp8) * scale` (ComfyUI multiplies the same way, in its compute dtype), then converted.
The activation scales (`scale_input`, `input_scale`) only serve fp8 matmuls and are ignored. Other
quantizations (NF4, GGUF, int8, nvfp4) are refused in one line.

What a file is, is told by its keys (`describe`), and a file in the wrong slot, or a model ti_flax
does not train, is one UserError naming the flag and the file:
  * FLUX.1 Fill: img_in takes 384 inputs (latents, masked image, mask); Depth / Canny: 128
    (latents and the control image's); [dev] / [schnell]: 64. Folders: model_index.json's
    `_class_name` (FluxFillPipeline, FluxControlPipeline, ...).
  * FLUX.1 Kontext [dev] has [dev]'s keys and shapes exactly (it learned to read a reference
    image's tokens appended to the sequence, which changes no weight's shape): a folder says so
    (FluxKontextPipeline); a file only by its name (BFL's is flux1-kontext-dev.safetensors), so a
    renamed Kontext file loads as [dev].
  * FLUX.1 Redux is an image embedder (`redux_up`, `redux_down`), not a transformer
    (FluxPriorReduxPipeline folders).
  * A LoRA (kohya's lora_unet_*, PEFT's lora_A / lora_B, lora_down / lora_up, LyCORIS), a
    textual-inversion embedding, an SD 1.x/2.x/SDXL/SD3 checkpoint, FLUX.2, Chroma, a ControlNet,
    a T5 file as --clip_l and the reverse, a part missing.

`load_files` (the files) and `load_folder` (a diffusers folder) return each part's owned config
and params (`{"transformer", "text_encoder", "text_encoder_2", "vae"}`), checked to fit together.
"""

import contextlib
import json
import os
import struct
import types

import numpy as np

from .. import files
from ..errors import UserError, short_list
from . import bfl_layout, clip, component_weights, flux, ldm_layout, t5, vae
from .model_folder import class_name
from .single_file import Checkpoint
from .weights import unflatten

PARTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
FLAGS = {"transformer": "--pretrained_model_name_or_path", "text_encoder": "--clip_l", "text_encoder_2": "--t5xxl",
         "vae": "--ae"}
TITLES = {"transformer": "a FLUX.1 transformer", "text_encoder": "a CLIP-L text encoder",
          "text_encoder_2": "a T5 text encoder", "vae": "a FLUX.1 autoencoder (ae)"}
FILE_NAMES = {"transformer": "flux1-dev.safetensors or flux1-schnell.safetensors", "text_encoder": "clip_l.safetensors",
              "text_encoder_2": "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors", "vae": "ae.safetensors"}
# Where a part's weights sit: in its own file, or in a ComfyUI all-in-one checkpoint.
PREFIXES = {"transformer": ("", "model.diffusion_model."), "text_encoder": ("", "text_encoders.clip_l.transformer."),
            "text_encoder_2": ("", "text_encoders.t5xxl.transformer."), "vae": ("", "vae.")}
# A key that says the part is there (under one of its prefixes).
_MARKERS = {"transformer": ("double_blocks.0.img_attn.norm.key_norm.scale",),
            "text_encoder": ("text_model.encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.mlp.fc1.weight"),
            "text_encoder_2": ("encoder.block.0.layer.0.SelfAttention.q.weight",),
            "vae": ("encoder.down.0.block.0.conv1.weight",)}

# FLUX.1's VAE config values a file cannot state (its vae/config.json's).
VAE_CONFIG = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "sample_size": 1024}
LATENT_CHANNELS = 16
# FLUX.1 [dev]'s and [schnell]'s scheduler/scheduler_config.json, for a model read from files.
SCHEDULERS = {
    "dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096},
    "schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096},
}
# model_index.json pipeline classes: FLUX.1 [dev] / [schnell] weights, and the other FLUX models.
PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")  # one model, three pipelines
_OTHER_PIPELINES = (
    ("FluxKontext", "FLUX.1 Kontext (an image-editing model)"),
    ("FluxFill", "FLUX.1 Fill (an inpainting and outpainting model)"),
    ("FluxPriorRedux", "FLUX.1 Redux (an image-prompt adapter, not a text-to-image model)"),
    ("FluxControlNet", "a FLUX.1 ControlNet pipeline"),
    ("FluxControl", "FLUX.1 Depth or Canny (a structure-conditioned model)"),
    ("Flux2", "a FLUX.2 model"),
)
_TRAINS = "ti_flax trains FLUX.1 [dev] and [schnell]"

# Keys that carry quantization details beside a weight, not weights themselves (see the docstring).
_AUX_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".weight_scale_2", ".comfy_quant")
_AUX_NAMES = ("scaled_fp8", "spiece_model")  # ComfyUI's scaled-fp8 marker; a T5 file's embedded tokenizer
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def _is_aux(name):
    return name.endswith(_AUX_SUFFIXES) or name.rsplit(".", 1)[-1] in _AUX_NAMES


# --------------------------------------------------------------------------------------------
# A safetensors file, tensor by tensor, in any stored dtype


def _numpy_dtypes():
    import ml_dtypes

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
            "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """A safetensors file's header, and its tensors read one at a time in their stored dtype.

    safetensors' own numpy reader has no fp8 (it asks numpy for `float8_e4m3fn`), so this reads the
    format itself: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the bytes. A damaged or truncated file is a DamagedFile naming it.
    Quantization details (see the module docstring) are read when the file is opened, so a format
    ti_flax cannot read is refused before any weight is.
    """

    def __init__(self, path, label=None):
        self.path = os.fspath(path)
        self.label = label or self.path  # messages name it so: the flag and the file
        with self._reading():
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size - 8:
                    raise ValueError(f"header of {length} bytes in a {size}-byte file")
                header = json.loads(f.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            self.start, self.entries, dtypes = 8 + length, {}, _numpy_dtypes()
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                shape = tuple(int(n) for n in entry["shape"])
                dtype = entry["dtype"]
                if dtype in dtypes and end - begin != int(np.prod(shape)) * np.dtype(dtypes[dtype]).itemsize:
                    raise ValueError(f"tensor {name} has {end - begin} bytes for {dtype} {list(shape)}")
                self.entries[name] = (dtype, shape, int(begin))
                if self.start + end > size:
                    raise files.DamagedFile(self.path, f"truncated (tensor {name} ends at byte {self.start + end} of "
                                                       f"{size})")
        self.shapes = {name: shape for name, (_, shape, _) in self.entries.items()}
        self.formats = self._quantization()

    @contextlib.contextmanager
    def _reading(self, what="a safetensors file"):
        """files.reading, its DamagedFile naming the file as `label` does (with its flag)."""
        try:
            with files.reading(self.path, what):
                yield
        except files.DamagedFile as err:
            if self.label == self.path or not err.path == self.path:
                raise
            raise files.DamagedFile(self.label, err.problem) from None

    def dtype(self, name):
        """The stored dtype's safetensors name ("BF16", "F8_E4M3", ...)."""
        return self.entries[name][0]

    def read(self, names):
        """{name: numpy array} in the stored dtypes."""
        dtypes, out = _numpy_dtypes(), {}
        with self._reading():
            with open(self.path, "rb") as f:
                for name in names:
                    dtype, shape, begin = self.entries[name]
                    if dtype not in dtypes:
                        raise UserError(f"{self.label}: tensor {name} is stored as {dtype}, which ti_flax cannot read; "
                                        "use the bf16, fp16 or fp8 file")
                    f.seek(self.start + begin)
                    count = int(np.prod(shape))
                    array = np.fromfile(f, dtype=dtypes[dtype], count=count)
                    if array.size != count:
                        raise files.DamagedFile(self.path, f"truncated (tensor {name})")
                    out[name] = array.reshape(shape)
        return out

    def read_as(self, names, dtype):
        """{name: array in `dtype`}: float tensors dequantized (fp8 times its scale) and converted;
        other tensors as stored."""
        import jax.numpy as jnp

        out = {}
        for name in names:
            array = self.read([name])[name]
            scale = self.scale(name)
            if scale is not None:
                array = array.astype(np.float32) * scale
            if jnp.issubdtype(array.dtype, jnp.floating) and array.dtype != dtype:
                array = array.astype(dtype)
            out[name] = array
        return out

    def scale(self, name):
        """The float32 scale a scaled-fp8 weight `name` is multiplied by (broadcast over its rows),
        or None for a weight stored as it is."""
        if not name.endswith(".weight"):
            return None
        module = name[:-len(".weight")]
        key = next((module + s for s in (".scale_weight", ".weight_scale") if module + s in self.entries), None)
        if key is None:
            return None
        scale = self.read([key])[key].astype(np.float32)
        rows = self.shapes[name][0] if self.shapes[name] else 1
        if scale.size == 1:
            return scale.reshape(())
        if scale.size == rows and scale.shape in ((rows,), (rows, 1)):  # one scale per output row
            return scale.reshape((rows,) + (1,) * (len(self.shapes[name]) - 1))
        raise UserError(f"{self.label}: {key} has shape {list(scale.shape)}, not one scale per tensor or per row "
                        f"of {name}; ti_flax cannot read this quantization")

    def _quantization(self):
        """{module: format} of ComfyUI's quantized layers; UserError for a format other than fp8."""
        formats = {}
        raw = self.metadata.get("_quantization_metadata")
        if raw:
            with self._reading("a safetensors file with quantization metadata"):
                layers = json.loads(raw).get("layers", {})
            formats.update({k: (v.get("format") if isinstance(v, dict) else v) for k, v in layers.items()})
        configs = [n for n in self.entries if n.endswith(".comfy_quant")]
        for name, value in self.read(configs).items():
            with self._reading("a safetensors file with comfy_quant configs"):
                formats[name[:-len(".comfy_quant")]] = json.loads(value.tobytes()).get("format")
        for name in self.entries:
            if name.endswith(".scale_weight"):
                formats.setdefault(name[:-len(".scale_weight")], "float8_e4m3fn")
        bad = {k: v for k, v in formats.items() if v not in _FP8_FORMATS}
        if bad:
            module, fmt = next(iter(sorted(bad.items())))
            raise UserError(f"{self.label}: {module} is quantized as {fmt}, which ti_flax cannot read; use the bf16, "
                            "fp16 or fp8 file")
        return formats


class WeightFile(Checkpoint):
    """A view of a SafetensorsFile under other names (a prefix removed or added), read in any dtype.

    A single_file.Checkpoint (has / shape / count / read), so ldm_layout's configs, tables and
    `convert` read it; `read` gives dequantized float32, `read_as` any dtype. `path` is what
    messages name: the flag and the file.
    """

    def __init__(self, label, raw, names):
        self.raw, self.names = raw, names  # {view name: file name}
        super().__init__(label, {view: raw.shapes[name] for view, name in names.items()}, None)

    def view(self, strip="", add=""):
        """The names starting with `strip`, with `strip` replaced by `add`."""
        names = {add + v[len(strip):]: f for v, f in self.names.items() if v.startswith(strip)}
        return WeightFile(self.path, self.raw, names)

    def under(self, prefix):
        return self.view(add=prefix)

    def renamed(self, rename):
        """The view with every name `n` called `rename(n)`."""
        return WeightFile(self.path, self.raw, {rename(v): f for v, f in self.names.items()})

    def read(self, names):
        return self.read_as(names, np.float32)

    def read_as(self, names, dtype):
        got = self.raw.read_as([self.names[n] for n in names], dtype)
        return {n: got[self.names[n]] for n in names}

    def stored(self):
        """The stored dtypes of the view's tensors, e.g. {"BF16"} or {"F8_E4M3", "F32"}."""
        return {self.raw.dtype(f) for f in self.names.values()}


# --------------------------------------------------------------------------------------------
# What a file is


def _lora(name):
    return (any(p in name for p in ("lora_A.", "lora_B.", "lora_down.", "lora_up.", ".lora.", "lokr_w", "hada_w"))
            or name.startswith(("lora_unet_", "lora_te", "lycoris_")))


# Files that are no part of FLUX.1 [dev] / [schnell], told by a key: (test on the names, what it is).
_FOREIGN = (
    (lambda names: any(_lora(n) for n in names), "a LoRA, not a model; pass FLUX.1 [dev] or [schnell] itself"),
    (lambda names: set(names) <= {"clip_l", "t5", "t5xxl", "clip_g", "emb_params"} or
     any(n.startswith("string_to_param") for n in names), "a textual-inversion embedding, not a model"),
    (lambda names: "redux_up.weight" in names or "redux_down.weight" in names,
     "FLUX.1 Redux's image embedder (an image-prompt adapter), not a FLUX.1 transformer"),
    (lambda names: any(n.endswith((".absmax", ".quant_map", ".nested_absmax")) or "quant_state." in n for n in names),
     "a bitsandbytes-quantized (NF4 / FP4) model, which ti_flax cannot read; use the bf16, fp16 or fp8 file"),
    (lambda names: any(n.endswith(("single_stream_modulation.lin.weight", "double_stream_modulation_img.lin.weight"))
                       for n in names), "a FLUX.2 model, not FLUX.1"),
    (lambda names: any("distilled_guidance_layer." in n for n in names), "a Chroma model, not FLUX.1"),
    (lambda names: any(n.startswith(("controlnet_blocks.", "controlnet_x_embedder.", "input_hint_block.")) or
                       "controlnet_" in n for n in names), "a ControlNet, not a FLUX.1 model"),
    (lambda names: any("joint_blocks." in n for n in names), "a Stable Diffusion 3 model, not FLUX.1"),
    (lambda names: any(n.startswith(("model.diffusion_model.input_blocks.", "cond_stage_model.",
                                     "conditioner.embedders.", "first_stage_model.")) for n in names),
     "a Stable Diffusion 1.x/2.x or SDXL checkpoint, not FLUX.1"),
    (lambda names: any(n.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder."))
                       for n in names),
     "a FLUX transformer in diffusers' names (a transformer/ shard?); pass the folder that holds it and config.json"),
    (lambda names: any(n.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for n in names),
     "a VAE in diffusers' layout; pass the folder that holds it and its config.json"),
)


def describe(raw):
    """(the parts a SafetensorsFile holds, {part: prefix}; what else it is, or None)."""
    names = list(raw.entries)
    if not names:
        return {}, "holds no tensors"
    parts = {}
    for part, prefixes in PREFIXES.items():
        for prefix in prefixes:
            if any(prefix + marker in raw.entries for marker in _MARKERS[part]):
                parts[part] = prefix
                break
    for matches, what in _FOREIGN:
        if matches(names):
            return parts, what
    return parts, None


def open_part(path, part, flag=None):
    """The WeightFile view of `part` in the file at `path`, its prefix removed.

    Raises UserError (one line naming the flag and the file): no such file, not a safetensors file,
    something that is no part of FLUX.1, or another part than `part`.
    """
    flag = flag or FLAGS[part]
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path!r}: {'not a file' if os.path.exists(path) else 'no such file'}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".gguf":
        raise UserError(f"{flag} {path}: a GGUF-quantized model, which ti_flax cannot read; use the bf16, fp16 or fp8 "
                        ".safetensors file")
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(f"{flag} {path}: a pickled file; FLUX.1's files are .safetensors: use {FILE_NAMES[part]}")
    label = f"{flag} {path}"
    raw = SafetensorsFile(path, label)
    parts, foreign = describe(raw)
    if foreign:
        raise UserError(f"{label}: {foreign}")
    if part not in parts:
        others = [p for p in PARTS if p in parts]
        if len(others) == 1:
            raise UserError(f"{label}: {TITLES[others[0]]}, not {TITLES[part]}; pass it as {FLAGS[others[0]]}, and "
                            f"{FILE_NAMES[part]} as {flag}")
        if others:
            raise UserError(f"{label}: holds {' and '.join(TITLES[p] for p in others)} but not {TITLES[part]}; pass "
                            f"{FILE_NAMES[part]} as {flag}")
        names = _weight_names(raw)
        raise UserError(f"{label}: not {TITLES[part]} ({FILE_NAMES[part]}); its {len(names)} tensors are like "
                        f"{short_list(sorted(names)[:3])}")
    return WeightFile(label, raw, {n: n for n in raw.entries}).view(strip=parts[part])


def _weight_names(raw):
    return [n for n in raw.entries if not _is_aux(n)]


def _check_unused(ckpt, used, what, allowed=()):
    """UserError for a weight of the view that no table entry reads (quantization details and
    `allowed` prefixes / names aside): the file holds more than the part the config describes."""
    extra = sorted(n for n in ckpt.shapes if n not in used and not _is_aux(n) and not n.startswith(tuple(allowed)))
    if extra:
        raise UserError(f"{ckpt.path}: unexpected weight {extra[0]} ({len(extra)} in all); not {what} of the kind the "
                        "other weights describe")


# --------------------------------------------------------------------------------------------
# The parts


def load_transformer(path, dtype=np.float32, flag=FLAGS["transformer"]):
    """(flux.FluxConfig, params tree in `dtype`) of a BFL-layout FLUX.1 transformer file
    (flux1-dev.safetensors, flux1-schnell.safetensors, their fp8 versions, or a ComfyUI all-in-one
    checkpoint). UserError (one line) for FLUX.1 Fill, Depth, Canny or Kontext, and for anything
    else but a [dev] or [schnell] transformer."""
    dtype = component_weights.float_dtype(dtype)
    ckpt = open_part(path, "transformer", flag)
    shape_config = bfl_layout.transformer_config(ckpt)
    inputs = shape_config["in_channels"]
    if inputs == 384:
        raise UserError(f"{ckpt.path}: FLUX.1 Fill (img_in takes 384 inputs: latents, masked image and mask), an "
                        f"inpainting model; {_TRAINS}")
    if inputs == 128:
        raise UserError(f"{ckpt.path}: FLUX.1 Depth or Canny (img_in takes 128 inputs: latents and the control "
                        f"image's), a structure-conditioned model; {_TRAINS}")
    if inputs != bfl_layout.LATENT_INPUTS:
        raise UserError(f"{ckpt.path}: img_in takes {inputs} inputs per token, not the {bfl_layout.LATENT_INPUTS} of "
                        f"16 latent channels packed 2x2; {_TRAINS}")
    if "kontext" in os.path.basename(os.fspath(path)).lower():
        raise UserError(f"{ckpt.path}: FLUX.1 Kontext (its file name says so; its weights are shaped as [dev]'s), an "
                        f"image-editing model; {_TRAINS}")
    config = flux.FluxConfig.from_dict(shape_config)
    table = bfl_layout.transformer_names(config)
    _check_unused(ckpt, set(table), "a FLUX.1 [dev] or [schnell] transformer")
    params = bfl_layout.convert(ckpt, table, flux.param_shapes(config), "FLUX.1 transformer", dtype)
    return config, unflatten(params)


# What ldm_layout.text_config reads beside the file: FLUX.1's CLIP-L is OpenAI CLIP ViT-L/14's
# text model, as its text_encoder/config.json states it (quick_gelu, eos_token_id 2, 64-wide heads).
_CLIP_L = ldm_layout.EncoderLayout(prefix="", title="CLIP ViT-L", open_clip=False)
_CLIP_FAMILY = types.SimpleNamespace(title="FLUX.1 CLIP-L")  # text_config's messages name the family's title
_CLIP_EXTRAS = ("text_projection", "logit_scale", "text_model.embeddings.position_ids")  # never read: FLUX pools


def load_clip_l(path, dtype=np.float32, flag=FLAGS["text_encoder"]):
    """(clip.CLIPTextConfig, params tree in `dtype`, transformers' CLIPTextModel names) of a CLIP-L
    file (ComfyUI's clip_l.safetensors: `text_model.*` or the same without the prefix; its
    `text_projection` and `logit_scale`, which FLUX does not use, are not read)."""
    dtype = component_weights.float_dtype(dtype)
    ckpt = open_part(path, "text_encoder", flag)
    top = ("embeddings.", "encoder.", "final_layer_norm.")  # transformers 5 saves CLIPTextModel without text_model.
    ckpt = ckpt.renamed(lambda n: "text_model." + n if n.startswith(top) else n)
    if ckpt.has("text_model.encoder.layers.12.mlp.fc1.weight"):
        layers = ckpt.count("text_model.encoder.layers.{}.mlp.fc1.weight")
        raise UserError(f"{ckpt.path}: a CLIP text model of {layers} layers (CLIP-G or -H), not CLIP-L (12); pass "
                        f"FLUX.1's {FILE_NAMES['text_encoder']}")
    config = clip.CLIPTextConfig.from_dict(ldm_layout.text_config(ckpt, _CLIP_FAMILY, _CLIP_L))
    table = ldm_layout.text_names(config, _CLIP_L)
    _check_unused(ckpt, {theirs for theirs, _ in table.values()}, "CLIP-L's text model", _CLIP_EXTRAS)
    state = ldm_layout.convert(ckpt, table, clip.param_shapes(config), "CLIP-L text encoder")
    return config, unflatten(component_weights.cast_state(state, dtype))


def load_t5xxl(path, dtype=np.float32, flag=FLAGS["text_encoder_2"]):
    """(t5.T5Config, params tree in `dtype`, transformers' T5EncoderModel names with the table at
    `shared.weight`) of a T5 encoder file (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors,
    scaled fp8 included). A whole T5's decoder, if the file has one, is not read."""
    dtype = component_weights.float_dtype(dtype)
    ckpt = open_part(path, "text_encoder_2", flag)
    config = t5.T5Config.from_dict(bfl_layout.t5_config(ckpt))
    if config.feed_forward_proj != "gated-gelu":
        raise UserError(f"{ckpt.path}: a T5 with a {config.feed_forward_proj} feed-forward (the original T5), not T5 "
                        f"v1.1's gated GELU; FLUX.1 reads T5-XXL v1.1's encoder ({FILE_NAMES['text_encoder_2']})")
    table = bfl_layout.t5_names(config, bfl_layout.t5_table_name(ckpt))
    _check_unused(ckpt, set(table), "a T5 encoder", (t5.TIED_COPY,) + component_weights.T5_NOT_ENCODER)
    params = bfl_layout.convert(ckpt, table, t5.param_shapes(config), "T5 encoder", dtype)
    return config, unflatten(params)


def load_ae(path, dtype=np.float32, flag=FLAGS["vae"]):
    """(vae.VAEConfig, params tree in `dtype`, diffusers' AutoencoderKL names) of FLUX.1's
    autoencoder file (ae.safetensors / ae.sft: the original LDM VAE names, no quant convs), with
    FLUX.1's scaling and shift, which the file cannot state."""
    dtype = component_weights.float_dtype(dtype)
    ckpt = open_part(path, "vae", flag).under(ldm_layout.VAE)  # ldm_layout reads a whole checkpoint's names
    shape_config = ldm_layout.vae_config(ckpt, VAE_CONFIG["scaling_factor"])
    config = vae.VAEConfig.from_dict(dict(shape_config, shift_factor=VAE_CONFIG["shift_factor"],
                                          sample_size=VAE_CONFIG["sample_size"]))
    if config.latent_channels != LATENT_CHANNELS:
        raise UserError(f"{ckpt.path}: a VAE of {config.latent_channels} latent channels (Stable Diffusion's?); "
                        f"FLUX.1's has {LATENT_CHANNELS} ({FILE_NAMES['vae']})")
    table = ldm_layout.vae_names(config)
    _check_unused(ckpt, {theirs for theirs, _ in table.values()}, "FLUX.1's autoencoder")
    state = ldm_layout.convert(ckpt, table, vae.param_shapes(config), "FLUX.1 autoencoder")
    return config, unflatten(component_weights.cast_state(state, dtype))


LOADERS = {"transformer": load_transformer, "text_encoder": load_clip_l, "text_encoder_2": load_t5xxl, "vae": load_ae}


def load_files(transformer, clip_l=None, t5xxl=None, ae=None, dtype=np.float32):
    """{part: (config, params in `dtype`)} of FLUX.1 kept as files (see the module docstring).

    Args:
      transformer: the BFL transformer file (--pretrained_model_name_or_path), or a ComfyUI
        all-in-one checkpoint.
      clip_l, t5xxl, ae: the files of --clip_l, --t5xxl, --ae; None: the part from the transformer's
        file, which only an all-in-one checkpoint holds.
    Raises UserError (one line, naming the flag and the file) for a missing part, a file in the
    wrong slot, a model ti_flax does not train, or parts that do not fit together.
    """
    given = {"transformer": transformer, "text_encoder": clip_l, "text_encoder_2": t5xxl, "vae": ae}
    held = describe(open_part(transformer, "transformer").raw)[0]  # every file's header is checked before loading
    for part in PARTS[1:]:
        if given[part] is None:
            if part not in held:
                raise UserError(f"{FLAGS[part]}: missing; {os.fspath(transformer)} holds no {TITLES[part][2:]}, so "
                                f"pass FLUX.1's {FILE_NAMES[part]} as {FLAGS[part]}")
            given[part] = transformer  # a ComfyUI all-in-one checkpoint
        open_part(given[part], part)
    loaded = {part: LOADERS[part](given[part], dtype) for part in PARTS}
    check_parts({p: c for p, (c, _) in loaded.items()}, {p: f"{FLAGS[p]} {os.fspath(given[p])}" for p in PARTS})
    return loaded


def check_parts(configs, sources):
    """UserError unless the parts' configs fit together: the transformer reads T5's states, CLIP's
    pooled output and the VAE's latents (packed 2x2). `sources`: {part: how messages name it}."""
    transformer, clip_config = configs["transformer"], configs["text_encoder"]
    t5_config, vae_config = configs["text_encoder_2"], configs["vae"]
    pairs = (
        ("text_encoder_2", t5_config.d_model, transformer.joint_attention_dim, "text states"),
        ("text_encoder", clip_config.hidden_size, transformer.pooled_projection_dim, "pooled text"),
        ("vae", 4 * vae_config.latent_channels, transformer.in_channels, "packed latents"),
    )
    for part, theirs, wanted, what in pairs:
        if theirs != wanted:
            raise UserError(f"{sources[part]}: gives {theirs}-wide {what}, but the transformer "
                            f"({sources['transformer']}) takes {wanted}; the parts are not one FLUX.1 model")


# --------------------------------------------------------------------------------------------
# A diffusers folder

FOLDERS = {"transformer": "transformer", "text_encoder": "text_encoder", "text_encoder_2": "t5", "vae": "vae"}
_FOLDER_PARTS = {"transformer": "the FLUX.1 transformer", "text_encoder": "the CLIP-L text encoder",
                 "text_encoder_2": "the T5-XXL text encoder", "tokenizer": "CLIP's tokenizer",
                 "tokenizer_2": "T5's tokenizer", "vae": "the autoencoder", "scheduler": "the scheduler config"}


def check_folder(model_dir):
    """UserError (one line) unless `model_dir` is a FLUX.1 [dev] / [schnell] diffusers folder with
    every part: model_index.json's pipeline class tells Fill, Kontext, Redux, Depth / Canny and
    FLUX.2 apart, the transformer's config the input width (a folder saved under FluxPipeline
    with another model's transformer)."""
    name = class_name(model_dir)
    for prefix, what in _OTHER_PIPELINES:
        if name.startswith(prefix):
            raise UserError(f"{model_dir}: a {name}, {what}; {_TRAINS}")
    if name not in PIPELINES:
        raise UserError(f"{model_dir}: a {name or 'folder without model_index.json'}, not a FLUX.1 pipeline "
                        f"({', '.join(PIPELINES)}); {_TRAINS}")
    for part, what in _FOLDER_PARTS.items():
        if not os.path.isdir(os.path.join(model_dir, part)):
            raise UserError(f"{model_dir}: a FLUX.1 folder without {part}/ ({what}); the folder is incomplete, "
                            "download it again")
    inputs = component_weights.read_config(os.path.join(model_dir, "transformer"), "transformer").in_channels
    if inputs != bfl_layout.LATENT_INPUTS:
        what = {384: "FLUX.1 Fill's", 128: "FLUX.1 Depth's or Canny's"}.get(inputs, "not FLUX.1 [dev]'s or [schnell]'s")
        raise UserError(f"{model_dir}: its transformer takes {inputs} inputs per token, {what}; {_TRAINS}")


def load_folder(model_dir, dtype=np.float32):
    """{part: (config, params in `dtype`)} of a checked FLUX.1 diffusers folder (see check_folder)."""
    check_folder(model_dir)
    loaded = {part: component_weights.load_component(os.path.join(model_dir, part), kind, dtype)
              for part, kind in FOLDERS.items()}
    check_parts({p: c for p, (c, _) in loaded.items()}, {p: os.path.join(model_dir, p) for p in PARTS})
    return loaded


def read_scheduler_config(model_dir):
    """scheduler/scheduler_config.json of a FLUX.1 folder, checked to be FlowMatchEulerDiscreteScheduler's."""
    path = os.path.join(model_dir, "scheduler", "scheduler_config.json")
    config = files.read_json(path, "a JSON scheduler config")
    if config.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise UserError(f"{path}: a {config.get('_class_name')}, not FLUX.1's FlowMatchEulerDiscreteScheduler")
    return config


def variant(config):
    """"dev" or "schnell" of a flux.FluxConfig: [dev] is guidance-distilled (it embeds the guidance
    scale), [schnell] is not; their scheduler configs are SCHEDULERS'."""
    return "dev" if config.guidance_embeds else "schnell"
