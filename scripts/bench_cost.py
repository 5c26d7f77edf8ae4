"""Work per step of an SD 1.5- or SDXL-shaped model from XLA's cost analysis, for scripts/benchmark.py.

The step is lowered with abstract shapes (jax.eval_shape of the models' initialisers, the real
SD 1.5 and SDXL 1.0 base configs below): no weights are allocated and nothing is downloaded.
Also the activation memory a step keeps for its backward pass, counted from JAX's residuals.
"""

import dataclasses
import time

# runwayml/stable-diffusion-v1-5: text_encoder/, unet/ and vae/ config.json (CLIP ViT-L/14 text tower).
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    attention_dropout=0.0, dropout=0.0, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD15_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215,
)
# stabilityai/stable-diffusion-xl-base-1.0: text_encoder/ (CLIP ViT-L, as SD 1.5's), text_encoder_2/
# (OpenCLIP bigG with its projection), unet/ and vae/ config.json.
SDXL_TEXT = dict(SD15_TEXT)
SDXL_TEXT_2 = dict(
    SD15_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280, architectures=["CLIPTextModelWithProjection"],
)
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], center_input_sample=False, cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    reference: bool = False
    mixed_precision: str = "no"
    cache_latents: bool = False
    remat: bool = False
    accumulation: int = 1
    attention: str = "auto"  # ti_flax's --attention; "auto" is chunked on CPU, dense on TPU/GPU
    rows: tuple = ()  # (TrainConfig field, value) pairs for what follows each update, e.g. (("use_ema", True),)

    def config(self, **changes):
        """The TrainConfig of this variant's flags (with `changes`)."""
        from ti_flax.config import TrainConfig

        flags = dict(mixed_precision=self.mixed_precision, cache_latents=self.cache_latents,
                     gradient_checkpointing=self.remat, gradient_accumulation_steps=self.accumulation,
                     attention=self.attention, **dict(self.rows))
        return TrainConfig(**{**flags, **changes})  # `changes` replace the variant's own (compute's attention)

    def compute(self, attention=None):
        """models.Compute of this variant, by the run's own mapping (run.model_compute);
        `attention` in place of the variant's."""
        from ti_flax.training.run import model_compute

        return model_compute(self.config(**({"attention": attention} if attention else {})))


VARIANTS = {
    v.name: v
    for v in (
        Variant("baseline", reference=True),
        Variant("ours"),
        Variant("ours+cache", cache_latents=True),
        Variant("ours-dense", attention="dense"),
        Variant("ours-dense+cache", attention="dense", cache_latents=True),
        Variant("ours+bf16", mixed_precision="bf16"),
        Variant("ours+remat", remat=True),
        Variant("ours-dense+remat", attention="dense", remat=True),
        Variant("ours+accum2", accumulation=2),
        Variant("ours+chunked", attention="chunked"),
        Variant("ours+cache+bf16", mixed_precision="bf16", cache_latents=True),
        Variant("ours-dense+bf16", attention="dense", mixed_precision="bf16"),
        Variant("ours+chunked+bf16", attention="chunked", mixed_precision="bf16"),
        Variant("ours+remat+cache+bf16", remat=True, cache_latents=True, mixed_precision="bf16"),
        Variant("ours+chunked+remat+cache+bf16", attention="chunked", remat=True, cache_latents=True,
                mixed_precision="bf16"),
        Variant("ours+preserve", rows=(("embedding_norm", "preserve"),)),
        Variant("ours+normdecay", rows=(("embedding_norm_decay", 0.1),)),
        Variant("ours+ema", rows=(("use_ema", True),)),
        Variant("ours+preserve+ema+accum2", accumulation=2, rows=(("embedding_norm", "preserve"), ("use_ema", True))),
        # pivotal tuning: a rank-16 LoRA of the UNet's attention beside the rows (--lora_rank 16)
        Variant("ours+lora16", rows=(("lora_rank", 16),)),
        Variant("ours+lora16+cache+bf16", cache_latents=True, mixed_precision="bf16", rows=(("lora_rank", 16),)),
        Variant("ours+cache+bf16+lora16-all", cache_latents=True, mixed_precision="bf16",
                rows=(("lora_rank", 16), ("lora_targets", "attn,ff,proj"))),
    )
}


