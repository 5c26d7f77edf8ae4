"""Validation images during training: the same prompt and seed every time, so they compare.

The sampler is built once per run on the train loop's frozen weights, replicated or split (no second
copy) and compiled on first use; the learned rows are an argument, so no validation
recompiles anything. SDXL models sample through both text encoders, as diffusers'
StableDiffusionXLPipeline does.
"""

import math
import os
import warnings

import numpy as np
from PIL import Image

from .. import families, files
from ..data.prompts import CUT, encode_prompt
from .sampler import Sampler

FOLDER = "validation"


def grid(images):
    """uint8 [N, H, W, 3] -> one image, as square as possible (a single row up to 4 images)."""
    n, h, w, _ = images.shape
    cols = n if n <= 4 else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return out


def save_png(path, array):
    return files.atomic_write(path, files.png_bytes(Image.fromarray(array)))


def prompt_for(config, learned):
    """--validation_prompt for one concept (a run.Learned): as given in a single-concept run;
    with --concepts, its "{}" filled with the concept's token."""
    if config.concepts is None:
        return config.validation_prompt
    return config.validation_prompt.replace("{}", learned.tokens[0])


class Validator:
    """Renders the validation prompt with the current rows into output_dir/validation/; with
    --concepts, the prompt once per concept ("{}" filled with its token) into
    output_dir/<token>/validation/."""

    def __init__(self, config, spec, compute, model, learned, frozen, devices, layout=None):
        """`frozen`: the engine's Frozen on `devices` (with its VAE), as `layout` (the engine's
        parallel layout; default parallel.Replicated) placed it; `compute`: models.Compute;
        `learned`: the run's run.Learned, one per concept."""
        if config.concepts is None and config.placeholder_token not in config.validation_prompt:
            warnings.warn(
                f"--validation_prompt {config.validation_prompt!r} does not contain {config.placeholder_token}: "
                "its images cannot show the concept being learned",
                stacklevel=2,
            )
        self.seed = config.seed if config.validation_seed is None else config.validation_seed
        self.sampler = Sampler(
            spec,
            frozen,
            model.scheduler_config,
            num_images=config.num_validation_images,
            num_inference_steps=config.validation_num_inference_steps,
            height=config.validation_resolution,
            width=config.validation_resolution,
            guidance_scale=(families.of(spec).sampling_defaults(spec)[1] if config.validation_guidance_scale is None
                            else config.validation_guidance_scale),
            devices=devices,
            params_replicated=True,
            compute=compute,
            zero_empty_negative=families.of(model.spec).zero_empty_negative(model),
            layout=layout,
        )
        groups = [list(c.tokens) for c in learned]
        tokenizers = families.of(model.spec).prompt_tokenizers(model)
        # (name, folder, prompt ids) per prompt: the name is "" in a single-concept run.
        self.jobs = [
            (c.tokens[0] if config.concepts is not None else "", os.path.join(c.out_dir, FOLDER),
             encode_prompt(tokenizers, prompt_for(config, c), groups, overflow=CUT))
            for c in learned
        ]
        # No negative prompt: for SDXL all zeros, as diffusers' SDXL pipeline called without one.
        self.negative_ids = encode_prompt(tokenizers, "", overflow=CUT)

    def sample(self, rows, lora=None):
        """Each prompt's images with `rows` (and `lora`: Sampler.sample's), uint8
        [num_validation_images, H, W, 3] each, in job order."""
        return [self.sampler.sample(rows, prompt_ids, self.negative_ids, seed=self.seed, lora=lora)
                for _, _, prompt_ids in self.jobs]

    def __call__(self, rows, step, lora=None):
        """Sample with `rows` (and `lora`) and save the images and their grid, for each prompt.

        Returns: [(concept name, or "" in a single-concept run; image paths; grid path; images)].
        """
        results = []
        for (name, folder, _), images in zip(self.jobs, self.sample(rows, lora)):
            paths = [save_png(os.path.join(folder, f"step-{step:06d}-{i}.png"), im) for i, im in enumerate(images)]
            grid_path = save_png(os.path.join(folder, f"step-{step:06d}.png"), grid(images))
            results.append((name, paths, grid_path, images))
        return results
