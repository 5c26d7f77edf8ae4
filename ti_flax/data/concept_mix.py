"""Several concepts in one run: global batches drawn over every concept, by weight.

Each concept keeps its own images, templates (or captions) and repeats in a `data.TrainData`;
`ConceptMix` deals every global batch from all of them, still a pure function of (seed, step):

- An epoch has `steps_per_epoch * G` example slots, `steps_per_epoch` being the concepts'
  slots together (`sum(images x repeats)`) over the global batch G.
- Each concept gets its weight's share of the epoch's slots, exactly (largest remainders), so a
  concept with 3 images is shown as often as one with 30 when their weights are equal. The
  slots' concepts are shuffled from `default_rng([seed, epoch])`.
- A concept's slots of an epoch walk through shuffles of its own `images x repeats` slots, with
  a flip and a template each, from `default_rng([seed, epoch, 1, concept])`.

Images of all concepts are stacked into one array (`images`), so the views of data.py and the
latent cache work unchanged; each example also carries its concept's index (`concept_ids`).
"""

import math
from collections.abc import Sequence

import numpy as np

from ..errors import UserError
from .batches import BatchSource, Bucketed, TrainData


def apportion(total: int, weights: Sequence[float]) -> np.ndarray:
    """`total` slots split in proportion to `weights`, exactly: floors, then the largest
    remainders (ties to the earlier concept) get one more each. int64 [len(weights)]."""
    w = np.asarray(weights, dtype=np.float64)
    quota = total * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    short = total - int(counts.sum())
    order = sorted(range(len(w)), key=lambda i: (-(quota[i] - counts[i]), i))
    counts[order[:short]] += 1
    return counts


class ConceptMix(BatchSource):
    """Seeded global batches over several concepts; step s depends on (seed, s) only.

    Args:
      parts: one TrainData per concept (its global_batch_size is not used); all share the
        resolution and the prompt length.
      weights: each concept's share of every epoch, relative to the others (> 0).
      names: each concept's name for error messages (its placeholder token).
      seed, global_batch_size: as for TrainData.
    """

    def __init__(self, parts: Sequence[TrainData], weights: Sequence[float], names: Sequence[str], seed: int,
                 global_batch_size: int):
        if not parts or len(weights) != len(parts) or len(names) != len(parts):
            raise ValueError(f"need one weight and name per part, got {len(parts)}, {len(weights)}, {len(names)}")
        if not all(w > 0 and math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
        self.parts = tuple(parts)
        self.weights = tuple(float(w) for w in weights)
        self.seed, self.global_batch_size = int(seed), int(global_batch_size)
        if isinstance(parts[0].images, Bucketed):  # --enable_bucket
            self.images = Bucketed.concatenate([p.images for p in parts])
        else:
            self.images = np.concatenate([p.images for p in parts])
        if parts[0].time_ids is not None:  # SDXL: every image's own size and crop
            self.time_ids = np.concatenate([p.time_ids for p in parts])
        if isinstance(parts[0].masks, Bucketed):  # --masked_loss with --enable_bucket
            self.masks = Bucketed.concatenate([p.masks for p in parts])
        elif parts[0].masks is not None:  # --masked_loss: every image's mask
            self.masks = np.concatenate([p.masks for p in parts])
        self.offsets = np.cumsum([0] + [len(p.images) for p in parts])[:-1]
        self.prompt_length = parts[0].template_ids.shape[1]  # the same tokenizer: every concept's
        slots = sum(p.epoch_size for p in parts)
        self.steps_per_epoch = slots // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"global batch size {global_batch_size} is larger than all concepts' images x repeats "
                f"({slots}); lower it or raise the concepts' repeats"
            )
        self.epoch_size = self.steps_per_epoch * self.global_batch_size
        self.counts = apportion(self.epoch_size, self.weights)
        if not self.counts.all():
            name = names[int(np.argmin(self.counts))]
            raise UserError(
                f"concept {name} gets no example in an epoch of {self.epoch_size}: raise its weight or its "
                "repeats, or lower the other concepts' weights"
            )
        self._epoch = -1
        self._plan = None

    @property
    def num_captioned(self) -> int:
        return sum(p.num_captioned for p in self.parts)

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(concept, image index within the concept, flip, template index) per slot of an epoch."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            concept = rng.permutation(np.repeat(np.arange(len(self.parts)), self.counts))
            image = np.zeros(self.epoch_size, np.int64)
            flip = np.zeros(self.epoch_size, bool)
            template = np.zeros(self.epoch_size, np.int64)
            for c, part in enumerate(self.parts):
                m = int(self.counts[c])
                part_rng = np.random.default_rng([self.seed, epoch, 1, c])
                # Draw order is part of the format: changing it changes every run's batches.
                laps = -(-m // part.epoch_size)
                slots = np.concatenate([part_rng.permutation(part.epoch_size) for _ in range(laps)])[:m]
                at = concept == c
                image[at] = slots % len(part.images)
                flip[at] = part_rng.random(m) < part.flip_p
                template[at] = part_rng.integers(len(part.template_ids), size=m)
            self._plan = (concept, image, flip, template)
            self._epoch = epoch
        return self._plan

    def slot_images(self, epoch: int) -> np.ndarray:
        """int64 [epoch_size]: the image (index into `images`) of each slot of an epoch."""
        concept, image, _, _ = self.epoch_plan(epoch)
        return self.offsets[concept] + image

    def select(self, epoch: int, slots):
        """Slots `slots` (a slice or indices) of an epoch: (image index into `images`, flip, prompt
        ids int32 [n, L], concept id int32)."""
        concept, image, flip, template = self.epoch_plan(epoch)
        concept, image, template = concept[slots], image[slots], template[slots]
        prompt_ids = np.zeros((len(concept), self.prompt_length), np.int32)
        for c in np.unique(concept):
            at = concept == c
            prompt_ids[at] = self.parts[c].prompt_ids(image[at], template[at])
        return self.offsets[concept] + image, flip[slots], prompt_ids, concept.astype(np.int32)