def model_spec(model):
    """The abstract ModelSpec of "sd15" or "sdxl"."""
    from ti_flax import families

    if model == "sdxl":
        return families.get("sdxl").spec_from_configs(SDXL_TEXT, SDXL_UNET, SDXL_VAE, text_config_2=SDXL_TEXT_2)
    return families.get("sd1").spec_from_configs(SD15_TEXT, SD15_UNET, SD15_VAE)


def activation_bytes(spec, compute, params, batch, latent):
    """Bytes the forward pass keeps for the backward pass of our loss (JAX's residuals of the
    gradient with respect to the rows; weights and inputs not counted). Backend-independent:
    this is what --gradient_checkpointing and --attention chunked shrink.

    Args:
      spec: the model's ModelSpec. compute: the variant's models.Compute.
      params: {"text_encoder", "unet"} arrays or ShapeDtypeStructs.
      batch, latent: per-device batch and latent side.
    """
    import jax
    import jax.numpy as jnp

    from ti_flax import families
    from ti_flax.training import footprint, step as step_lib

    S = jax.ShapeDtypeStruct
    frozen = footprint.abstract_frozen(spec, compute.dtype, vae=False)
    moments = S((batch, 4, latent, latent), jnp.float32)
    time_ids = S((batch, 6), jnp.float32) if families.of(spec).time_ids else None
    args = (S((1, spec.row_width), jnp.float32), frozen, S((batch, 77), jnp.int32), moments, S((batch,), jnp.int32),
            moments, time_ids)

    def vjp_closure(rows, frozen, ids, noisy, t, target, time_ids):
        return jax.vjp(lambda r: step_lib.diffusion_loss(r, spec, compute, frozen, ids, noisy, t, target,
                                                         time_ids=time_ids), rows)[1]

    jaxpr = jax.make_jaxpr(vjp_closure)(*args).jaxpr
    inputs = set(jaxpr.invars)
    saved = {v for v in jaxpr.outvars if type(v).__name__ != "Literal" and v not in inputs}
    return int(sum(v.aval.size * v.aval.dtype.itemsize for v in saved))


def analysed(lowered, compile_it):
    """XLA's figures of a lowered program: {"flops", "bytes_accessed", "analysis"}, of the compiled
    (fused) program with its "xla_memory", or of the unoptimised HLO (fast)."""
    from ti_flax.training import footprint

    if compile_it:
        compiled = lowered.compile()
        return {**footprint.cost_dict(compiled.cost_analysis()), "xla_memory": footprint.memory_dict(compiled),
                "analysis": "compiled"}
    return {**footprint.cost_dict(lowered.cost_analysis()), "analysis": "lowered"}


