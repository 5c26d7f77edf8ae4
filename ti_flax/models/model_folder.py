"""A diffusers model folder: where it is (a local folder, or a Hub snapshot), what its
model_index.json says, and whether it is a model ti_flax trains with every part in place.

`pretrained.load_model` reads the folder these checks accept; `single_file.py` reads a model
kept as one file instead.
"""

import os

from .. import files
from ..errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # what an SDXL folder adds

# model_index.json pipeline classes that are not Stable Diffusion 1.x/2.x, and what they are.
_FOREIGN_PIPELINES = {
    "StableDiffusionXLInpaint": "an SDXL inpainting model",
    "StableDiffusionXLInstructPix2Pix": "an SDXL InstructPix2Pix model",
    "StableDiffusion3": "a Stable Diffusion 3 model",
    "Flux": "a Flux model",
    "ControlNet": "a ControlNet",
    "Kandinsky": "a Kandinsky model",
    "PixArt": "a PixArt model",
    "Wuerstchen": "a Wuerstchen model",
    "StableCascade": "a Stable Cascade model",
    "Sana": "a Sana model",
    "Lumina": "a Lumina model",
    "Hunyuan": "a Hunyuan model",
    "AuraFlow": "an AuraFlow model",
}
SUPPORTED = ("Stable Diffusion 1.x and 2.x (a StableDiffusionPipeline folder, or one original .safetensors file) "
             "and SDXL (a StableDiffusionXLPipeline folder, or one original .safetensors file)")


# What a Hub snapshot of a model fetches: everything a run reads, or (for ti_flax.plan) its configs alone.
MODEL_FILES = ("*.json", "*.txt", "*.msgpack", "*.safetensors", "*.bin", "*.model")
CONFIG_FILES = ("*.json",)


def resolve_model_dir(name_or_path, revision=None, allow_patterns=MODEL_FILES, flag="--pretrained_model_name_or_path"):
    """Local folder for a model path or Hub id (downloaded to the HF cache, or read from it).

    Raises UserError, naming `flag`, when the model cannot be found. With HF_HUB_OFFLINE=1 only
    the local cache is consulted, so no network call is made. `allow_patterns`: the files a Hub
    snapshot fetches (CONFIG_FILES: the configs alone).
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"{flag} {name_or_path!r}: no such model folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name_or_path,
            revision=revision,
            allow_patterns=list(allow_patterns),
            ignore_patterns=["*.fp16.*", "*.non_ema.*", "*.ckpt", "safety_checker/*", "*/*.onnx"],
        )
    except Exception as err:  # network down, offline mode, unknown repo, wrong revision
        raise UserError(
            f"{flag} {name_or_path!r}: not a local folder and could not be "
            f"fetched from the Hugging Face Hub ({type(err).__name__}); pass a local model folder"
        ) from None


def model_index(model_dir):
    """A diffusers folder's model_index.json as a dict; {} where there is none (a single file)."""
    path = os.path.join(model_dir or "", "model_index.json")
    return files.read_json(path, "a JSON pipeline index") if os.path.isfile(path) else {}


def check_model_dir(model_dir, tokenizer_dir=None):
    """Raise UserError for a folder of another model family, or naming every missing component.

    Returns whether the folder is an SDXL model (`is_sdxl_dir`)."""
    name = str(model_index(model_dir).get("_class_name", ""))
    for prefix, what in _FOREIGN_PIPELINES.items():
        if prefix in name:
            raise UserError(f"{model_dir}: {what} ({name}); ti_flax trains {SUPPORTED}")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(model_dir, c))]
    if tokenizer_dir is None and not os.path.isdir(os.path.join(model_dir, "tokenizer")):
        missing.append("tokenizer")
    if missing:
        raise UserError(
            f"{model_dir}: not a Stable Diffusion model folder (missing {', '.join(missing)}/); "
            "expected unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )
    sdxl = is_sdxl_dir(model_dir, name)
    if sdxl:
        missing = [c for c in SDXL_COMPONENTS if not os.path.isdir(os.path.join(model_dir, c))]
        if missing:
            raise UserError(f"{model_dir}: an SDXL model folder without {', '.join(missing)}/; "
                            "an SDXL folder has text_encoder_2/ and tokenizer_2/ beside text_encoder/ and tokenizer/")
        if tokenizer_dir is not None:
            raise UserError("--tokenizer_name: not supported for SDXL models, which carry two tokenizers; "
                            "drop the flag to use the model's own")
    return sdxl


def is_sdxl_dir(model_dir, class_name=None):
    """Whether a diffusers folder is an SDXL model: its index says so, or it has a second text
    encoder. `class_name`: its model_index.json `_class_name`, when the caller has read it."""
    if class_name is None:
        class_name = str(model_index(model_dir).get("_class_name", ""))
    return class_name.startswith("StableDiffusionXL") or os.path.isdir(os.path.join(model_dir, "text_encoder_2"))


def zeros_for_empty_negative(model):
    """Whether an empty negative prompt is all zeros for a LoadedModel: an SDXL folder's
    model_index.json `force_zeros_for_empty_prompt` (True when unset, as diffusers' default);
    False for SD 1.x / 2.x, whose pipelines encode the empty text."""
    return model.spec.is_sdxl and bool(model_index(model.model_dir).get("force_zeros_for_empty_prompt", True))
