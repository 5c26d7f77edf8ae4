"""Training images: a folder listed, each file decoded upright in RGB, cropped and resized once.

One function per step, each usable alone: `list_images` (which files of a folder are images),
`read_image` (decode, EXIF orientation, `to_rgb`), `crop_and_resize` (the square the model
trains on), `size_and_crop_ids` (SDXL's conditioning on how that square was made); `load_image`
chains them for one file and `load_image_set` for a whole folder. With --enable_bucket,
`make_buckets`, `select_bucket` and `crop_to_bucket` give each image its aspect-ratio bucket's
shape instead, and `load_image_set` returns a `Bucketed` set of images.

Masks (--masked_loss) are read here too, and go through the same crop and resize as their image
(the `mask` of `crop_and_resize`, and of `crop_to_bucket` with --enable_bucket): a float32 [H, W]
weight in [0, 1] at the image's resolution, from the image's alpha channel (`--alpha_mask`:
transparent = 0) or from a mask file beside it (`<stem>-masklabel.png`, OneTrainer's name, or
`<stem><mask_suffix>`: white = 1, black = 0).
"""

import math
import os
import warnings
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image, ImageOps

from .. import files
from ..config import choices
from ..errors import UserError, first_line, short_list
from .batches import Bucketed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# OneTrainer's mask file name (dog.jpg's is dog-masklabel.png): never a training image.
MASK_SUFFIX = choices.MASK_SUFFIX
# The mask source of load_image_set: the image's own alpha channel, or else a mask file suffix.
ALPHA = "alpha"

# The PIL resampling filter of each --interpolation choice.
RESAMPLING = {name: getattr(Image.Resampling, member) for name, member in choices.INTERPOLATIONS.items()}


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode.startswith("I") or img.mode == "F":
        # Pillow's own convert() clips 16/32-bit values to 255, turning a 16-bit scan white.
        a = np.asarray(img).astype(np.float64)
        a = a * 255.0 if img.mode == "F" else a / 257.0  # F taken as [0, 1]; I as 16-bit
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if has_alpha(img):
        return composited(img, (255, 255, 255, 255)).convert("RGB")
    return img.convert("RGB")


def composited(img: Image.Image, background) -> Image.Image:
    """An image with transparency laid over an opaque `background` colour (RGBA), as RGBA."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba)


def has_alpha(img: Image.Image) -> bool:
    """Whether an image has transparency (an alpha channel or a transparent palette entry)."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def read_image(path: str, convert=to_rgb) -> Image.Image:
    """The decoded image at `path` (EXIF orientation applied) in 8-bit RGB (or what `convert`
    makes of the upright decoded image); a file that cannot be read or decoded (truncated,
    corrupt, not an image) is one UserError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return convert(ImageOps.exif_transpose(img))
    except PermissionError:
        raise UserError(f"cannot read image {path}: permission denied; make it readable or remove it") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        raise UserError(
            f"cannot decode image {path} ({first_line(e)}); remove it or re-save it as PNG or JPEG"
        ) from None


def crop_and_resize(img: Image.Image, resolution: int, center_crop: bool, resample, mask=None):
    """The square the model trains on, made from an upright RGB image, and its mask made alike.

    Args:
      img: a PIL image, as read_image returns it.
      resolution: side of the square output.
      center_crop: crop the central square before resizing; otherwise squash to a square.
      resample: the PIL filter (a value of RESAMPLING).
      mask: None, or the image's mask, a PIL "F" image of the same size (`read_mask`): it gets
        the same crop and the same resize (values clipped back to [0, 1], which lanczos and
        bicubic overshoot).

    Returns:
      (uint8 [resolution, resolution, 3] pixels, (top, left) of the crop in the image scaled so
      its short side is `resolution`, as SDXL counts it; (0, 0) without center_crop); with `mask`,
      a third item, the mask as float32 [resolution, resolution].
    """
    w, h = img.size
    crop = (0, 0)
    parts = [img] if mask is None else [img, mask]
    if center_crop:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        parts = [part.crop((left, top, left + side, top + side)) for part in parts]
        # SDXL counts the crop in the image scaled so its short side is the target's.
        crop = (round(top * resolution / side), round(left * resolution / side))
    parts = [part.resize((resolution, resolution), resample=resample) for part in parts]
    return arrays_of(parts, crop)


def arrays_of(parts, crop):
    """(uint8 pixels, crop) of a cropped and resized [image], or (uint8 pixels, crop, float32 mask)
    of [image, mask]: the mask's values clipped back to [0, 1], which lanczos and bicubic overshoot."""
    pixels = np.asarray(parts[0], dtype=np.uint8)
    if len(parts) == 1:
        return pixels, crop
    return pixels, crop, np.clip(np.asarray(parts[1], dtype=np.float32), 0.0, 1.0)


