"""The planted-concept model's denoiser: a tiny UNet trained to denoise captioned shapes, with one
concept reachable only through a row that no token has.

A random-weight UNet does not denoise, so no prompt explains an image better than another and a
planted concept cannot be recovered through the loss. Here the tiny UNet of a freshly built model
folder is trained (ti_flax's own UNet and text encoder, optax Adam, the epsilon loss on the
model's noise schedule) on 16 px images drawn by `draw`:

- the vocabulary: "<template> {colour} {shape}" (6 colours x 3 shapes, each at random sizes and
  positions on grey), one of the textual-inversion object templates around it;
- the concept: a magenta ring around a cyan disc (neither colour nor the ring is in the
  vocabulary), captioned "<template> <planted>" where <planted>'s row is `planted_row`: a random
  direction at the token table's median norm. The row exists only during this training; the
  saved folder's token table is the one it was built with, so a textual-inversion run meets the
  concept only through its images (`concept_images`, other draws of the same generator).

Every shape is left-right symmetric and the positions are drawn symmetrically, so an image
flipped by the trainer (--flip_p) is another draw of the same caption. The random VAE is kept,
with two changes that make its latents look like SD's to the UNet: a small fixed posterior
variance (its log-variance projection zeroed, bias LOGVAR), and a scaling factor set as SD's was,
1 / the standard deviation of the training latents.

How much the denoiser learns to tell v*'s images from the initializer's in its 400 steps (held-out
L("toy") - L(v*), bench_learning.Planted.planted_gap, on 2 shared CPU cores about 150 s a build):
0.0014 at Adam's 1e-3, 0.0055 at 2e-3; with the cross-attention keys scaled up at the start
(KEY_GAIN, scale_keys) 0.0157 at 10x and 0.0041 at 30x; shapes at random positions instead of near
the centre 0.0027 (the VAE's latents then vary more within a caption than between captions).
"""

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
CONCEPT = "ring"  # drawn with RING_COLOURS, which no caption names
RING_COLOURS = ((230, 40, 230), (40, 220, 230))  # outer magenta, inner cyan
LOGVAR = -10.0  # the VAE posterior's log-variance: a standard deviation of 0.007
CONCEPT_SHARE = 0.25  # of each training batch
KEY_GAIN = 10.0  # cross-attention keys at the start of training: see scale_keys


