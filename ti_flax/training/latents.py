"""--cache_latents: VAE-encode each (image, flip) view once, up front, and train from the cache.

Resizing and cropping happen once when the images are loaded and a horizontal flip is the only
random augmentation, so a run only ever shows the VAE `2 x num_images` distinct views. Encoding
each of them once, before the first step, takes the VAE encoder out of the train step. The cache
keeps the posterior's mean and log-variance, not a sample: each step still draws the latent
sample with the example's own key (`step.example_draws`), so the training distribution and the
draws are those of a run without the cache.
"""

import functools
import math

import jax
import numpy as np

from .. import parallel
from ..data import batches as data_lib
from . import step as step_lib

ENCODE_BATCH_PER_DEVICE = 8


@functools.lru_cache(maxsize=8)
def _pmapped_encode(spec, compute, devices):
    # Like the train step, the pmap spans every process's devices in a multi-process run: each
    # process encodes the same views in the same calls, so they stay in step.
    return jax.pmap(functools.partial(step_lib.encode_pixels, spec, compute), devices=parallel.pmap_devices(devices))


@functools.lru_cache(maxsize=8)
def _sharded_encode(spec, compute, devices):
    # The VAE split over the mesh (--shard_weights): one program over every process's devices,
    # each process giving the same views as its slices, as with the pmap.
    return parallel.mesh_map(functools.partial(step_lib.encode_pixels, spec, compute), devices,
                             (None, parallel.SPLIT), parallel.SPLIT)


def encode_views(spec, compute, vae_params, images, devices, batch_per_device=ENCODE_BATCH_PER_DEVICE,
                 layout=None):
    """VAE posterior of every image, unflipped and flipped, in batches sharded over `devices`.

    Args:
      spec: models.ModelSpec. compute: models.Compute (its dtype is the VAE's compute dtype).
      vae_params: VAE params on `devices`, as `layout` placed them.
      images: uint8 [N, H, W, 3], the decoded training images.
      devices: the local devices to encode on.
      batch_per_device: views per device per call (the last call is padded).
      layout: the run's parallel layout (default: parallel.Replicated, the VAE on every device);
        with parallel.Sharded, one program over its mesh.
    Returns:
      (mean, logvar): float32 numpy [N, 2, C, h, w]; index [i, 1] is image i flipped.
    """
    views = np.stack([images, images[:, :, ::-1]], axis=1).reshape(-1, *images.shape[1:])
    mean, logvar = encode_images(spec, compute, vae_params, views, devices, batch_per_device, layout)
    shape = (len(images), 2) + mean.shape[1:]
    return mean.reshape(shape), logvar.reshape(shape)


def encode_images(spec, compute, vae_params, images, devices, batch_per_device=ENCODE_BATCH_PER_DEVICE, layout=None):
    """VAE posterior of each of `images` (uint8 [n, H, W, 3]) as they are: float32 numpy
    (mean, logvar) [n, C, h, w]; the other arguments as for `encode_views`."""
    n, num_devices = len(images), len(devices)
    per_device = max(1, min(batch_per_device, math.ceil(n / num_devices)))
    chunk = per_device * num_devices
    layout = layout or parallel.Replicated(devices)
    if layout.sharded:
        encode, place = _sharded_encode(spec, compute, tuple(devices)), layout.batch
    else:
        encode, place = _pmapped_encode(spec, compute, tuple(devices)), np.asarray
    means, logvars = [], []
    for start in range(0, n, chunk):
        part = images[start : start + chunk]
        pad = chunk - len(part)
        if pad:  # one compiled shape for every call: pad with copies of the last image
            part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
        mean, logvar = encode(vae_params, place(part.reshape(num_devices, per_device, *part.shape[1:])))
        means.append(parallel.local_rows(mean).reshape(chunk, *mean.shape[2:])[: chunk - pad])
        logvars.append(parallel.local_rows(logvar).reshape(chunk, *logvar.shape[2:])[: chunk - pad])
    return np.concatenate(means), np.concatenate(logvars)


def latent_views(spec, compute, vae_params, images, devices, layout=None):
    """The --cache_latents view source: every image encoded once, unflipped and flipped.

    Args: as for `encode_views`; `images` may be a data.Bucketed (--enable_bucket), each bucket's
      images then encoded as one array (one encoder program per bucket shape). `layout`: the run's
      parallel layout, which placed `vae_params` (default: parallel.Replicated).
    Returns: data.LatentViews, for TrainData's batch methods.
    """
    if isinstance(images, data_lib.Bucketed):
        encoded = [encode_views(spec, compute, vae_params, array, devices, layout=layout) for array in images.arrays]
        return data_lib.LatentViews(images.with_arrays([m for m, _ in encoded]),
                                    images.with_arrays([v for _, v in encoded]))
    return data_lib.LatentViews(*encode_views(spec, compute, vae_params, images, devices, layout=layout))


def latent_batch_shapes(spec, compute, vae_params, batch):
    """What a LatentBatch of the same examples as a PixelBatch looks like, with nothing encoded.

    Args:
      spec, compute: as for `encode_views`. vae_params: the VAE's params or their
        jax.ShapeDtypeStruct tree (no device axis). batch: a local PixelBatch's arrays or shapes,
        [devices, B, ...].
    Returns:
      A LatentBatch of jax.ShapeDtypeStruct: latent_mean and latent_logvar float32
      [devices, B, C, h, w], input_ids, example_ids, concept_ids, time_ids and mask as in `batch`.
    """
    pixels = batch.pixel_values
    one_device = jax.ShapeDtypeStruct(tuple(pixels.shape[1:]), pixels.dtype)
    mean, _ = jax.eval_shape(functools.partial(step_lib.encode_pixels, spec, compute), vae_params, one_device)
    moments = jax.ShapeDtypeStruct(tuple(pixels.shape[:1]) + tuple(mean.shape), np.float32)
    rest = parallel.shapes((batch.input_ids, batch.example_ids, batch.concept_ids, batch.time_ids, batch.mask))
    return data_lib.LatentBatch(moments, moments, *rest)
