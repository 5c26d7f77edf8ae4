"""The per-example draws of a DDPM (SD) run, as step.diffusion_inputs makes them: for tests that
write the training inputs out from the primitives."""

from types import SimpleNamespace

from ti_flax import families
from ti_flax.training import step as step_lib
from ti_flax.training.losses import LossSpec


def ddpm_draws(key, example_ids, latent_shape, num_train_timesteps, loss_spec=LossSpec()):
    """(latent sample noise, diffusion noise, timestep) per example: step.example_draws with the SD
    families' timestep draw (uniform over the recipe's range) and the recipe's noise offset."""
    spec = SimpleNamespace(num_train_timesteps=num_train_timesteps)
    time_draw = families.get("sd1").time_draw(spec, loss_spec)
    return step_lib.example_draws(key, example_ids, latent_shape, time_draw, loss_spec.noise_offset)