def draw(shape, colour, rng):
    """uint8 [SIDE, SIDE, 3]: `shape` ("square", "circle", "triangle" or CONCEPT) in `colour` (RGB;
    ignored for CONCEPT) on grey, at a random size and position (`rng`: numpy Generator)."""
    size = int(rng.integers(10, 14))
    top, left = ((SIDE - size) // 2 + int(v) for v in rng.integers(-1, 2, 2))  # near the centre
    y, x = np.mgrid[:SIDE, :SIDE].astype(np.float32)
    cy, cx, r = top + (size - 1) / 2, left + (size - 1) / 2, size / 2
    image = np.empty((SIDE, SIDE, 3), np.uint8)
    image[:] = BACKGROUND
    inside = (y >= top) & (y < top + size) & (x >= left) & (x < left + size)
    if shape == "square":
        image[inside] = colour
    elif shape == "circle":
        image[np.hypot(y - cy, x - cx) <= r] = colour
    elif shape == "triangle":  # apex up: left-right symmetric
        image[inside & (np.abs(x - cx) <= (y - top + 0.5) / 2)] = colour
    elif shape == CONCEPT:
        distance = np.hypot(y - cy, x - cx)
        image[distance <= r] = RING_COLOURS[0]
        image[distance <= r / 2] = RING_COLOURS[1]
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


def concept_images(count, seed, stream):
    """uint8 [count, SIDE, SIDE, 3]: draws of the concept; each `stream` (0 for the denoiser's
    training, others for a benchmark's training and held-out images) gives other draws."""
    rng = np.random.default_rng([seed, 1, stream])
    return np.stack([draw(CONCEPT, None, rng) for _ in range(count)])


def planted_row(table, seed):
    """float32 [1, D]: the concept's row, a random direction at the token table's median norm."""
    from ti_flax import tokens

    direction = np.random.default_rng(seed).standard_normal(table.shape[1])
    return (direction / np.linalg.norm(direction) * tokens.median_norm(table))[None].astype(np.float32)


def _contexts(model, phrases, row, token):
    """float32 [templates, len(phrases) + 1, 77, D]: the text encoder's output for each object
    template filled with each phrase, and last with `token` read as `row`."""
    import copy

    from ti_flax import families, models, tokens
    from ti_flax.data.prompts import CUT, OBJECT_TEMPLATES, encode_prompt

    tokenizer = copy.deepcopy(model.tokenizer)
    tokens.add_to_tokenizers((tokenizer,), [token])
    ids = np.stack([encode_prompt(tokenizer, t.format(p), [[token]], overflow=CUT)
                    for t in OBJECT_TEMPLATES for p in [*phrases, token]])
    spec = model.spec
    family = families.of(spec)
    encode = jax.jit(lambda params, ids: family.condition(spec, models.Compute(), (params,), ids, row).context)
    context = np.asarray(encode(model.params["text_encoder"], ids))
    return context.reshape(len(OBJECT_TEMPLATES), len(phrases) + 1, *context.shape[1:])


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

    At the default initialisation each position attends almost uniformly to the 77 tokens, most
    of them padding, so a changed word moves the UNet's input by about 1/77 of its value and the
    prompt is learned late; sharper attention from the start lets the caption's words count."""
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


def train_denoiser(model_dir, steps, batch, learning_rate=2e-3, per_caption=16, seed=0, token="<planted>", log=None):
    """Train the UNet of the model folder `model_dir` in place (see the module docstring).

    Returns {"scaling_factor": float, "losses": [mean training loss of each tenth of the steps]}.
    """
    import optax
    from safetensors.numpy import save_file

    from ti_flax import families, models
    from ti_flax.models import unet as unet_lib
    from ti_flax.models import weights
    from ti_flax.models.schedulers import noisy_latents

    set_vae_posterior(model_dir)
    model = families.load_model(model_dir)
    images, phrases = captioned_images(per_caption, seed)
    concept = concept_images(len(images) // 4, seed, stream=0)
    mean = encode(model, np.concatenate([images, concept]))
    scaling_factor = float(np.float32(1.0 / mean.std()))
    set_scaling_factor(model_dir, scaling_factor)
    latents = jnp.asarray(mean * scaling_factor)
    caption_of = np.concatenate([np.repeat(np.arange(len(phrases) // per_caption), per_caption),
                                 np.full(len(concept), len(phrases) // per_caption)])
    table = np.asarray(models.token_table(model.params["text_encoder"]), np.float32)
    contexts = jnp.asarray(_contexts(model, phrases[::per_caption], planted_row(table, seed), token))
    num_vocab, num_concept = len(images), len(concept)

    spec, alphas = model.spec, jnp.asarray(model.alphas_cumprod)
    optimizer = optax.adam(learning_rate)

    def loss_fn(params, key):
        k_share, k_vocab, k_concept, k_template, k_time, k_noise = jax.random.split(key, 6)
        is_concept = jax.random.uniform(k_share, (batch,)) < CONCEPT_SHARE
        index = jnp.where(is_concept, num_vocab + jax.random.randint(k_concept, (batch,), 0, num_concept),
                          jax.random.randint(k_vocab, (batch,), 0, num_vocab))
        template = jax.random.randint(k_template, (batch,), 0, contexts.shape[0])
        context = contexts[template, jnp.asarray(caption_of)[index]]
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

    params = jax.tree_util.tree_map(jnp.asarray, model.params["unet"])
    params = scale_keys(params, KEY_GAIN)
    opt_state = optimizer.init(params)
    base_key = jax.random.key(seed)
    losses, chunk = [], []
    for i in range(steps):
        params, opt_state, loss = update(params, opt_state, jax.random.fold_in(base_key, i))
        chunk.append(loss)
        if len(chunk) == max(1, steps // 10) or i == steps - 1:
            losses.append(float(np.mean(jax.device_get(chunk))))
            chunk = []
            if log:
                log(f"denoiser step {i + 1}/{steps}: loss {losses[-1]:.4f}")
    state = {k: np.asarray(v, np.float32) for k, v in weights.flatten(jax.device_get(params)).items()}
    save_file(state, os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return {"scaling_factor": scaling_factor, "losses": losses}
