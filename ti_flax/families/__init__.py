"""Model families: what differs between SD 1.x, SD 2.x and SDXL, asked of one object per family.

| module | holds |
| --- | --- |
| `base.py` | `ModelFamily` (the questions), `TextEncoder`, `Frozen` (the weights a program reads) |
| `sd.py` | `StableDiffusion`: the UNet families' answers (one CLIP encoder, DDPM, diffusers files) |
| `sd1.py`, `sd2.py`, `sdxl.py` | one family each: its encoders, single-file layout and differences |
| `registry.py` | the registered families: `get(name)`, `of(spec)`, `FAMILIES` |
| `loading.py` | `load_model` / `read_spec`: a folder, Hub id or single file, through the family that claims it |

Every other package asks `families.of(spec)` (or the family a folder or file is) and never tests
which family it has. A new family is one module here (plus its networks in models/) and one line
in registry.py; docs/add-a-family.md lists what it answers. May import `data`, `formats`,
`models`, `config` and the leaf modules.
"""

from .base import Frozen, ModelFamily, TextEncoder
from .loading import detect_folder, family_of_folder, load_model, read_spec
from .registry import FAMILIES, FILE_FLAGS, get, of

__all__ = ["FAMILIES", "FILE_FLAGS", "Frozen", "ModelFamily", "TextEncoder", "detect_folder", "family_of_folder", "get",
           "load_model", "of", "read_spec"]