def alpha_of(img: Image.Image) -> Image.Image:
    """An upright decoded image's alpha channel as a mask: PIL "F", 0 transparent .. 1 opaque."""
    alpha = np.asarray(img.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
    return Image.fromarray(alpha, mode="F")


def grey_of(img: Image.Image) -> Image.Image:
    """An upright decoded mask file as a mask: PIL "F", its grey level, 0 black .. 1 white
    (a mask with transparency is composited onto black first: transparent is not learned)."""
    if has_alpha(img):
        img = composited(img, (0, 0, 0, 255))
    grey = np.asarray(to_rgb(img).convert("L"), dtype=np.float32) / 255.0
    return Image.fromarray(grey, mode="F")


def as_decoded(img: Image.Image) -> Image.Image:
    """read_image's `convert` that keeps the upright decoded image as it is (its alpha too)."""
    return img


def read_mask(path: str, img: Image.Image, mask: str) -> Image.Image:
    """The mask of the training image at `path`, PIL "F" in [0, 1], upright as the image is.

    Args:
      path: the training image's file. img: it, decoded upright in its own mode
        (`read_image(path, as_decoded)`).
      mask: ALPHA (the image's alpha channel) or a mask file suffix: the mask of dir/dog.jpg is
        dir/dog<suffix>.

    Raises UserError (one line, naming the file) when the image has no alpha channel, the mask
    file is missing or cannot be decoded, its size is not the image's, or it is black all over.
    """
    if mask == ALPHA:
        if not has_alpha(img):
            raise UserError(f"--alpha_mask: {path} has no alpha channel; save it as a PNG with transparency, "
                            "or use mask files (--masked_loss without --alpha_mask)")
        weights, source = alpha_of(img), f"the alpha channel of {path}"
    else:
        source = os.path.splitext(path)[0] + mask
        if not os.path.isfile(source):
            raise UserError(f"--masked_loss: {path} has no mask file {os.path.basename(source)}; every image needs "
                            "one (white = learn, black = ignore)")
        weights = read_image(source, convert=grey_of)
        if weights.size != img.size:
            raise UserError(f"--masked_loss: mask {source} is {weights.size[0]}x{weights.size[1]} but its image "
                            f"is {img.size[0]}x{img.size[1]}; make the mask the image's size")
    if not np.asarray(weights).any():
        raise UserError(f"--masked_loss: {source} is black (transparent) all over, so nothing of {path} would be "
                        "learned; fix the mask or remove the image")
    return weights


def read_with_mask(path: str, mask: Optional[str] = None):
    """(the image at `path` in RGB as read_image reads it, its mask as read_mask reads it from
    the mask source `mask`); the mask is None when `mask` is."""
    if mask is None:
        return read_image(path), None
    decoded = read_image(path, convert=as_decoded)
    return to_rgb(decoded), read_mask(path, decoded, mask)


def size_and_crop_ids(original_size, crop_top_left, target_size) -> np.ndarray:
    """SDXL's size and crop conditioning of an image, float32 [6]: (original height, width, crop
    top, crop left, target height, width), as diffusers' SDXL pipelines and scripts build it."""
    return np.asarray((*original_size, *crop_top_left, *target_size), np.float32)


def load_image(path: str, resolution: int, center_crop: bool, resample, mask: Optional[str] = None):
    """One training image: read_image, then crop_and_resize (same arguments).

    Args:
      mask: None, or the mask source of `read_mask` (ALPHA or a mask file suffix).

    Returns:
      (uint8 [resolution, resolution, 3] pixels, float32 [6] SDXL size and crop ids of how they
      were made: the size before resizing, the crop applied); with `mask`, a third item, the
      mask cropped and resized with the pixels, float32 [resolution, resolution] in [0, 1].
    """
    img, weights = read_with_mask(path, mask)
    w, h = img.size
    pixels, crop, *masks = crop_and_resize(img, resolution, center_crop, resample, weights)
    return (pixels, size_and_crop_ids((h, w), crop, (resolution, resolution)), *masks)


def is_mask_file(name: str, mask_suffix: Optional[str] = None) -> bool:
    """Whether a file name is a mask's: ends with OneTrainer's "-masklabel.png" or `mask_suffix`."""
    name = name.lower()
    return name.endswith(MASK_SUFFIX) or bool(mask_suffix) and name.endswith(mask_suffix.lower())


def list_images(data_dir: str, caption_extension: Optional[str] = None, mask_suffix: Optional[str] = None) -> list[str]:
    """The image file names of a folder (not recursive), in name order.

    Args:
      data_dir: folder of training images; other files (captions, .DS_Store, folders) are skipped
        with one warning that lists them.
      caption_extension: e.g. ".txt": the caption file of each image is skipped without a
        warning (a caption file with no image of its name is still listed).
      mask_suffix: mask files, named `<stem>-masklabel.png` or `<stem><mask_suffix>`, are never
        training images: they are skipped without a warning.

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
        if is_file and is_mask_file(name, mask_suffix):
            continue
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


class Bucketing(NamedTuple):
    """--enable_bucket's settings: `buckets` (make_buckets's), `no_upscale` (--bucket_no_upscale),
    `resolution` and `reso_steps` (--bucket_reso_steps), as select_bucket takes them."""

    buckets: tuple
    no_upscale: bool
    resolution: int
    reso_steps: int

    @classmethod
    def of(cls, resolution, min_reso, max_reso, reso_steps, no_upscale):
        return cls(make_buckets(resolution, min_reso, max_reso, reso_steps), no_upscale, resolution, reso_steps)


def load_bucketed_image(path: str, bucketing: Bucketing, resample, mask: Optional[str] = None):
    """One training image in its bucket: read_image, select_bucket, crop_to_bucket.

    Args:
      mask: None, or the mask source of `read_mask` (ALPHA or a mask file suffix).

    Returns:
      (uint8 [bucket height, width, 3] pixels, float32 [6] SDXL size and crop ids: the size
      before resizing, the crop's top-left in the resized image, the bucket's size); with
      `mask`, a third item, the mask resized and cropped with the pixels, float32 [bucket
      height, width] in [0, 1].
    Raises:
      UserError when the image is smaller than --bucket_reso_steps on a side (--bucket_no_upscale).
    """
    img, weights = read_with_mask(path, mask)
    bucket, resized = select_bucket(img.height, img.width, *bucketing)
    if min(bucket) == 0:
        raise UserError(f"image {path} is {img.width}x{img.height} pixels: with --bucket_no_upscale a side needs at "
                        f"least --bucket_reso_steps {bucketing.reso_steps} pixels; remove it, enlarge it or lower "
                        "--bucket_reso_steps")
    pixels, crop, *masks = crop_to_bucket(img, bucket, resized, resample, weights)
    return (pixels, size_and_crop_ids((img.height, img.width), crop, bucket), *masks)


def load_image_set(
    data_dir: str, resolution: int, center_crop: bool, interpolation: str, caption_extension: Optional[str] = None,
    mask: Optional[str] = None,
    bucketing: Optional[Bucketing] = None,
):
    """Decodes every image in a folder (not recursive), in name order.

    Args:
      data_dir, caption_extension: as for list_images.
      resolution, center_crop: as for crop_and_resize.
      interpolation: "nearest", "bilinear", "bicubic" or "lanczos" (a key of RESAMPLING).
      mask: None, or each image's mask source (`read_mask`): ALPHA, or a mask file suffix, which
        every image must then have a file of (a folder with none is refused as no mask source).
      bucketing: with --enable_bucket, each image goes to its bucket (load_bucketed_image)
        instead of the square.

    Returns:
      images: uint8 [num_images, resolution, resolution, 3]; names: the file names, same order;
      time_ids: float32 [num_images, 6], SDXL's conditioning on each image's original size and
      crop (`size_and_crop_ids`): the size before resizing, the crop `center_crop` applied;
      with `mask`, a fourth item: masks float32 [num_images, resolution, resolution] in [0, 1];
      with `bucketing` the images are a data.Bucketed of each bucket's images, and the masks a
      data.Bucketed of each image's mask at its bucket's size (the same buckets, in the same order).
    """
    if interpolation not in RESAMPLING:
        raise UserError(f"unknown interpolation {interpolation!r}; use one of {[*RESAMPLING]}")
    names = list_images(data_dir, caption_extension, None if mask == ALPHA else mask)
    if mask not in (None, ALPHA) and not any(os.path.isfile(os.path.join(data_dir, os.path.splitext(name)[0] + mask))
                                             for name in names):
        raise UserError(f"--masked_loss: no image in {data_dir} has a mask file (<name>{mask}); add them, or pass "
                        "--alpha_mask to take each image's alpha channel")
    if bucketing is not None:
        loaded = [load_bucketed_image(os.path.join(data_dir, name), bucketing, RESAMPLING[interpolation], mask)
                  for name in names]
        images, time_ids, *masks = zip(*loaded)
        return (Bucketed.make(images), names, np.stack(time_ids), *(Bucketed.make(column) for column in masks))
    loaded = [load_image(os.path.join(data_dir, name), resolution, center_crop, RESAMPLING[interpolation], mask)
              for name in names]
    images, time_ids, *masks = (np.stack(column) for column in zip(*loaded))
    return (images, names, time_ids, *masks)


# --------------------------------------------------------------------------------------------
# --enable_bucket: aspect-ratio buckets, with kohya sd-scripts' meanings (model_util.py's
# make_bucket_resolutions, train_util.py's BucketManager and trim_and_resize_if_required).


def make_buckets(resolution: int, min_reso: int, max_reso: int, reso_steps: int) -> tuple[tuple[int, int], ...]:
    """The (height, width) buckets of about `resolution`^2 pixels, in kohya's order.

    Every side is a multiple of `reso_steps` in [min_reso, max_reso], and no bucket has more pixels
    than `resolution`^2: the square whose side is `resolution` rounded down to `reso_steps`, and for
    each width w = min_reso, min_reso + reso_steps, ... <= max_reso the tallest height h <= max_reso
    with w * h <= resolution^2 (h >= min_reso), and its transpose. Sorted by (width, height).
    """
    area = resolution * resolution
    side = int(math.sqrt(area) // reso_steps) * reso_steps
    found = {(side, side)}
    for width in range(min_reso, max_reso + 1, reso_steps):
        height = min(max_reso, (area // width) // reso_steps * reso_steps)
        if height >= min_reso:
            found |= {(height, width), (width, height)}
    return tuple(sorted(found, key=lambda hw: (hw[1], hw[0])))


def select_bucket(height: int, width: int, buckets, no_upscale: bool = False, resolution: int = 0,
                  reso_steps: int = 0) -> tuple[tuple[int, int], tuple[int, int]]:
    """The bucket of an image of `height` x `width` pixels, and the size it is resized to first.

    Without `no_upscale`: the bucket of `buckets` nearest the image's aspect ratio (width / height;
    the first of equals), and the size that covers it with the aspect ratio kept (scaled to the
    bucket's height when the image is wider than the bucket, else to its width), rounded half up.
    With `no_upscale` (kohya's --bucket_no_upscale; `buckets` are not used): an image of more than
    `resolution`^2 pixels is first scaled down to about that many, its sides rounded to
    `reso_steps` whichever way keeps the aspect ratio better; the bucket is that size (or the
    image's own) rounded down to multiples of `reso_steps`, so an image is never enlarged.

    Returns:
      ((bucket height, width), (resized height, width)): the image is resized to the second and
      center-cropped to the first (`crop_to_bucket`).
    """
    aspect = width / height
    if not no_upscale:
        ratios = np.array([w / h for h, w in buckets])
        bucket = buckets[int(np.abs(ratios - aspect).argmin())]
        bh, bw = bucket
        scale = bh / height if aspect > bw / bh else bw / width
        return bucket, (int(height * scale + 0.5), int(width * scale + 0.5))
    area = resolution * resolution
    resized = (height, width)
    if height * width > area:
        to_steps = lambda x: int(x / reso_steps + 0.5) * reso_steps  # noqa: E731, kohya's round_to_steps
        rw = math.sqrt(area * aspect)
        rh = area / rw
        bw_r = to_steps(rw)
        bh_r = to_steps(rh)
        by_width = bw_r / to_steps(bw_r / aspect)
        by_height = to_steps(bh_r * aspect) / bh_r
        if abs(by_width - aspect) < abs(by_height - aspect):
            resized = (int(bw_r / aspect + 0.5), bw_r)
        else:
            resized = (bh_r, int(bh_r * aspect + 0.5))
    bucket = (resized[0] - resized[0] % reso_steps, resized[1] - resized[1] % reso_steps)
    return bucket, resized


def crop_to_bucket(img: Image.Image, bucket, resized, resample, mask=None):
    """`img` resized to `resized` (height, width) and center-cropped to `bucket` (height, width),
    and its mask made alike.

    Args:
      mask: None, or the image's mask, a PIL "F" image of the same size (`read_mask`): it gets
        the same resize and the same crop (values clipped back to [0, 1], as crop_and_resize's).

    Returns:
      (uint8 [bucket height, width, 3] pixels, (top, left) of the crop in the resized image: SDXL's
      crop coordinates, as kohya and diffusers' SDXL training script record them); with `mask`, a
      third item, the mask as float32 [bucket height, width].
    """
    parts = [img] if mask is None else [img, mask]
    if (img.height, img.width) != tuple(resized):
        parts = [part.resize((resized[1], resized[0]), resample=resample) for part in parts]
    # diffusers' SDXL script's center crop (torchvision's CenterCrop): an odd margin rounds half to even.
    top, left = (int(round((r - b) / 2.0)) for r, b in zip(resized, bucket))
    parts = [part.crop((left, top, left + bucket[1], top + bucket[0])) for part in parts]
    return arrays_of(parts, (top, left))