def abstract_cost(variant, batch, resolution, compile_it=True, model="sd15", loss_spec=None):
    """FLOPs, bytes accessed, XLA memory and activation memory of one device's step.

    Args:
      variant: a Variant. batch: per-device batch. resolution: image side in pixels.
      compile_it: analyse the compiled (fused) program; False: the unoptimised HLO (fast).
      model: "sd15" or "sdxl" (SDXL 1.0 base shapes; not with the reference variant).
      loss_spec: the step's losses.LossSpec (default: the plain mean squared error).
    Returns:
      a dict of the figures, with the FLOP-bound seconds per step on each TPU chip.
    """
    import jax
    import jax.numpy as jnp

    from ti_flax import families, models
    from ti_flax.training import footprint, step as step_lib
    from ti_flax.training.losses import LossSpec
    from ti_flax.training.optim import OptimizerSpec
    from ti_flax.training.run import lora_shapes

    S = jax.ShapeDtypeStruct
    lead = lambda tree: jax.tree_util.tree_map(lambda x: S((1,) + tuple(x.shape), x.dtype), tree)  # noqa: E731
    spec = model_spec(model)
    params = models.abstract_params(spec)
    config = variant.config()
    # A norm target per text encoder (any positive number costs the same as the tables' medians).
    opt_spec = OptimizerSpec.from_config(config, 1, 1000, (0.4,) * len(spec.text_widths), spec.text_widths,
                                         lora_shapes=lora_shapes(config, spec))
    hidden, latent = spec.row_width, resolution // spec.vae_scale_factor
    ids = {"input_ids": S((batch, 77), jnp.int32)}
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    alphas = S((spec.num_train_timesteps,), jnp.float32)
    if variant.reference:
        import bench_reference as ref

        table = S((spec.base_vocab_size + 1, hidden), jnp.float32)
        text = models.with_token_table(params["text_encoder"], table)
        state = jax.eval_shape(lambda p: ref.init_state(p, opt_spec), text)
        devices = tuple(jax.local_devices()[:1])
        fn = ref.pmapped_reference_step(ref.grown_spec(spec, 1), opt_spec, (spec.base_vocab_size,), devices)
        frozen = {"unet": params["unet"], "vae": params["vae"], "alphas_cumprod": alphas}
        args = (state, table, frozen, {"pixel_values": S((batch, 3, resolution, resolution), jnp.float32), **ids})
    else:
        # The TPU program without the Pallas kernel (it lowers only on a TPU): auto is dense there.
        compute = variant.compute("dense" if variant.attention == "auto" else None)
        frozen = footprint.abstract_frozen(spec, compute.dtype, alphas, vae=not variant.cache_latents)
        example_ids = S((batch,), jnp.int32)
        time_ids = S((batch, 6), jnp.float32) if families.of(spec).time_ids else None
        # --masked_loss: each example's mask at the images' resolution rides in the batch.
        mask = S((batch, resolution, resolution), jnp.float32) if loss_spec and loss_spec.masked else None
        if variant.cache_latents:
            moments = S((batch, 4, latent, latent), jnp.float32)
            data = step_lib.LatentBatch(moments, moments, ids["input_ids"], example_ids, time_ids=time_ids, mask=mask)
        else:
            data = step_lib.PixelBatch(S((batch, resolution, resolution, 3), jnp.uint8), ids["input_ids"], example_ids,
                                       time_ids=time_ids, mask=mask)
        state = jax.eval_shape(lambda: step_lib.init_state(jnp.zeros((1, hidden)), opt_spec))
        fn = step_lib.pmapped_train_step(spec, compute, opt_spec, tuple(jax.local_devices()[:1]), 1,
                                         loss_spec or LossSpec())
        args = (state, frozen, data, key)
    start = time.perf_counter()
    lowered = fn.lower(*(lead(a) for a in args))
    out = {"variant": variant.name, "batch": batch, "resolution": resolution, "model": model}
    if not variant.reference:
        out["activation_residual_bytes"] = activation_bytes(spec, compute, params, batch, latent)
    out.update(analysed(lowered, compile_it))
    out["lower_compile_s"] = time.perf_counter() - start
    out["tpu_min_s_per_step"] = {name: out["flops"] / chip.peak_flops for name, chip in footprint.CHIPS.items()}
    return out


