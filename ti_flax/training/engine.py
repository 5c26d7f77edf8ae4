"""The training engine: a prepared run's step, weights, state and batches on the devices.

`build(run)` puts the frozen weights on the local devices (cast once to the compute dtype) as
the run's parallel layout says (`Run.layout`: replicated for a pmapped step, or split over the
devices with --shard_weights), caches the latents if asked, compiles the train step ahead of its
first call and starts feeding batches. `Engine.update()` then runs one optimizer update. Training (training.py), the benchmark
(scripts/benchmark.py) and the tests all drive the step through it.

    >>> engine = build(prepare(config))  # doctest: +SKIP
    >>> metrics = engine.update()  # doctest: +SKIP
"""

import time
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np

from .. import parallel
from ..families import Frozen
from . import footprint, latents, step as step_lib
from .validation_loss import Evaluator


class Engine:
    """One run's train step, ready to go. Build it with `build`.

    Attributes:
      run: the run.Run it was built for. compute: its models.Compute.
      layout: the run's parallel layout (parallel.Replicated or parallel.Sharded): where each
        tree below lies.
      frozen: the step's Frozen on the devices (vae None with --cache_latents).
      weights: the Frozen on the devices with its VAE, for sampling; None when --cache_latents
        dropped the VAE and `build` was not asked to keep it.
      state: the step.TrainState on the devices (each leaf with a leading axis that
        `parallel.unreplicate` reads), advanced by `update`.
      step_fn: the compiled step, `(state, frozen, batch, keys) -> (state, metrics)` (with
        --enable_bucket a BucketSteps: one program per bucket).
      compile_seconds: seconds compiling the step (a multi-process run compiles it on the
        first `update`, and it is None until then). cache_seconds: seconds encoding latents.
      estimated_bytes: the compiled step's memory per device (footprint.check_fits); None
        where it compiles on its first call.
      evaluator: the validation_loss.Evaluator of --validation_loss_steps, or None.
      deterministic: the validation_loss.Evaluator of --early_stopping's deterministic loss (its
        images encoded once, at build), or None.
    """

    def __init__(self, run, compute, frozen, weights, state, keys, step_fn, batches, compile_seconds,
                 cache_seconds=0.0, estimated_bytes=None, evaluator=None, deterministic=None):
        self.run, self.compute, self.frozen, self.weights = run, compute, frozen, weights
        self.layout = run.layout
        self.state, self.keys, self.step_fn, self.batches = state, keys, step_fn, batches
        self.compile_seconds, self.cache_seconds = compile_seconds, cache_seconds
        self.estimated_bytes = estimated_bytes
        self.accumulation = run.config.gradient_accumulation_steps
        self.evaluator, self.deterministic = evaluator, deterministic

    def update(self):
        """Dispatch one optimizer update (its `gradient_accumulation_steps` micro-steps).

        Returns the micro-steps' metrics, device arrays, without waiting for them:
        read them with `parallel.unreplicate` and `step.mean_metrics`.
        """
        metrics = []
        for _ in range(self.accumulation):
            batch, start = next(self.batches), time.perf_counter()
            self.state, micro = self.step_fn(self.state, self.frozen, batch, self.keys)
            if self.compile_seconds is None:  # compiled by this first call (multi-process); it runs asynchronously
                self.compile_seconds = time.perf_counter() - start
            metrics.append(micro)
        return metrics

    def validation_loss(self):
        """The validation loss of the rows the outputs use now (the learned rows, or with --use_ema
        their moving average; waits for the last update): {"loss", and with several concepts
        "loss/<name>"}; see validation_loss.Evaluator."""
        return self.evaluator(self.state.output_rows, self.scored())

    def deterministic_loss(self):
        """--early_stopping's deterministic loss of the rows the outputs use now (waits for the
        last update), a Python float; see early_stopping.py."""
        return self.deterministic(self.state.output_rows, self.scored())["loss"]

    def scored(self):
        """The frozen weights the losses are computed with now: with --lora_rank, the LoRA's
        current factors attached to the denoiser."""
        return _with_lora(self.run, self.frozen, self.state)

    def rows(self):
        """The rows the run's outputs use now, float32 numpy [num_vectors, hidden] (waits for the
        last update): the learned rows, or with --use_ema their moving average."""
        return parallel.unreplicate(self.state.output_rows)

    def lora(self):
        """The LoRA's factors now, {module: {"lora_A", "lora_B"}} float32 numpy (None without
        --lora_rank; waits for the last update)."""
        return None if self.state.lora is None else parallel.unreplicate(self.state.lora)

    def lora_pair(self):
        """(factors, scale) of the LoRA now, as the sampler takes it; None without --lora_rank."""
        return None if self.state.lora is None else (self.lora(), self.run.opt_spec.lora.scale)


