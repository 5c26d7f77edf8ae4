"""What a user runs: `train`, `export`, `generate` and `plan`, each a plain function with its command line.

| module | holds |
| --- | --- |
| `train.py` | `train(config) -> TrainResult`, the short training loop, `main` (`python -m ti_flax.train`) |
| `export.py` | `export(...)`: convert an embedding between the layouts other tools read (`--verify`: in PyTorch) |
| `generate.py` | `generate(...)`: sample images with learned embeddings |
| `plan.py` | `plan(config, target)`: will a run fit on a chip, and how fast can it go |
| `verify.py` | `export --verify`: each written file loaded in PyTorch diffusers and compared |

Each command is the function of its module's name (`commands.train.train`), which the package's face
(`ti_flax.train`) and the `python -m` entries reach. May import every other package of ti_flax;
nothing else imports it.
"""