def validation_loss_cost(variant, resolution, compile_it=True, model="sd15"):
    """FLOPs and bytes of one device's call of the validation loss (--validation_loss_steps):
    validation_loss.BATCH_PER_DEVICE examples, forward only, in `variant`'s dtype and attention
    (with its cache_latents, from cached moments).

    Returns: a dict as abstract_cost's, with "examples" (per call) in place of "batch".
    """
    import jax
    import jax.numpy as jnp

    from ti_flax import families
    from ti_flax.data import batches as data
    from ti_flax.training import footprint, step as step_lib, validation_loss

    S = jax.ShapeDtypeStruct
    lead = lambda tree: jax.tree_util.tree_map(lambda x: S((1,) + tuple(x.shape), x.dtype), tree)  # noqa: E731
    spec = model_spec(model)
    batch, latent = validation_loss.BATCH_PER_DEVICE, resolution // spec.vae_scale_factor
    compute = variant.compute("dense" if variant.attention == "auto" else None)
    alphas = S((spec.num_train_timesteps,), jnp.float32)
    frozen = footprint.abstract_frozen(spec, compute.dtype, alphas, vae=not variant.cache_latents)
    ids, example_ids = S((batch, 77), jnp.int32), S((batch,), jnp.int32)
    time_ids = S((batch, 6), jnp.float32) if families.of(spec).time_ids else None
    if variant.cache_latents:
        moments = S((batch, 4, latent, latent), jnp.float32)
        examples = data.LatentBatch(moments, moments, ids, example_ids, time_ids=time_ids)
    else:
        examples = data.PixelBatch(S((batch, resolution, resolution, 3), jnp.uint8), ids, example_ids, time_ids=time_ids)
    rows = S((1, spec.row_width), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    fn = step_lib.pmapped_validation_losses(spec, compute, tuple(jax.local_devices()[:1]))
    start = time.perf_counter()
    lowered = fn.lower(*(lead(a) for a in (rows, frozen, examples, S((batch,), jnp.int32), key)))
    out = {"variant": f"validation_loss ({variant.name})", "examples": batch, "resolution": resolution, "model": model}
    out.update(analysed(lowered, compile_it))
    out["lower_compile_s"] = time.perf_counter() - start
    return out


# The loss recipe's knobs (losses.LossSpec fields), each alone and all on, for `loss_recipe_costs`.
LOSS_RECIPES = {
    "off": {},
    "snr_gamma 5": dict(snr_gamma=5.0),
    "noise_offset 0.1": dict(noise_offset=0.1),
    "huber snr-schedule": dict(loss_type="huber", huber_c=0.1, huber_schedule="snr"),
    "smooth_l1 exponential-schedule": dict(loss_type="smooth_l1", huber_c=0.1, huber_schedule="exponential"),
    "timesteps 100-900": dict(min_timestep=100, max_timestep=900),
    "all": dict(snr_gamma=5.0, noise_offset=0.1, loss_type="huber", huber_c=0.1, huber_schedule="snr",
                min_timestep=100, max_timestep=900),
    "masked": dict(masked=True),
    "masked unmasked_weight 0.1": dict(masked=True, unmasked_weight=0.1),
}


def loss_recipe_costs(variant, batch=1, resolution=512, compile_it=True, names=tuple(LOSS_RECIPES)):
    """XLA's FLOPs and bytes of the SD 1.5 step with each loss recipe, and each one's change
    from the recipe off, in percent: [(name, cost dict, flops %, bytes %)]."""
    from ti_flax.training.losses import LossSpec

    rows = []
    for name in names:
        cost = abstract_cost(variant, batch, resolution, compile_it, loss_spec=LossSpec(**LOSS_RECIPES[name]))
        base = rows[0][1] if rows else cost
        rows.append((name, cost, *(100 * (cost[k] / base[k] - 1) for k in ("flops", "bytes_accessed"))))
    return rows


def main():
    import argparse

    p = argparse.ArgumentParser(description="XLA's cost of the loss recipe's knobs at SD 1.5 shapes")
    p.add_argument("--variant", default="ours", help="benchmark.py's variant (default: ours, the defaults)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--recipes", default=",".join(LOSS_RECIPES), help="comma-separated names of LOSS_RECIPES; "
                   "the first is the baseline")
    p.add_argument("--lowered-only", action="store_true", help="cost of the unoptimised HLO (fast, no compile)")
    args = p.parse_args()
    print(f"| recipe ({args.variant}, batch {args.batch}, {args.resolution} px, "
          f"{'lowered' if args.lowered_only else 'compiled'}) | GFLOPs | GB accessed | flops vs off | bytes vs off |")
    print("| --- | --- | --- | --- | --- |")
    rows = loss_recipe_costs(VARIANTS[args.variant], args.batch, args.resolution, not args.lowered_only,
                             args.recipes.split(","))
    base = rows[0][1]
    for name, cost, flops, moved in rows:
        print(f"| {name} | {cost['flops'] / 1e9:.3f} | {cost['bytes_accessed'] / 1e9:.4f} | "
              f"{(cost['flops'] - base['flops']) / 1e6:+.2f} MFLOP ({flops:+.5f}%) | "
              f"{(cost['bytes_accessed'] - base['bytes_accessed']) / 1e6:+.2f} MB ({moved:+.5f}%) |")


if __name__ == "__main__":
    main()
