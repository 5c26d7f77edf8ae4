"""Golden values of the tiny SD 1.x and SD 2.x layouts, recorded before the model port.

Every quantity the trainer computes from the frozen models, for fixed inputs: the per-example
draws, the VAE posterior, the text encoder's hidden states, the UNet output (dense and chunked
attention), the loss and its gradient with respect to the learned rows, the rows after 4 steps
and the checkpoint's model fingerprint. A port of the model code must reproduce them within
TOLERANCES, and a checkpoint written before the port (tests/golden/<family>/checkpoint-2) must
still resume to the recorded rows.

Record (only when the trainer's numbers are meant to change, never to make a test pass):
    .venv/bin/python tests/golden.py --record
"""

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOLDEN_DIR = os.path.join(HERE, "golden")
SAMPLE_IMAGES = os.path.join(ROOT, "scripts", "sample_images")
FAMILIES = {"sd1": "golden-sd1", "sd2": "golden-sd2"}  # name -> make_tiny_model layout
PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction"}

# (kind, bound) per value: "exact" equal; "abs" max |diff|; "rel" |diff| / |golden| (L2).
TOLERANCES = {
    "timesteps": ("exact", 0),
    "latent_noise": ("abs", 1e-6),
    "noise": ("abs", 1e-6),
    "vae_mean": ("abs", 1e-4),
    "vae_logvar": ("abs", 1e-4),
    "text_hidden": ("abs", 1e-5),
    "unet_dense": ("abs", 1e-4),
    "unet_chunked": ("abs", 1e-4),
    "target": ("abs", 1e-4),
    "loss": ("rel", 1e-5),
    "grad_rows": ("rel", 1e-4),
    "rows_after_4": ("abs", 5e-4),  # 4 Adam steps of lr 5e-3 amplify rounding a little
}
STEPS, CHECKPOINT_STEP = 4, 2


def build_model(family, directory):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_tiny_model

    return make_tiny_model.build_tiny_model(directory, layout=FAMILIES[family], prediction_type=PREDICTION[family])


def run_config(model_dir, output_dir):
    from ti_flax import TrainConfig

    return TrainConfig.tiny(
        model_dir, SAMPLE_IMAGES, output_dir, resolution=64, num_vectors=2, train_batch_size=2,
        max_train_steps=STEPS, checkpointing_steps=CHECKPOINT_STEP, attention="dense",
    )


def forward_values(model_dir):
    """Every model output of the golden run's first batch, as float32/int numpy arrays."""
    import jax
    import numpy as np

    from ti_flax import families, models
    from ti_flax.training import checkpoint, step as step_lib
    from ti_flax.training.run import prepare

    devices = jax.local_devices()[:1]
    run = prepare(run_config(model_dir, "unused"), devices=devices)
    spec, params, compute = run.model.spec, run.model.params, models.Compute()
    frozen = families.Frozen.from_model(run.model)
    batch = run.data.global_batch(0)
    key = jax.random.fold_in(jax.random.PRNGKey(0), 0)  # the trainer's key of step 0, seed 0
    # Rows that differ from each other and from the initializer, so each one's gradient shows.
    rows = run.init_rows + 0.1 * np.random.default_rng(0).standard_normal(run.init_rows.shape).astype(np.float32)

    def everything(params, frozen, batch, rows, key):
        # One program for every value: one compile, and XLA shares the parts they have in common.
        mean, logvar = step_lib.encode_pixels(spec, compute, params["vae"], batch.pixel_values)
        hidden = models.encode_text(spec, compute, params["text_encoder"], batch.input_ids, rows)
        noisy, t, target = step_lib.diffusion_inputs(spec, compute, frozen, batch, key)
        unets = {attention: models.predict_noise(spec, models.Compute(attention=attention), params["unet"], noisy, t,
                                                 hidden) for attention in ("dense", "chunked")}
        loss, grad = jax.value_and_grad(
            lambda r: step_lib.diffusion_loss(r, spec, compute, frozen, batch.input_ids, noisy, t, target))(rows)
        return mean, logvar, hidden, noisy, t, target, unets, loss, grad

    mean, logvar, hidden, noisy, t, target, unets, loss, grad = jax.jit(everything)(params, frozen, batch, rows, key)
    from draws import ddpm_draws

    latent_noise, noise, timesteps = ddpm_draws(key, batch.example_ids, mean.shape[1:], spec.num_train_timesteps)
    values = {
        "rows": rows,
        "input_ids": batch.input_ids,
        "pixel_values": batch.pixel_values,
        "noisy": noisy,
        "latent_noise": latent_noise,
        "noise": noise,
        "timesteps": timesteps,
        "vae_mean": mean,
        "vae_logvar": logvar,
        "text_hidden": hidden,
        "target": target,
        "unet_dense": unets["dense"],
        "unet_chunked": unets["chunked"],
        "loss": loss,
        "grad_rows": grad,
    }
    values = {k: np.asarray(v) for k, v in values.items()}
    values["fingerprint"] = np.asarray(
        checkpoint.model_fingerprint(spec, models.token_table(params["text_encoder"]))
    )
    return values


def train_rows(model_dir, output_dir, resume=False):
    """Rows after STEPS steps on one device (resuming from output_dir's latest checkpoint)."""
    import jax

    from ti_flax import train

    config = run_config(model_dir, output_dir)
    if resume:
        config = config.replace(resume_from_checkpoint="latest")
    return train(config, devices=jax.local_devices()[:1])


def compare(name, got, want):
    """None if `got` is within TOLERANCES[name] of `want`, else a message saying by how much."""
    import numpy as np

    kind, bound = TOLERANCES[name]
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"{name}: shape {got.shape}, golden {want.shape}"
    if kind == "exact":
        return None if np.array_equal(got, want) else f"{name}: differs from golden"
    diff = got.astype(np.float64) - want.astype(np.float64)
    err = np.abs(diff).max() if kind == "abs" else np.linalg.norm(diff) / np.linalg.norm(want)
    return None if err <= bound else f"{name}: {kind} error {err:.3g} > {bound:g}"


def golden_path(family):
    return os.path.join(GOLDEN_DIR, f"{family}.npz")


def record(family):
    import numpy as np

    with tempfile.TemporaryDirectory() as work:
        model_dir = build_model(family, os.path.join(work, "model"))
        values = forward_values(model_dir)
        out = os.path.join(work, "out")
        values["rows_after_4"] = train_rows(model_dir, out).rows
        ckpt_dst = os.path.join(GOLDEN_DIR, family, f"checkpoint-{CHECKPOINT_STEP}")
        shutil.rmtree(ckpt_dst, ignore_errors=True)
        shutil.copytree(os.path.join(out, f"checkpoint-{CHECKPOINT_STEP}"), ckpt_dst)
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    np.savez_compressed(golden_path(family), **values)
    print(f"recorded {golden_path(family)} and {ckpt_dst}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, HERE)
    import conftest  # noqa: F401  (the tests' environment: 4 fake devices, offline, one torch thread)

    for name in FAMILIES:
        record(name)