def build(run, state=None, start_step=0, *, keep_vae=False):
    """Set up `run` on its devices and compile its step.

    Args:
      run: a run.Run (see run.prepare).
      state: the host step.TrainState to start from (default: fresh from run.init_rows).
      start_step: the optimizer update it is at (the data continue from there).
      keep_vae: with --cache_latents, keep the VAE on the devices anyway (`Engine.weights`), for
        sampling validation images.
    Returns:
      An Engine.
    Raises:
      UserError (one line) when the compiled step needs more memory than a device has
      (footprint.check_fits), before the first step.
    """
    config, devices, compute, layout = run.config, run.devices, run.compute, run.layout
    if state is None:
        state = step_lib.init_state(run.init_rows, run.opt_spec)
    # The step compiles from shapes in the background while the frozen weights are cast (once,
    # on the host; run.model keeps float32 for the outputs) and copied to the devices and the
    # latents are cached; the first step then runs the finished program.
    compiling = compile_in_background(run, state, Frozen.from_model(run.model, compute.dtype, abstract=True),
                                      start_step)
    host_frozen = Frozen.from_model(run.model, compute.dtype)
    frozen = weights = layout.weights(host_frozen)
    del host_frozen
    views, cache_seconds = None, 0.0
    if config.cache_latents:  # encode every view now; the step then never sees the VAE
        start = time.perf_counter()
        views = latents.latent_views(run.model.spec, compute, frozen.vae, run.data.images, devices, layout)
        cache_seconds = time.perf_counter() - start
    evaluator = None
    if run.validation_images is not None:  # with --cache_latents its images are encoded now, with the VAE
        evaluator = Evaluator(run.model.spec, compute, run.validation_images, config.seed, devices,
                              frozen.vae if config.cache_latents else None, run.concept_names, layout,
                              guidance=run.loss_spec.guidance_scale)
    deterministic = None
    if run.stopping_images is not None:  # a few images, encoded once: the loss runs every step or so
        deterministic = Evaluator(run.model.spec, compute, run.stopping_images, config.seed, devices, frozen.vae,
                                  chosen=run.stopping_examples, layout=layout, guidance=run.loss_spec.guidance_scale)
    if config.cache_latents:
        frozen = frozen._replace(vae=None)
        weights = weights if keep_vae else None
    state = layout.state(state)
    keys = layout.state(jax.random.PRNGKey(config.seed))
    if deterministic is not None:  # evaluated before the first step: its program compiles beside the step's
        deterministic.compile_in_background(state.output_rows, _with_lora(run, frozen, state))
    step_fn, compile_seconds = compiling.result()
    if evaluator is not None:  # its program compiles behind the first steps, not inside the loop
        evaluator.compile_in_background(state.output_rows, _with_lora(run, frozen, state))
    estimated = None
    if compile_seconds is not None:  # compiled ahead: it must fit before anything runs
        def suggestions():  # only asked for when the step does not fit
            backend = footprint.platform(devices[0])
            changes = [flags for flags, _ in footprint.lighter_changes(config, run.model.spec, backend, config.resolution)]
            # Splitting the weights helps only over several devices, and only a family that may;
            # weights split already need more devices to split them further.
            count = len(devices) * jax.process_count()
            if layout.sharded:
                return [f"more than {count} devices to split the weights over"] + changes
            split = run.family.shards_weights and count > 1
            return ["--shard_weights"] * split + changes

        # Every bucket has at most --resolution^2 pixels: the first one's program stands for them all.
        program = step_fn.program() if isinstance(step_fn, BucketSteps) else step_fn
        estimated = footprint.check_fits(program, devices, suggestions)
    batches = layout.prefetch(
        run.data.batches(start_step * config.gradient_accumulation_steps, jax.process_index(), jax.process_count(),
                         len(devices), views))
    return Engine(run, compute, frozen, weights, state, keys, step_fn, batches, compile_seconds, cache_seconds,
                  estimated, evaluator, deterministic)


def _with_lora(run, frozen, state):
    """`frozen` with `state`'s LoRA factors attached (laid out alike), or as it is without --lora_rank."""
    lora = run.opt_spec.lora
    return frozen if lora is None else frozen.with_lora(state.lora, lora.scale)


