"""A training run: prepared, compiled, stepped, checkpointed and written out.

| module | holds |
| --- | --- |
| `run.py` | `prepare(config) -> Run`: model, tokens, data and optimizer loaded and checked before anything is written |
| `engine.py` | `build(run) -> Engine`: frozen weights on the devices, the step compiled ahead, batches fed |
| `step.py` | the pure `train_step`: gradients and optimizer state for the learned rows only |
| `losses.py`, `optim.py` | the loss recipe (`LossSpec`) and the optimizer with what follows each update (`OptimizerSpec`) |
| `latents.py` | `--cache_latents`: each image's VAE posterior, encoded once |
| `validation_loss.py` | `--validation_loss_steps`: the loss of fixed examples |
| `actions.py` | the loop's periodic actions: log, save rows, validate, checkpoint, stop on a signal |
| `checkpoint.py` | atomic checkpoints and resume |
| `outputs.py`, `model_card.py`, `logs.py` | what a run writes and prints |
| `footprint.py` | one chip's needs: the step compiled from abstract shapes, its memory and cost |
| `preemption.py`, `distribution.py`, `compile_cache.py` | SIGTERM; multi-host agreement; the persistent compilation cache |

May import `sampling`, `data`, `families`, `formats`, `models`, `config` and the leaf modules.
"""
