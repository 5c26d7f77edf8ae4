"""Training batches for textual inversion: numpy only, seeded by the step number.

The images of a folder are decoded, cropped and resized once into a uint8 array (images.py) and
the prompts tokenized once (prompts.py); this module only draws from them. The content of
global step `s` is a pure function of `(seed, s)`: each epoch draws its shuffle, flips and
templates from `np.random.default_rng([seed, epoch])`, so resuming needs only the step number.
An image with a caption file (`--caption_extension`) is shown with its caption instead of the
template drawn for it; the draws are the same with or without captions.

A step's examples are a selection (image index, flip, prompt ids, example id); a view source
turns a selection into a batch: `PixelViews` into a `PixelBatch` of flipped images, and
`LatentViews` (--cache_latents, see latents.py) into a `LatentBatch` of cached VAE moments.
With --masked_loss each image's mask (images.py) rides along, flipped with it (`flip_rows`), in
either kind of batch; without, a batch's `mask` is None and its pytree is what it always was.
"""

import itertools
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Optional

import numpy as np

from ..errors import UserError


class PixelBatch(NamedTuple):
    """Examples as images: pixel_values uint8 [..., H, W, 3], input_ids int32 [..., L],
    example_ids int64 [...] (each example's index in the run, for its own noise), concept_ids
    int32 [...] (each example's concept: all 0 in a run of one concept), time_ids float32
    [..., 6] (SDXL's size and crop conditioning of each example's image; None for other models)."""

    pixel_values: np.ndarray
    input_ids: np.ndarray
    example_ids: np.ndarray
    concept_ids: Optional[np.ndarray] = None
    time_ids: Optional[np.ndarray] = None
    # --masked_loss: float32 [..., H, W] in [0, 1], the pixels' mask; with --enable_bucket already
    # reduced to the latent grid [..., h, w] (losses.latent_mask leaves such a mask as it is)
    mask: Optional[np.ndarray] = None


class LatentBatch(NamedTuple):
    """Examples as cached VAE posteriors: latent_mean and latent_logvar float32 [..., C, h, w],
    input_ids, example_ids, concept_ids, time_ids and mask as in PixelBatch."""

    latent_mean: np.ndarray
    latent_logvar: np.ndarray
    input_ids: np.ndarray
    example_ids: np.ndarray
    concept_ids: Optional[np.ndarray] = None
    time_ids: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None


def blank_batch(batch_size, resolution, text_length, time_ids=False):
    """A PixelBatch of zeros shaped as one device's batch of `batch_size` examples at
    `resolution` pixels, as the sources below make them: what the train step is compiled for
    when no images are read (`ti_flax.plan`). `time_ids`: with each example's size-and-crop ids
    (ModelFamily.time_ids)."""
    return PixelBatch(np.zeros((batch_size, resolution, resolution, 3), np.uint8),
                      np.zeros((batch_size, text_length), np.int32), np.zeros(batch_size, np.int64),
                      np.zeros(batch_size, np.int32), np.zeros((batch_size, 6), np.float32) if time_ids else None)


