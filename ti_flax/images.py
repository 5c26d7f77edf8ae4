"""Training images: a folder listed, each file decoded upright in RGB, cropped and resized once.

One function per step, each usable alone: `list_images` (which files of a folder are images),
`read_image` (decode, EXIF orientation, `to_rgb`), `crop_and_resize` (the square the model
trains on), `size_and_crop_ids` (SDXL's conditioning on how that square was made); `load_image`
chains them for one file and `load_image_set` for a whole folder.
"""

import os
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from . import choices, files
from .errors import UserError, first_line, short_list

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# The PIL resampling filter of each --interpolation choice.
RESAMPLING = {name: getattr(Image.Resampling, member) for name, member in choices.INTERPOLATIONS.items()}


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode.startswith("I") or img.mode == "F":
        # Pillow's own convert() clips 16/32-bit values to 255, turning a 16-bit scan white.
        a = np.asarray(img).astype(np.float64)
        a = a * 255.0 if img.mode == "F" else a / 257.0  # F taken as [0, 1]; I as 16-bit
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def read_image(path: str) -> Image.Image:
    """The decoded image at `path` (EXIF orientation applied) in 8-bit RGB; a file that cannot
    be read or decoded (truncated, corrupt, not an image) is one UserError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except PermissionError:
        raise UserError(f"cannot read image {path}: permission denied; make it readable or remove it") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        raise UserError(
            f"cannot decode image {path} ({first_line(e)}); remove it or re-save it as PNG or JPEG"
        ) from None


def crop_and_resize(img: Image.Image, resolution: int, center_crop: bool, resample) -> tuple[np.ndarray, tuple]:
    """The square the model trains on, made from an upright RGB image.

    Args:
      img: a PIL image, as read_image returns it.
      resolution: side of the square output.
      center_crop: crop the central square before resizing; otherwise squash to a square.
      resample: the PIL filter (a value of RESAMPLING).

    Returns:
      (uint8 [resolution, resolution, 3] pixels, (top, left) of the crop in the image scaled so
      its short side is `resolution`, as SDXL counts it; (0, 0) without center_crop).
    """
    w, h = img.size
    crop = (0, 0)
    if center_crop:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        # SDXL counts the crop in the image scaled so its short side is the target's.
        crop = (round(top * resolution / side), round(left * resolution / side))
    return np.asarray(img.resize((resolution, resolution), resample=resample), dtype=np.uint8), crop


def size_and_crop_ids(original_size, crop_top_left, target_size) -> np.ndarray:
    """SDXL's size and crop conditioning of an image, float32 [6]: (original height, width, crop
    top, crop left, target height, width), as diffusers' SDXL pipelines and scripts build it."""
    return np.asarray((*original_size, *crop_top_left, *target_size), np.float32)


def load_image(path: str, resolution: int, center_crop: bool, resample) -> tuple[np.ndarray, np.ndarray]:
    """One training image: read_image, then crop_and_resize (same arguments).

    Returns:
      (uint8 [resolution, resolution, 3] pixels, float32 [6] SDXL size and crop ids of how they
      were made: the size before resizing, the crop applied).
    """
    img = read_image(path)
    w, h = img.size
    pixels, crop = crop_and_resize(img, resolution, center_crop, resample)
    return pixels, size_and_crop_ids((h, w), crop, (resolution, resolution))


def list_images(data_dir: str, caption_extension: Optional[str] = None) -> list[str]:
    """The image file names of a folder (not recursive), in name order.

    Args:
      data_dir: folder of training images; other files (captions, .DS_Store, folders) are skipped
        with one warning that lists them.
      caption_extension: e.g. ".txt": the caption file of each image is skipped without a
        warning (a caption file with no image of its name is still listed).

    Raises:
      UserError when the folder does not exist, is not a folder or holds no image.
    """
    if not os.path.exists(data_dir):
        raise UserError(f"training data folder {data_dir} does not exist")
    if not os.path.isdir(data_dir):
        raise UserError(f"training data path {data_dir} is not a folder")
    names, skipped = [], []
    for name in sorted(files.list_folder(data_dir, "training data folder")):
        is_file = os.path.isfile(os.path.join(data_dir, name))
        ok = is_file and name.lower().endswith(IMAGE_EXTENSIONS)
        (names if ok else skipped).append(name)
    if caption_extension:
        captions = {os.path.splitext(name)[0] + caption_extension for name in names}
        skipped = [name for name in skipped if name not in captions]
    if skipped:
        # stacklevel 3: the warning points at the line that called load_image_set.
        warnings.warn(
            f"skipping {len(skipped)} non-image entries in {data_dir}: {short_list(skipped, 5)}",
            stacklevel=3,
        )
    if not names:
        raise UserError(f"no images in {data_dir} (looked for {' '.join(IMAGE_EXTENSIONS)})")
    return names


def load_image_set(
    data_dir: str, resolution: int, center_crop: bool, interpolation: str, caption_extension: Optional[str] = None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Decodes every image in a folder (not recursive), in name order.

    Args:
      data_dir, caption_extension: as for list_images.
      resolution, center_crop: as for crop_and_resize.
      interpolation: "nearest", "bilinear", "bicubic" or "lanczos" (a key of RESAMPLING).

    Returns:
      images: uint8 [num_images, resolution, resolution, 3]; names: the file names, same order;
      time_ids: float32 [num_images, 6], SDXL's conditioning on each image's original size and
      crop (`size_and_crop_ids`): the size before resizing, the crop `center_crop` applied.
    """
    if interpolation not in RESAMPLING:
        raise UserError(f"unknown interpolation {interpolation!r}; use one of {[*RESAMPLING]}")
    names = list_images(data_dir, caption_extension)
    images, time_ids = [], []
    for name in names:
        pixels, ids = load_image(os.path.join(data_dir, name), resolution, center_crop, RESAMPLING[interpolation])
        images.append(pixels)
        time_ids.append(ids)
    return np.stack(images), names, np.stack(time_ids)
