"""--enable_bucket: global batches that each come from one aspect-ratio bucket.

XLA compiles a program per shape, so every global batch must hold images of one shape, on every
device and host. `BucketBatches` takes the slots of each epoch from a square run's source (a
`data.TrainData`, or a `concept_data.ConceptMix` for several concepts: the same images, flips,
prompts and weights) and deals them into batches by bucket, still a pure function of (seed, step):

- The source's slots of an epoch (already shuffled) are grouped by their image's bucket, in slot
  order, and cut into global batches of G.
- A bucket's last batch, or a bucket with fewer slots than G, is filled with repeats of that
  bucket's own slots, drawn from `default_rng([seed, epoch, 2])`: no slot is dropped, and an
  image never changes shape to fill another bucket.
- The batches of an epoch are then shuffled with the same generator, so the buckets take turns.

An epoch of a `TrainData` holds every image `repeats` times, so its batch count is the same each
epoch; a `ConceptMix` epoch draws images by weight, so its count may change from one epoch to the
next, and the first step of each epoch is counted from the ones before it (cheap: numpy only).
"""

import bisect

import numpy as np

from .batches import BatchSource, Bucketed


class BucketBatches(BatchSource):
    """Seeded global batches of one bucket each; step s depends on (seed, s) only.

    Args:
      source: a data.TrainData or concept_data.ConceptMix whose `images` is a data.Bucketed.
      seed: the run's --seed. global_batch_size: G, examples per global batch.
    """

    def __init__(self, source, seed: int, global_batch_size: int):
        if not isinstance(source.images, Bucketed):
            raise ValueError("BucketBatches needs a source whose images are a data.Bucketed")
        self.source, self.seed, self.global_batch_size = source, int(seed), int(global_batch_size)
        self.images, self.time_ids, self.masks = source.images, source.time_ids, source.masks
        self._starts = [0]  # the first step of epochs 0, 1, ... counted so far
        self._epoch, self._plan = -1, None
        self.steps_per_epoch = self.epochs_steps(1)  # the first epoch's (the banner's figure)

    @property
    def num_captioned(self) -> int:
        return self.source.num_captioned

    @property
    def parts(self):
        """Each concept's TrainData (the banner's concept lines), as ConceptMix has them."""
        return getattr(self.source, "parts", (self.source,))

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """int64 [steps of the epoch, G]: the source's slots of the epoch that each global batch shows."""
        if epoch != self._epoch:
            g = self.global_batch_size
            slots = self.source.slot_images(epoch)
            bucket = self.images.bucket[slots]
            rng = np.random.default_rng([self.seed, epoch, 2])
            batches = []
            # Draw order is part of the format: changing it changes every bucketed run's batches.
            for b in range(len(self.images.shapes)):
                at = np.flatnonzero(bucket == b)
                if not len(at):
                    continue
                fill = -len(at) % g
                laps = -(-fill // len(at))
                repeats = np.concatenate([rng.permutation(len(at)) for _ in range(laps)] or [np.zeros(0, np.int64)])
                batches.append(np.concatenate([at, at[repeats[:fill]]]).reshape(-1, g))
            batches = np.concatenate(batches)
            self._plan = batches[rng.permutation(len(batches))]
            self._epoch = epoch
        return self._plan

    def epochs_steps(self, epochs: int) -> int:
        """How many global batches the first `epochs` epochs hold."""
        while len(self._starts) <= epochs:
            self._starts.append(self._starts[-1] + len(self.epoch_plan(len(self._starts) - 1)))
        return self._starts[epochs]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch of the epoch) of global step `step`."""
        while self._starts[-1] <= step:
            self.epochs_steps(len(self._starts))
        epoch = bisect.bisect_right(self._starts, step) - 1
        return epoch, step - self._starts[epoch]

    def examples(self, step: int, lo: int, hi: int):
        """Rows [lo, hi) of global batch `step`, all of one bucket: (image index into `images`,
        flip, prompt ids int32 [n, L], example id, concept id int32)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, pos = self.locate(step)
        images, flips, prompt_ids, concept_ids = self.source.select(epoch, self.epoch_plan(epoch)[pos, lo:hi])
        example_ids = np.arange(lo, hi, dtype=np.int64) + step * self.global_batch_size
        return images, flips, prompt_ids, example_ids, concept_ids

    def bucket_of(self, step: int) -> int:
        """The bucket (index into `images.shapes`) global batch `step` comes from."""
        return int(self.images.bucket[self.examples(step, 0, 1)[0][0]])
