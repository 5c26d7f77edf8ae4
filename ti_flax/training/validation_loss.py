"""The validation loss: the plain diffusion loss of fixed examples, comparable from step to step.

Its examples are the run's validation images (`run.Run.validation_images`: the images
--validation_split holds out of training, else every training image), each unflipped with its
caption or else its first template, at each of kohya sd-scripts' fixed validation timesteps
(train_network.py: `np.linspace(0, num_train_timesteps, 4 + 2, dtype=int)[1:-1]`, i.e. 200, 400,
600 and 800 for Stable Diffusion's 1000). Example `e` is image `e // 4` at the `e % 4`-th
timestep; its latent sample and diffusion noise are `step.example_draws` of `fold_in(key, e)`,
`key = validation_key(--seed)`, a key no training step uses. So every evaluation of a run, on any
number of devices, before or after a resume, sees the same noisy latents, and only the learned
rows change the number. The loss is the unweighted mean squared error of the UNet's prediction
(`step.validation_losses`), whatever the training loss weights.

Shapes are fixed so that no example's value depends on the device count: each device computes
BATCH_PER_DEVICE examples per call, so example `e` is always computed in slot `e % B` beside the
same neighbours (the last per-device batch is padded with copies of the last example), and the
host reduces the per-example losses in example order.
"""

from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from .. import parallel
from ..data import batches as data_lib
from . import latents, step as step_lib

TIMESTEP_COUNT = 4  # kohya's NUM_VALIDATION_TIMESTEPS
BATCH_PER_DEVICE = 4  # examples per device per call: fixed, whatever the run's batch or device count
KEY_STREAM = 2**32 - 1  # fold_in(PRNGKey(seed), step) keys the steps, which never reach it


def fixed_timesteps(num_train_timesteps, count=TIMESTEP_COUNT):
    """int32 [count]: kohya's validation timesteps, evenly inside [0, num_train_timesteps]."""
    return np.linspace(0, num_train_timesteps, count + 2, dtype=int)[1:-1].astype(np.int32)


