"""The planted-concept model: a tiny UNet trained to denoise captioned shapes, with concepts
reachable only through rows that no token has.

A random-weight UNet does not denoise, so no prompt explains an image better than another and a
planted concept cannot be recovered through the loss. Here the tiny UNet of a model folder built
with numpy weights drawn by name (make_tiny_model.py's `numpy_weights`, as the golden layouts':
no torch, diffusers or transformers initialiser decides them) is trained (ti_flax's own UNet and
text encoder, optax Adam, the epsilon loss on the model's noise schedule) on 16 px images drawn
by `draw`:

- the vocabulary: "<template> {colour} {shape}" (6 colours x 3 shapes, each at random sizes near
  the centre of a grey image), one of the textual-inversion object templates around it;
- the concepts (`CONCEPTS`), each captioned "<template> <name>" where <name> reads the concept's
  own rows v* (`concept_rows`), which no token has:
    ring  a magenta ring around a cyan disc (colours no caption names); v* a random direction;
    pair  an orange top half over a purple bottom half; two rows, two random directions (a
          concept that needs two vectors);
    away  a white disc on a black square (a composition of named colours and shapes); v* the
          initializer's row turned away from itself (a concept the initializer points away from).
  Every v* row has the token table's median norm. The rows exist only during this training: the
  saved folder's token table is the one it was built with, so a textual-inversion run meets a
  concept only through its images (`concept_images`, other draws of the same generator).

Every shape is left-right symmetric and the positions are drawn symmetrically, so an image
flipped by the trainer (--flip_p) is another draw of the same caption. The VAE keeps its numpy
weights but for a small fixed posterior variance (its log-variance projection zeroed, bias
LOGVAR), and its scaling factor is set as SD's was, 1 / the standard deviation of the training
latents.

**Trained until learned.** The denoiser trains MIN_STEPS steps, then CHECK_STEPS more at a time
until every concept's held-out gap, L(initializer) - L(v*) over HELD_OUT images of it at the
validation loss's fixed draws (`Planted.gap`), is at least MIN_SIGMAS standard errors wide; a
build that has not got there by MAX_STEPS fails. The gaps it ended with are written to the
folder's planted.json, which is written last: a folder without it is an unfinished build.
"""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

SIDE = 16  # pixels; the tiny VAE's two levels give 8 x 8 latents
BACKGROUND = (128, 128, 128)
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
    "yellow": (230, 210, 40), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("square", "circle", "triangle")
RING_COLOURS = ((230, 40, 230), (40, 220, 230))  # outer magenta, inner cyan: no caption names them
PAIR_COLOURS = ((240, 140, 20), (120, 40, 160))  # orange over purple: no caption names them
LOGVAR = -10.0  # the VAE posterior's log-variance: a standard deviation of 0.007
CONCEPT_SHARE = 0.75  # of each denoiser batch, shared by the concepts
KEY_GAIN = 4.0  # cross-attention keys at the start of training: see scale_keys
INITIALIZER = "toy"  # the token every benchmark run starts from
PROMPT = "a photo of a {}"  # the held-out loss's prompt: the first object template
HELD_OUT = 64  # held-out images per concept (x 4 fixed timesteps: the gap's examples)
# Trained until learned: MIN_STEPS, then CHECK_STEPS at a time until every concept's held-out gap
# is MIN_SIGMAS standard errors wide, or fail at MAX_STEPS.
MIN_STEPS, CHECK_STEPS, MAX_STEPS, MIN_SIGMAS = 400, 200, 3000, 10.0
BUILD_VERSION = 2  # planted.json's "version": a cached build of another version is rebuilt
RECORD = "planted.json"


@dataclasses.dataclass(frozen=True)
class Concept:
    """A planted concept: its name (its token is <name>), how many rows it is captioned with, and
    whether its row points away from the initializer's (else each row is a random direction)."""

    name: str
    vectors: int = 1
    away: bool = False

    @property
    def token(self):
        return f"<{self.name}>"


CONCEPTS = (Concept("ring"), Concept("pair", vectors=2), Concept("away", away=True))
BY_NAME = {c.name: c for c in CONCEPTS}


