"""Text-to-image sampling with learned rows: the compiled sampler, and the validation images a run draws.

| module | holds |
| --- | --- |
| `sampler.py` | `Sampler`: the scheduler's loop with classifier-free guidance, compiled once per setting |
| `validation.py` | `--validation_prompt`'s images during training, and their grid |

May import `data`, `families`, `formats`, `models`, `config` and the leaf modules.
"""