def validation_key(seed):
    """The PRNG key of the validation loss's draws."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), KEY_STREAM)


def examples(num_images, timesteps):
    """(image index, timestep, example id), each [num_images * len(timesteps)], in example order."""
    count = num_images * len(timesteps)
    ids = np.arange(count, dtype=np.int64)
    return ids // len(timesteps), np.asarray(timesteps, np.int32)[ids % len(timesteps)], ids


class Evaluator:
    """The validation loss of one run's learned rows, on its devices.

    Args:
      spec: models.ModelSpec. compute: models.Compute.
      images: data.ValidationImages. seed: the run's --seed (the draws' key).
      devices: the local devices (in a multi-process run every process evaluates its share).
      vae: with --cache_latents, the VAE params on the devices: the images are encoded once,
        here, and the batches carry their cached moments (the step's frozen weights then have no VAE).
      names: in a run of several concepts, each concept's name (its first token): a loss each.
      layout: the run's parallel layout (default parallel.Replicated: the loss pmapped); with
        parallel.Sharded (--shard_weights), one program over its mesh, the same examples in the
        same slots.
      chosen: (image index, timestep index, example id) arrays of the examples to evaluate (the
        deterministic loss of --early_stopping evaluates a few: early_stopping.examples); default:
        every image at every timestep, `examples`.
      guidance: FLUX.1 [dev]'s embedded guidance, the training's (the run's LossSpec.guidance_scale);
        None for the other families.
    Attributes:
      count: the number of examples (validation images x timesteps, or those chosen).
    """

    def __init__(self, spec, compute, images, seed, devices, vae=None, names=(), layout=None, chosen=None,
                 guidance=None):
        self.names, self.devices = tuple(names), tuple(devices)
        self.layout = layout or parallel.Replicated(self.devices)
        timesteps = fixed_timesteps(spec.num_train_timesteps)
        if chosen is None:
            image, timesteps, example_ids = examples(len(images.images), timesteps)
        else:
            image, timestep_index, example_ids = (np.asarray(x, np.int64) for x in chosen)
            timesteps = timesteps[timestep_index]
        self.count = len(example_ids)
        self.concept_ids = images.concept_ids[image]
        moments = None
        if vae is not None:
            moments = latents.encode_images(spec, compute, vae, images.images, self.devices, layout=self.layout)
        local, processes = len(self.devices), jax.process_count()
        per_call = BATCH_PER_DEVICE * local * processes
        mine = slice(jax.process_index() * BATCH_PER_DEVICE * local, (jax.process_index() + 1) * BATCH_PER_DEVICE * local)
        self.calls = []  # (batch, timesteps) on the devices, [local devices, BATCH_PER_DEVICE, ...] each
        for start in range(0, self.count, per_call):
            # Slots past the last example repeat it: the same program, and its neighbours unchanged.
            at = np.minimum(np.arange(start, start + per_call), self.count - 1)[mine]
            rows = image[at]
            rest = (images.prompt_ids[rows], example_ids[at], images.concept_ids[rows],
                    None if images.time_ids is None else images.time_ids[rows])
            if moments is None:
                batch = data_lib.PixelBatch(images.images[rows], *rest)
            else:
                batch = data_lib.LatentBatch(moments[0][rows], moments[1][rows], *rest)
            split = lambda x: None if x is None else x.reshape(local, BATCH_PER_DEVICE, *x.shape[1:])  # noqa: E731
            self.calls.append(self.layout.batch((type(batch)(*map(split, batch)), split(timesteps[at]))))
        self.key = self.layout.state(validation_key(seed))
        losses = step_lib.sharded_validation_losses if self.layout.sharded else step_lib.pmapped_validation_losses
        self.fn = losses(spec, compute, self.devices, guidance)
        self._ahead = None  # the program compile_in_background is compiling

    def compile_in_background(self, rows, frozen):
        """Start compiling the loss on a thread, for arguments shaped like `rows` and `frozen` (the
        engine's rows and frozen weights on the devices; their shapes are read now, so the rows may
        be donated after). The first evaluation then runs that program instead of tracing and
        compiling inside the training loop."""
        batch, timesteps = self.calls[0]  # every call is shaped alike
        args = self.layout.shapes_of((rows, frozen, batch, timesteps, self.key))
        pool = ThreadPoolExecutor(1, thread_name_prefix="ti_flax-compile-validation")
        self._ahead = pool.submit(step_lib.compiled_ahead, self.fn, *args)
        pool.shutdown(wait=False)  # the thread ends when the compile does

    def per_example(self, rows, frozen):
        """float32 numpy [count]: each example's loss with `rows`, in example order.

        Args: rows: the learned rows on the devices (the engine's state.rows). frozen: the Frozen
          on the devices (its VAE is read only without --cache_latents), both as the layout placed them.
        """
        if self._ahead is not None:  # re-raises what the compile raised
            self.fn, self._ahead = self._ahead.result(), None
        out = [self.fn(rows, frozen, batch, timesteps, self.key) for batch, timesteps in self.calls]
        local = np.stack([parallel.local_rows(x) for x in out])  # [calls, local devices, B]
        if jax.process_count() > 1:  # every process's share of each call, in device order
            from jax.experimental import multihost_utils

            local = np.moveaxis(multihost_utils.process_allgather(local), 0, 1)  # [calls, processes, local, B]
        return local.reshape(-1)[: self.count]

    def __call__(self, rows, frozen):
        """{"loss": the mean over every example; with several concepts also "loss/<name>": the mean
        over that concept's examples}, as Python floats."""
        losses = self.per_example(rows, frozen).astype(np.float64)
        result = {"loss": float(np.mean(losses))}
        for i, name in enumerate(self.names):
            result[f"loss/{name}"] = float(np.mean(losses[self.concept_ids == i]))  # every concept has images
        return result