def flip_rows(source: np.ndarray, index: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Rows `index` of images [N, H, W, ...] (pixels, or masks [N, H, W]), those where `flip`
    (bool [n]) is set mirrored left to right: the one horizontal flip an image and its mask share."""
    rows = source[index]  # fancy indexing copies, so flipping in place is safe
    rows[flip] = rows[flip][:, :, ::-1]
    return rows


class Bucketed:
    """Per-item arrays whose shapes differ by bucket (--enable_bucket's images, and their cached
    latents): item i is `arrays[bucket[i]][row[i]]`, so the items of one bucket are one stacked
    array, as the items of a square run are.

    Indexing with item indices that all share one bucket gives their stacked rows, a copy (as
    numpy's fancy indexing of a plain array does): `x[items]`, or `x[items, more...]` to index
    the rows' next axes too. So data.PixelViews and data.LatentViews read a Bucketed as they read
    an array.

    Attributes:
      shapes: each bucket's (height, width), in the order `make` sorted them.
      bucket: int64 [N], each item's bucket. row: int64 [N], its row in its bucket's array.
      arrays: one array per bucket, [items of the bucket, ...].
    """

    def __init__(self, shapes, bucket, arrays):
        self.shapes, self.arrays = tuple(shapes), tuple(arrays)
        self.bucket = np.asarray(bucket, np.int64)
        self.row = np.zeros(len(self.bucket), np.int64)
        for b in range(len(self.shapes)):
            self.row[self.bucket == b] = np.arange(int((self.bucket == b).sum()))

    @classmethod
    def make(cls, items):
        """Items (arrays [h, w, ...]) grouped by their (h, w), the buckets sorted by (width, height)."""
        shapes = sorted({tuple(x.shape[:2]) for x in items}, key=lambda hw: (hw[1], hw[0]))
        bucket = [shapes.index(tuple(x.shape[:2])) for x in items]
        arrays = [np.stack([x for x, b in zip(items, bucket) if b == k]) for k in range(len(shapes))]
        return cls(shapes, bucket, arrays)

    @classmethod
    def concatenate(cls, parts):
        """Several Bucketed as one, items in the order given."""
        return cls.make([x for part in parts for x in part.items()])

    def items(self):
        """Every item's array, in item order."""
        return [self.arrays[b][r] for b, r in zip(self.bucket, self.row)]

    def counts(self):
        """int64 [buckets]: how many items each bucket holds."""
        return np.bincount(self.bucket, minlength=len(self.shapes))

    def with_arrays(self, arrays):
        """The same items in the same buckets, holding `arrays` (one per bucket, rows in this order)."""
        return type(self)(self.shapes, self.bucket, arrays)

    def __len__(self):
        return len(self.bucket)

    def __getitem__(self, key):
        items, *more = key if isinstance(key, tuple) else (key,)
        items = np.asarray(items, np.int64)
        buckets = np.unique(self.bucket[items])
        if len(buckets) != 1:
            raise ValueError(f"the items of one batch must share one bucket, got buckets {buckets.tolist()}")
        return self.arrays[int(buckets[0])][(self.row[items], *more)]


class PixelViews:
    """Selections -> PixelBatch: each example's image, flipped where its selection says so."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, images, flip, prompt_ids, example_ids, concept_ids=None) -> PixelBatch:
        return PixelBatch(flip_rows(self.images, images, flip), prompt_ids, example_ids, concept_ids)


class LatentViews:
    """Selections -> LatentBatch: the cached moments of view [image, flip] of each example.

    Args: mean, logvar: float32 [num_images, 2, C, h, w]; index [i, 1] is image i flipped; or
      with --enable_bucket, a Bucketed of such arrays, one per bucket.
    """

    def __init__(self, mean: np.ndarray, logvar: np.ndarray):
        if isinstance(mean, Bucketed):  # --enable_bucket: each bucket's cache as the array below
            for m, v in zip(mean.arrays, logvar.arrays):
                LatentViews(m, v)
        elif mean.ndim != 5 or mean.shape[1] != 2 or logvar.shape != mean.shape:
            raise ValueError(f"cache must be [N, 2, C, h, w], got {mean.shape} and {logvar.shape}")
        self.mean, self.logvar = mean, logvar

    def __call__(self, images, flip, prompt_ids, example_ids, concept_ids=None) -> LatentBatch:
        view = (images, flip.astype(np.int64))
        return LatentBatch(self.mean[view], self.logvar[view], prompt_ids, example_ids, concept_ids)


class ValidationImages(NamedTuple):
    """The images the validation loss is computed on, each shown one way: unflipped, with its caption
    or else the first template. images uint8 [M, H, W, 3], prompt_ids int32 [M, L], concept_ids int32
    [M], time_ids float32 [M, 6] (SDXL) or None."""

    images: np.ndarray
    prompt_ids: np.ndarray
    concept_ids: np.ndarray
    time_ids: Optional[np.ndarray] = None

    @classmethod
    def of(cls, images, template_ids, captions, indices, concept=0, time_ids=None):
        """Images `indices` of a concept's decoded `images`, with `captions` (per image, ids or None;
        or None) and `template_ids` [T, L] as TrainData takes them."""
        indices = np.asarray(indices, np.int64)
        prompt_ids = np.repeat(np.asarray(template_ids[:1], np.int32), len(indices), axis=0)
        for row, i in enumerate(indices):
            if captions is not None and captions[i] is not None:
                prompt_ids[row] = captions[i]
        return cls(images[indices], prompt_ids, np.full(len(indices), concept, np.int32),
                   None if time_ids is None else np.asarray(time_ids, np.float32)[indices])

    @classmethod
    def concatenate(cls, parts):
        """Several concepts' ValidationImages as one, in the order given."""
        fields = [None if parts[0][k] is None else np.concatenate([p[k] for p in parts]) for k in range(len(cls._fields))]
        return cls(*fields)


def hold_out(num_images, fraction, seed, concept=0):
    """(kept, held out): ascending indices of `num_images` images, `round(num_images * fraction)` of
    them held out (kohya's --validation_split count), chosen by `default_rng([seed, 1, concept])`.

    Raises UserError when that holds out no image, or every image.
    """
    held = round(num_images * fraction)
    if held == 0:
        raise UserError(f"--validation_split {fraction:g} holds out no image of {num_images} (round({num_images} x "
                        f"{fraction:g}) = 0): raise it, or leave it at 0 to compute the loss on the training images")
    if held >= num_images:
        raise UserError(f"--validation_split {fraction:g} holds out all {num_images} images; at least one must stay "
                        "in training: lower it")
    order = np.random.default_rng([seed, 1, concept]).permutation(num_images)
    return np.sort(order[held:]), np.sort(order[:held])


class BatchSource:
    """The batch methods shared by TrainData, concept_mix.ConceptMix and buckets.BucketBatches.

    A subclass sets `images` (uint8 [N, H, W, 3]: every example's image is one of these),
    `global_batch_size` and `steps_per_epoch`, and defines `select(epoch, slots)`: the (image
    index, flip, prompt ids, concept id) of an epoch's slots, an epoch being `steps_per_epoch`
    batches of consecutive slots (`examples`; buckets.BucketBatches deals them otherwise). With `time_ids`
    (float32 [N, 6], for SDXL) set, each batch carries its images' time ids; with `masks`
    (float32 [N, H, W], --masked_loss; with --enable_bucket a Bucketed of each image's mask on
    its bucket's latent grid), each example's mask, flipped as its image is: in pixel and latent
    batches alike, so the --cache_latents cache needs no masks of its own.
    """

    time_ids: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None

    def examples(self, step: int, lo: int, hi: int):
        """Rows [lo, hi) of global batch `step`: (image index into `images`, flip, prompt ids int32
        [n, L], example id, concept id int32); global batch `step` is the `step`-th run of
        `global_batch_size` consecutive slots, its epoch's."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, pos = divmod(step, self.steps_per_epoch)
        sel = slice(pos * self.global_batch_size + lo, pos * self.global_batch_size + hi)
        example_ids = np.arange(lo, hi, dtype=np.int64) + step * self.global_batch_size
        images, flips, prompt_ids, concept_ids = self.select(epoch, sel)
        return images, flips, prompt_ids, example_ids, concept_ids

    def _rows(self, step: int, lo: int, hi: int, views=None):
        """Rows [lo, hi) of global batch `step`, as `views` (default PixelViews) shows them."""
        views = views or PixelViews(self.images)
        selection = self.examples(step, lo, hi)
        batch = views(*selection)
        if self.time_ids is not None:
            batch = batch._replace(time_ids=self.time_ids[selection[0]])
        if self.masks is not None:  # the mask of each example's view, flipped with its image
            batch = batch._replace(mask=flip_rows(self.masks, selection[0], selection[1]))
        return batch

    def global_batch(self, step: int, views=None):
        """Returns the whole global batch of `step`.

        Returns:
          PixelBatch: pixel_values uint8 [G, H, W, 3], input_ids int32 [G, L], example_ids int64
          [G] (the index of each example in the run, step * G + j, for per-example noise); or
          what `views` makes of the same examples (LatentViews: a LatentBatch).
        """
        return self._rows(step, 0, self.global_batch_size, views)

    def local_batch(self, step: int, process_index: int, process_count: int, local_device_count: int, views=None):
        """Returns this process's contiguous share of global batch `step`, split per device.

        Args:
          step: global step.
          process_index, process_count: this host and the number of hosts.
          local_device_count: devices on this host.
          views: PixelViews (the default) or LatentViews.

        Returns:
          The global_batch arrays, rows [p*G/P, (p+1)*G/P), reshaped to [local_device_count,
          G / (process_count * local_device_count), ...].
        """
        g = self.global_batch_size
        if g % (process_count * local_device_count):
            raise ValueError(
                f"global batch {g} is not divisible by {process_count} processes x "
                f"{local_device_count} devices"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        share = g // process_count
        rows = self._rows(step, process_index * share, (process_index + 1) * share, views)
        return type(rows)(*(None if v is None else v.reshape(local_device_count, -1, *v.shape[1:]) for v in rows))

    def epochs_steps(self, epochs: int) -> int:
        """How many global batches the first `epochs` epochs hold."""
        return epochs * self.steps_per_epoch

    def batches(self, start_step: int, process_index: int = 0, process_count: int = 1,
                local_device_count: int = 1, views=None) -> Iterator:
        """Yields local batches for start_step, start_step + 1, ... forever."""
        for step in itertools.count(start_step):
            yield self.local_batch(step, process_index, process_count, local_device_count, views)


class TrainData(BatchSource):
    """Seeded batches of (image, flip, template) drawn per epoch; step s depends on (seed, s) only.

    An epoch is `num_images * repeats` example slots (slot k shows image k % num_images), shuffled,
    each with its own flip and template, cut into `steps_per_epoch` global batches; the remainder
    is dropped, as with a DataLoader's drop_last=True. An image with a caption is shown with its
    caption's ids in place of the template drawn for the slot, so the draws (and the batches of
    images without captions) are the same with or without captions.

    Batches are PixelBatch by default; pass `views=LatentViews(...)` to the batch methods for
    LatentBatch of the same examples.
    """

    def __init__(
        self,
        images: np.ndarray,
        template_ids: np.ndarray,
        repeats: int,
        flip_p: float,
        seed: int,
        global_batch_size: int,
        captions: Optional[Sequence[Optional[np.ndarray]]] = None,
        time_ids: Optional[np.ndarray] = None,
        masks: Optional[np.ndarray] = None,
    ):
        """Args: images uint8 [N, H, W, 3], or a Bucketed of them (--enable_bucket); template_ids int32 [T, L]; captions: None, or per
        image int32 [L] caption ids (captions.tokenize_captions) or None to use the templates;
        time_ids: None, or float32 [N, 6] per image (SDXL: images.load_image_set's); masks:
        None, or float32 [N, H, W] per image (--masked_loss: images.load_image_set's), or with
        bucketed images a Bucketed of float32 [h, w] masks in the images' buckets (run.py keeps
        them on each bucket's latent grid)."""
        if isinstance(images, Bucketed):  # --enable_bucket: each bucket's images as the array below
            for array in images.arrays:
                if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
                    raise ValueError(f"images must be uint8 [N,H,W,3] per bucket, got {array.dtype} {array.shape}")
        elif images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        if template_ids.ndim != 2 or len(template_ids) == 0:
            raise ValueError(f"template_ids must be [T, L] with T > 0, got {template_ids.shape}")
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"captions must have one entry per image ({len(images)}), got {len(captions)}")
        if captions is not None and any(c is not None and np.shape(c) != template_ids.shape[1:] for c in captions):
            raise ValueError(f"each caption must be [{template_ids.shape[1]}] ids like a template")
        if repeats < 1 or global_batch_size < 1:
            raise UserError(f"repeats ({repeats}) and batch ({global_batch_size}) must be >= 1")
        if not 0.0 <= flip_p <= 1.0:
            raise UserError(f"flip_p must be in [0, 1], got {flip_p}")
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        if time_ids is not None and np.shape(time_ids) != (len(images), 6):
            raise ValueError(f"time_ids must be [{len(images)}, 6], got {np.shape(time_ids)}")
        if isinstance(masks, Bucketed):  # --enable_bucket: item i's mask in item i's bucket
            if not (isinstance(images, Bucketed) and np.array_equal(masks.bucket, images.bucket)
                    and all(m.ndim == 3 and m.dtype == np.float32 for m in masks.arrays)):
                raise ValueError("bucketed masks must be a Bucketed of float32 [n, h, w], one per image in its bucket")
        elif masks is not None and np.shape(masks) != images.shape[:3]:
            raise ValueError(f"masks must be [N, H, W] = {list(images.shape[:3])}, got {np.shape(masks)}")
        self.images = images
        self.masks = masks if masks is None or isinstance(masks, Bucketed) else np.asarray(masks, np.float32)
        self.time_ids = None if time_ids is None else np.asarray(time_ids, np.float32)
        self.template_ids = np.asarray(template_ids, dtype=np.int32)
        self.captions = None if captions is None else tuple(captions)
        if captions is not None:  # per image: whether it has a caption, and its ids (zeros if not)
            blank = np.zeros(template_ids.shape[1:], np.int32)
            self._captioned = np.array([c is not None for c in captions], dtype=bool)
            self._caption_ids = np.stack([blank if c is None else np.asarray(c, np.int32) for c in captions])
        self.repeats, self.flip_p, self.seed = int(repeats), float(flip_p), int(seed)
        self.global_batch_size = int(global_batch_size)
        self.epoch_size = len(images) * self.repeats
        self.steps_per_epoch = self.epoch_size // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"global batch size {global_batch_size} is larger than images x repeats "
                f"({len(images)} x {repeats} = {self.epoch_size}); lower it or raise --repeats"
            )
        self._epoch = -1
        self._plan = None

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (image index, flip, template index) for each position of an epoch."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            # Draw order is part of the format: changing it changes every run's batches.
            slots = rng.permutation(self.epoch_size)
            flips = rng.random(self.epoch_size) < self.flip_p
            templates = rng.integers(len(self.template_ids), size=self.epoch_size)
            self._plan = (slots % len(self.images), flips, templates)
            self._epoch = epoch
        return self._plan

    @property
    def num_captioned(self) -> int:
        """How many images have a caption (the others are shown with the templates)."""
        return 0 if self.captions is None else int(self._captioned.sum())

    def prompt_ids(self, images: np.ndarray, templates: np.ndarray) -> np.ndarray:
        """int32 [n, L]: each image's caption ids where it has a caption, else its template's."""
        prompt_ids = self.template_ids[templates]  # fancy indexing copies
        if self.captions is not None:
            captioned = self._captioned[images]
            prompt_ids[captioned] = self._caption_ids[images[captioned]]
        return prompt_ids

    def slot_images(self, epoch: int) -> np.ndarray:
        """int64 [epoch_size]: the image of each slot of an epoch (bucket_data regroups slots by it)."""
        return self.epoch_plan(epoch)[0]

    def select(self, epoch: int, slots) -> tuple[np.ndarray, ...]:
        """Slots `slots` (a slice or indices) of an epoch: (image index, flip, prompt ids int32
        [n, L], concept id (0))."""
        image_idx, flips, template_idx = self.epoch_plan(epoch)
        images = image_idx[slots]
        return images, flips[slots], self.prompt_ids(images, template_idx[slots]), np.zeros(len(images), np.int32)