def step_shapes(run, state, host_frozen, start_step, bucket=None):
    """The train step's arguments (state, frozen, batch, key) as jax.ShapeDtypeStruct trees laid
    out as the engine will pass them (the run's parallel layout), from host trees: nothing needs
    to be on the devices.

    `host_frozen` is the host Frozen the engine replicates (cast, with its VAE), or its
    shapes (`Frozen.from_model(..., abstract=True)`). `bucket`
    (--enable_bucket): the batch's images are that bucket's (index into `run.data.images.shapes`).
    """
    config, devices, layout = run.config, run.devices, run.layout
    frozen = layout.weight_shapes(host_frozen)
    batch = run.data.local_batch(start_step * config.gradient_accumulation_steps, jax.process_index(),
                                 jax.process_count(), len(devices))
    if bucket is not None:  # the same batch, shaped as that bucket's images (a view of one zero)
        lead = batch.pixel_values.shape[:2]
        batch = batch._replace(pixel_values=np.broadcast_to(np.zeros((), np.uint8),
                                                            (*lead, *run.data.images.shapes[bucket], 3)))
        if batch.mask is not None:  # and its masks (on the bucket's latent grid)
            batch = batch._replace(mask=np.broadcast_to(np.zeros((), np.float32),
                                                        (*lead, *run.data.masks.arrays[bucket].shape[1:])))
    if config.cache_latents:
        frozen = frozen._replace(vae=None)
        batch = latents.latent_batch_shapes(run.model.spec, run.compute, parallel.shapes(host_frozen.vae), batch)
    key = layout.state_shapes(jax.random.PRNGKey(config.seed))
    return layout.state_shapes(state), frozen, layout.batch_shapes(batch), key


def compile_in_background(run, state, frozen_shapes, start_step):
    """Start compiling the train step on a thread; returns a future of (step, seconds).

    Its `result()` re-raises whatever the compile raised. In a multi-process run a pmapped step
    compiles on its first call instead (see step.compile_train_step): (step, None) at once. With
    --enable_bucket, the step is a BucketSteps, one program per bucket, and the seconds are
    those of the first step's bucket, which the future waits for (the others compile after it,
    on the same thread).
    """
    statics = (run.model.spec, run.compute, run.opt_spec, run.devices)
    options = {"num_concepts": run.num_concepts, "loss_spec": run.loss_spec, "sharded": run.layout.sharded}
    if jax.process_count() > 1 and not run.layout.sharded:  # pmap compiles a program per shape on its first call
        args = step_shapes(run, state, frozen_shapes, start_step)
        done = Future()
        done.set_result((step_lib.compile_train_step(*statics, *args, **options), None))
        return done

    def compile_step(args):
        start = time.perf_counter()
        fn = step_lib.compile_train_step(*statics, *args, **options)
        return fn, time.perf_counter() - start

    pool = ThreadPoolExecutor(1, thread_name_prefix="ti_flax-compile")
    try:
        if not run.config.enable_bucket:
            return pool.submit(compile_step, step_shapes(run, state, frozen_shapes, start_step))
        # Every bucket holds images, so every one is used: the first step's bucket first.
        first = run.data.bucket_of(start_step * run.config.gradient_accumulation_steps)
        order = [first] + [b for b in range(len(run.data.images.shapes)) if b != first]
        programs = []
        for b in order:
            args = step_shapes(run, state, frozen_shapes, start_step, b)
            programs.append((BucketSteps.key(args[2]), pool.submit(compile_step, args)))
        steps, done = BucketSteps(dict(programs), programs[0][0]), Future()
        programs[0][1].add_done_callback(
            lambda f: done.set_exception(f.exception()) if f.exception() else done.set_result((steps, f.result()[1])))
        return done
    finally:
        pool.shutdown(wait=False)  # the thread ends when the compiles do


class BucketSteps:
    """--enable_bucket's train step: one compiled program per bucket, picked by the batch's shape.

    Built by `compile_in_background` from futures of (program, seconds) that compile in the
    background in the order the run first uses the buckets; a call waits for its own bucket's
    program only. Each program is a step.compile_train_step one: it never traces again.
    """

    def __init__(self, programs, first=None):
        self.programs = programs  # {BucketSteps.key(batch): Future of (program, seconds)}
        self.first = first  # the key of the first step's bucket

    @staticmethod
    def key(batch):
        """What tells the buckets' batches apart: the shape of their first field (images or latents)."""
        return tuple(batch[0].shape)

    def __call__(self, state, frozen, batch, keys):
        program, _ = self.programs[self.key(batch)].result()
        return program(state, frozen, batch, keys)

    def program(self, key=None):
        """The compiled program of the batches shaped `key` (default: the first step's bucket), waiting for it."""
        return self.programs[self.first if key is None else key].result()[0]