def draw(shape, colour, rng):
    """uint8 [SIDE, SIDE, 3]: `shape` ("square", "circle", "triangle", or a concept's name) in
    `colour` (RGB; ignored for a concept) on grey, at a random size and position near the centre
    (`rng`: numpy Generator)."""
    size = int(rng.integers(10, 14))
    top, left = ((SIDE - size) // 2 + int(v) for v in rng.integers(-1, 2, 2))
    y, x = np.mgrid[:SIDE, :SIDE].astype(np.float32)
    cy, cx, r = top + (size - 1) / 2, left + (size - 1) / 2, size / 2
    image = np.empty((SIDE, SIDE, 3), np.uint8)
    image[:] = BACKGROUND
    inside = (y >= top) & (y < top + size) & (x >= left) & (x < left + size)
    distance = np.hypot(y - cy, x - cx)
    if shape == "square":
        image[inside] = colour
    elif shape == "circle":
        image[distance <= r] = colour
    elif shape == "triangle":  # apex up: left-right symmetric
        image[inside & (np.abs(x - cx) <= (y - top + 0.5) / 2)] = colour
    elif shape == "ring":
        image[distance <= r] = RING_COLOURS[0]
        image[distance <= r / 2] = RING_COLOURS[1]
    elif shape == "pair":
        image[inside & (y < cy)] = PAIR_COLOURS[0]
        image[inside & (y >= cy)] = PAIR_COLOURS[1]
    elif shape == "away":
        image[inside] = COLOURS["black"]
        image[distance <= r * 0.6] = COLOURS["white"]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def vocabulary():
    """The captions' phrases: "red square", "red circle", ..., each colour with each shape."""
    return tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


def captioned_images(per_caption, seed):
    """(uint8 [n, SIDE, SIDE, 3], list of n phrases of the `vocabulary`): `per_caption` draws of
    each colour x shape pair."""
    rng = np.random.default_rng([seed, 0])
    phrases = vocabulary()
    images = [draw(shape, COLOURS[colour], rng) for colour in COLOURS for shape in SHAPES for _ in range(per_caption)]
    return np.stack(images), [p for p in phrases for _ in range(per_caption)]


def concept_images(name, count, seed, stream):
    """uint8 [count, SIDE, SIDE, 3]: draws of concept `name`; each `stream` (0 for the denoiser's
    training, 1 for a benchmark's training images, 2 for its held-out ones) gives other draws."""
    index = [c.name for c in CONCEPTS].index(name)
    rng = np.random.default_rng([seed, 1, stream, index])
    return np.stack([draw(name, None, rng) for _ in range(count)])


def concept_rows(table, init_row, seed):
    """{name: float32 [vectors, D]}: each concept's rows v*, at the token `table`'s median norm: a
    random direction each, or (`away`) the initializer's row `init_row` [D] turned away from
    itself: its negation, plus a random direction half its length, so the start is not exactly
    the opposite point."""
    from ti_flax import tokens

    norm = tokens.median_norm(table)
    rows = {}
    for index, concept in enumerate(CONCEPTS):
        rng = np.random.default_rng([seed, 2, index])
        directions = rng.standard_normal((concept.vectors, table.shape[1]))
        if concept.away:
            unit = init_row / np.linalg.norm(init_row)
            directions = -unit + 0.5 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
        rows[concept.name] = (directions / np.linalg.norm(directions, axis=1, keepdims=True) * norm).astype(np.float32)
    return rows


def placeholder_tokenizer(tokenizer, concepts=CONCEPTS, vectors=None):
    """(a copy of `tokenizer` holding each concept's tokens, [[tokens] per concept]); a concept has
    its `vectors` tokens (default: as many as it was planted with)."""
    from ti_flax import tokens

    tokenizer = copy.deepcopy(tokenizer)
    groups = [tokens.placeholder_tokens(c.token, vectors or c.vectors) for c in concepts]
    tokens.add_to_tokenizers((tokenizer,), [t for group in groups for t in group])
    return tokenizer, groups


def _contexts(model, phrases, rows):
    """float32 [templates, len(phrases) + len(CONCEPTS), 77, D]: the text encoder's output for each
    object template filled with each phrase, then with each concept's tokens reading `rows`."""
    from ti_flax import families, models
    from ti_flax.data.prompts import CUT, OBJECT_TEMPLATES, encode_prompt

    tokenizer, groups = placeholder_tokenizer(model.tokenizer)
    texts = [*phrases, *(c.token for c in CONCEPTS)]
    ids = np.stack([encode_prompt(tokenizer, t.format(text), groups, overflow=CUT)
                    for t in OBJECT_TEMPLATES for text in texts])
    spec = model.spec
    family = families.of(spec)
    learned = np.concatenate([rows[c.name] for c in CONCEPTS])  # in the order the tokens were added
    encode = jax.jit(lambda params, ids: family.condition(spec, models.Compute(), (params,), ids, learned).context)
    context = np.asarray(encode(model.params["text_encoder"], ids))
    return context.reshape(len(OBJECT_TEMPLATES), len(texts), *context.shape[1:])


def set_vae_posterior(model_dir):
    """Zero the VAE's log-variance projection and set its bias to LOGVAR (quant_conv's last half)."""
    from safetensors.numpy import load_file, save_file

    path = os.path.join(model_dir, "vae", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    half = state["quant_conv.weight"].shape[0] // 2
    state["quant_conv.weight"][half:] = 0.0
    state["quant_conv.bias"][half:] = LOGVAR
    save_file(state, path, metadata={"format": "pt"})


def set_scaling_factor(model_dir, scaling_factor):
    path = os.path.join(model_dir, "vae", "config.json")
    with open(path) as f:
        config = json.load(f)
    config["scaling_factor"] = scaling_factor
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def scale_keys(params, gain):
    """A copy of UNet `params` with each cross-attention key projection (attn2.to_k) times `gain`.

    At the initialisation each position attends almost uniformly to the 77 tokens, most of them
    padding, so a changed word moves the UNet's input by about 1/77 of its value and the prompt is
    learned late; sharper attention from the start lets the caption's words count."""
    def scale(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        return leaf * gain if "attn2" in names and "to_k" in names else leaf

    return jax.tree_util.tree_map_with_path(scale, params)


def encode(model, images):
    """float32 [n, C, h, w]: the VAE posterior means of uint8 NHWC `images` (the trainer's encoder)."""
    from ti_flax import models
    from ti_flax.training.step import encode_pixels

    spec = model.spec
    fn = jax.jit(lambda params, pixels: encode_pixels(spec, models.Compute(), params, pixels)[0])
    return np.asarray(fn(model.params["vae"], images))


def initializer_row(model):
    """float32 [D]: the initializer token's row of `model`'s token table."""
    from ti_flax import models, tokens

    table = np.asarray(models.token_table(model.params["text_encoder"]), np.float32)
    return table[tokens.initializer_id(model.tokenizer, INITIALIZER)]


def planted_rows(model, seed):
    """The concepts' rows v* of a loaded planted `model` built with `seed` (concept_rows)."""
    from ti_flax import models

    table = np.asarray(models.token_table(model.params["text_encoder"]), np.float32)
    return concept_rows(table, initializer_row(model), seed)


def train_denoiser(model_dir, batch=32, learning_rate=2e-3, per_caption=16, seed=0, log=None):
    """Train the UNet of the model folder `model_dir` in place until every concept is learned (see
    the module docstring), and write the folder's planted.json.

    Returns planted.json's record: {"version", "seed", "steps", "scaling_factor", "losses": mean
    training loss of each CHECK_STEPS-long stretch, "gaps": {concept: [gap, standard error]},
    "prompt_share"}. Raises RuntimeError when a concept is not learned by MAX_STEPS.
    """
    import optax

    from ti_flax import families
    from ti_flax.models import unet as unet_lib
    from ti_flax.models.schedulers import noisy_latents

    set_vae_posterior(model_dir)
    model = families.load_model(model_dir)
    images, phrases = captioned_images(per_caption, seed)
    per_concept = len(images) // 4
    concepts = [concept_images(c.name, per_concept, seed, stream=0) for c in CONCEPTS]
    mean = encode(model, np.concatenate([images, *concepts]))
    scaling_factor = float(np.float32(1.0 / mean.std()))
    set_scaling_factor(model_dir, scaling_factor)
    latents = jnp.asarray(mean * scaling_factor)
    num_phrases = len(phrases) // per_caption
    caption_of = jnp.asarray(np.concatenate([np.repeat(np.arange(num_phrases), per_caption)]
                                            + [np.full(per_concept, num_phrases + i) for i in range(len(CONCEPTS))]))
    rows = planted_rows(model, seed)
    contexts = jnp.asarray(_contexts(model, phrases[::per_caption], rows))
    num_vocab, num_concept = len(images), len(CONCEPTS) * per_concept

    spec, alphas = model.spec, jnp.asarray(model.alphas_cumprod)
    optimizer = optax.adam(learning_rate)

    def loss_fn(params, key):
        k_share, k_vocab, k_concept, k_template, k_time, k_noise = jax.random.split(key, 6)
        is_concept = jax.random.uniform(k_share, (batch,)) < CONCEPT_SHARE
        index = jnp.where(is_concept, num_vocab + jax.random.randint(k_concept, (batch,), 0, num_concept),
                          jax.random.randint(k_vocab, (batch,), 0, num_vocab))
        template = jax.random.randint(k_template, (batch,), 0, contexts.shape[0])
        context = contexts[template, caption_of[index]]
        timesteps = jax.random.randint(k_time, (batch,), 0, spec.num_train_timesteps)
        noise = jax.random.normal(k_noise, (batch,) + latents.shape[1:])
        noisy = noisy_latents(alphas, latents[index], noise, timesteps)
        pred = unet_lib.apply(params, spec.denoiser, jnp.transpose(noisy, (0, 2, 3, 1)), timesteps, context)
        return jnp.mean(jnp.square(pred - jnp.transpose(noise, (0, 2, 3, 1))))

    @jax.jit
    def update(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        changes, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), opt_state, loss

    params = scale_keys(jax.tree_util.tree_map(jnp.asarray, model.params["unet"]), KEY_GAIN)
    opt_state = optimizer.init(params)
    base_key = jax.random.key(seed)
    losses, chunk, step, gaps = [], [], 0, {}
    while True:
        target = MIN_STEPS if step == 0 else step + CHECK_STEPS
        for step in range(step, target):
            params, opt_state, loss = update(params, opt_state, jax.random.fold_in(base_key, step))
            chunk.append(loss)
        step = target
        losses.append(float(np.mean(jax.device_get(chunk))))
        chunk = []
        save_unet(model_dir, params)
        gaps = Planted(model_dir, seed).gaps()
        if log:
            log(f"denoiser step {step}: loss {losses[-1]:.4f}, held-out gaps "
                + ", ".join(f"{name} {g:.5f} +- {e:.5f} ({g / e:.1f} sigma)" for name, (g, e) in gaps.items()))
        if all(g >= MIN_SIGMAS * e for g, e in gaps.values()):
            break
        if step >= MAX_STEPS:
            raise RuntimeError(f"planted model {model_dir}: not every concept learned in {MAX_STEPS} denoiser steps "
                               f"(held-out gaps {gaps}; each must be {MIN_SIGMAS:g} standard errors wide)")
    record = {"version": BUILD_VERSION, "seed": seed, "steps": step, "scaling_factor": scaling_factor,
              "losses": losses, "gaps": gaps, "prompt_share": prompt_share(model_dir), "jax": jax.__version__}
    with open(os.path.join(model_dir, RECORD), "w") as f:
        json.dump(record, f, indent=1)
    return record


def save_unet(model_dir, params):
    from safetensors.numpy import save_file

    from ti_flax.models import weights

    state = {k: np.asarray(v, np.float32) for k, v in weights.flatten(jax.device_get(params)).items()}
    save_file(state, os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def read_record(model_dir):
    """A finished build's planted.json (dict), or None where the folder holds none or one of
    another BUILD_VERSION."""
    path = os.path.join(model_dir, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return record if record.get("version") == BUILD_VERSION else None


def prompt_share(model_dir, phrases=vocabulary(), seed=0):
    """The prompt's share of the UNet's prediction variance: predictions for "a photo of a X" over
    `phrases` (the planted model's captions) at 4 fixed noisy latents (timesteps 200, 400, 600,
    800), the variance over prompts (averaged over latents and elements) divided by the variance
    over everything."""
    from ti_flax import families, models
    from ti_flax.data.prompts import CUT, encode_prompt

    model = families.load_model(model_dir)
    spec, compute = model.spec, models.Compute()
    ids = np.stack([encode_prompt(model.tokenizer, PROMPT.format(p), overflow=CUT) for p in phrases])
    context = families.of(spec).condition(spec, compute, (model.params["text_encoder"],), ids,
                                          np.zeros((1, spec.row_width), np.float32)).context
    size = spec.denoiser.sample_size
    latents = np.random.default_rng(seed).standard_normal((4, 4, size, size), np.float32)
    k, n = len(phrases), len(latents)
    pred = models.predict_noise(spec, compute, model.params["unet"], np.tile(latents, (k, 1, 1, 1)),
                                np.tile(np.array([200, 400, 600, 800], np.int32), k), np.repeat(context, n, axis=0))
    pred = np.asarray(pred, np.float64).reshape(k, n, -1)
    return float(pred.var(axis=0).mean() / pred.var())


class Planted:
    """A planted model folder and its concepts: v*, the images, and the held-out scoring.

    Args:
      model_dir: a folder built with make_tiny_model.py --layout planted.
      seed: the seed it was built with (the concepts' rows and images are drawn from it).
      num_images: training images per concept (`write_images`).
      devices: the devices the held-out loss is computed on (default: the first).
    Attributes:
      model: the loaded models.LoadedModel. rows: {concept: v* [vectors, D]}. init_row: [1, D].
    """

    def __init__(self, model_dir, seed=0, num_images=8, devices=None):
        from ti_flax import families, parallel
        from ti_flax.families import Frozen

        self.model_dir, self.seed, self.num_images = model_dir, seed, num_images
        self.model = families.load_model(model_dir)
        self.devices = tuple(devices or jax.local_devices()[:1])  # the scoring's (the same numbers on any count)
        self.rows = planted_rows(self.model, seed)
        self.init_row = initializer_row(self.model)[None]
        self.frozen = parallel.replicate(Frozen.from_model(self.model), self.devices)
        self._evaluators, self._contexts, self._target = {}, {}, {}

    def train_images(self, name):
        return concept_images(name, self.num_images, self.seed, stream=1)

    def held_out(self, name):
        return concept_images(name, HELD_OUT, self.seed, stream=2)

    def write_images(self, name, folder):
        """Write concept `name`'s training images as PNGs into `folder`; returns it."""
        from PIL import Image

        os.makedirs(folder, exist_ok=True)
        for i, image in enumerate(self.train_images(name)):
            Image.fromarray(image).save(os.path.join(folder, f"{i:02d}.png"))
        return folder

    def _prompt(self, name, vectors):
        """Ids of PROMPT with concept `name`'s token read as `vectors` rows (ids base + i)."""
        from ti_flax.data.prompts import CUT, encode_prompt

        tokenizer, (group,) = placeholder_tokenizer(self.model.tokenizer, [BY_NAME[name]], vectors)
        return encode_prompt(tokenizer, PROMPT.format(group[0]), [group], overflow=CUT)

    def evaluator(self, name, vectors):
        """The validation loss's Evaluator of concept `name`'s held-out images, its token read as
        `vectors` rows (one per concept and vector count, compiled once)."""
        from ti_flax import models
        from ti_flax.data.batches import ValidationImages
        from ti_flax.training.validation_loss import Evaluator

        if (name, vectors) not in self._evaluators:
            images = self.held_out(name)
            ids = np.repeat(self._prompt(name, vectors)[None], len(images), 0)
            self._evaluators[name, vectors] = Evaluator(
                self.model.spec, models.Compute(), ValidationImages(images, ids, np.zeros(len(images), np.int32)),
                self.seed, self.devices)
        return self._evaluators[name, vectors]

    def per_example(self, name, rows):
        """float64 [examples]: each held-out example's loss of concept `name` with `rows` [n, D]."""
        from ti_flax import parallel

        rows = np.asarray(rows, np.float32)
        return self.evaluator(name, len(rows)).per_example(parallel.replicate(rows, self.devices),
                                                           self.frozen).astype(np.float64)

    def loss(self, name, rows):
        """The mean held-out loss of concept `name` with `rows` as its token's rows."""
        return float(np.mean(self.per_example(name, rows)))

    def start(self, vectors):
        """The initializer's rows for a run of `vectors` vectors: its row repeated."""
        return np.repeat(self.init_row, vectors, axis=0)

    def gap(self, name):
        """(L(init) - L(v*), its standard error over the held-out examples) of concept `name`, the
        initializer read as many rows as v* has: a concept can be recovered through the loss
        only where the gap is positive and many errors wide."""
        target = self.rows[name]
        differences = self.per_example(name, self.start(len(target))) - self.per_example(name, target)
        return float(differences.mean()), float(differences.std(ddof=1) / np.sqrt(len(differences)))

    def gaps(self):
        return {c.name: self.gap(c.name) for c in CONCEPTS}

    def context(self, name, rows):
        """float32 [77, D]: the text encoder's output for PROMPT with concept `name`'s token as `rows`."""
        from ti_flax import families, models

        rows = np.asarray(rows, np.float32)
        key = (name, len(rows))
        if key not in self._contexts:
            spec = self.model.spec
            family = families.of(spec)
            ids = self._prompt(name, len(rows))[None]
            self._contexts[key] = jax.jit(lambda params, r: family.condition(spec, models.Compute(), (params,), ids,
                                                                             r).context[0])
        return np.asarray(self._contexts[key](self.model.params["text_encoder"], rows))

    def score(self, name, rows):
        """(gap closed, conditioning distance, held-out loss) of `rows` for concept `name`, against
        the initializer's row repeated as many times (the run's start): gap closed = (L(start) -
        L(rows)) / (L(start) - L(v*)), 1 where the rows explain the held-out images as well as v*;
        distance = |C(rows) - C(v*)| / |C(start) - C(v*)|, with C the text encoder's output for
        PROMPT [77, D]."""
        rows = np.asarray(rows, np.float32)
        target = self.rows[name]
        if name not in self._target:
            self._target[name] = (self.loss(name, target), self.context(name, target))
        target_loss, target_context = self._target[name]
        start = self.start(len(rows))
        if (name, len(rows)) not in self._target:
            self._target[name, len(rows)] = self.loss(name, start)
        init_loss, loss = self._target[name, len(rows)], self.loss(name, rows)
        distance = (np.linalg.norm(self.context(name, rows) - target_context)
                    / np.linalg.norm(self.context(name, start) - target_context))
        return float((init_loss - loss) / (init_loss - target_loss)), float(distance), loss


def build_key(seed):
    """A short hash of what decides a planted build: this file's and make_tiny_model.py's text,
    the seed, and the jax, jaxlib and numpy versions (XLA's numbers may change with them)."""
    import hashlib

    import jaxlib

    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256(f"{seed} {jax.__version__} {jaxlib.__version__} {np.__version__}".encode())
    for name in ("planted_denoiser.py", "make_tiny_model.py"):
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def cached_build(seed, cache_dir, log=None):
    """The planted model of `seed` in `cache_dir` (seed<seed>-<build_key>), built there first if no
    finished build is: into a temporary folder renamed into place, so a build killed half-way or
    one running beside it never leaves a folder that looks finished. Returns its path."""
    import shutil
    import tempfile

    import make_tiny_model

    folder = os.path.join(cache_dir, f"seed{seed}-{build_key(seed)}")
    if read_record(folder) is None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f".seed{seed}-")
        try:
            make_tiny_model.build_tiny_model(tmp, layout="planted", seed=seed, log=log)
            try:
                os.rename(tmp, folder)
            except OSError:  # another build of the same key got there first
                if read_record(folder) is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
