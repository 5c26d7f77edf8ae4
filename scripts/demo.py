"""Offline end-to-end demo: tiny model -> training -> embedding file -> PyTorch diffusers.

1. builds a tiny random-init Stable Diffusion folder (real CLIP tokenizer) in demo/tiny-sd,
2. trains a 2-vector "<cat-toy>" embedding on scripts/sample_images with ti_flax,
3. loads demo/output/learned_embeds.safetensors into a PyTorch StableDiffusionPipeline with
   diffusers' own `load_textual_inversion`, and prints the token ids and the largest
   difference between the PyTorch and Flax text encoders' hidden states.

Run it through `bash scripts/quickstart.sh`, which installs what it needs first.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo", help="where the tiny model and the output go")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    import make_tiny_model

    from ti_flax import TrainConfig, train
    from ti_flax.commands import verify

    model_dir = os.path.join(args.workdir, "tiny-sd")
    if not os.path.exists(os.path.join(model_dir, "model_index.json")):
        make_tiny_model.build_tiny_model(model_dir)
        print(f"built a tiny random Stable Diffusion model in {model_dir}")
    config = TrainConfig.tiny(
        model_dir,
        os.path.join(HERE, "sample_images"),
        os.path.join(args.workdir, "output"),
        num_vectors=2,
        max_train_steps=args.steps,
        checkpointing_steps=10,
        checkpoints_total_limit=1,
    )
    result = train(config)
    path = result.files["diffusers"]
    (check,) = verify.verify_files(model_dir, result.rows, [(path, result.tokens[0], False)])
    print(f"PyTorch diffusers loaded {path}:")
    print(f"  tokens {result.tokens} -> ids {list(check.token_ids)}")
    print(f"  max |hidden state difference| PyTorch vs Flax: {check.max_abs_diff:.2e} (limit {verify.TOLERANCE:g})")
    print("demo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
