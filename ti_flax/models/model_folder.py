"""A diffusers model folder: where it is (a local folder, or a Hub snapshot), what its
model_index.json says, and whether it is a pipeline of a kind ti_flax does not train.

Which family a folder is, and whether it has that family's parts, is the families' to say
(`families.load_model`); `single_file.py` reads a model kept as one file instead.
"""

import os

from .. import files
from ..errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")  # what every Stable Diffusion folder has

# model_index.json pipeline classes that are not Stable Diffusion 1.x/2.x, and what they are.
_FOREIGN_PIPELINES = {
    "StableDiffusionXLInpaint": "an SDXL inpainting model",
    "StableDiffusionXLInstructPix2Pix": "an SDXL InstructPix2Pix model",
    "StableDiffusion3": "a Stable Diffusion 3 model",
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
SUPPORTED = ("FLUX.1 [dev] and [schnell], Stable Diffusion 1.x and 2.x (a StableDiffusionPipeline folder, or one "
             "original .safetensors file) "
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


def class_name(model_dir):
    """A diffusers folder's model_index.json `_class_name` ("" where there is none)."""
    return str(model_index(model_dir).get("_class_name", ""))


def refuse_foreign(model_dir, name):
    """UserError for a folder whose pipeline class `name` is a kind of model ti_flax does not train."""
    for prefix, what in _FOREIGN_PIPELINES.items():
        if prefix in name:
            raise UserError(f"{model_dir}: {what} ({name}); ti_flax trains {SUPPORTED}")
