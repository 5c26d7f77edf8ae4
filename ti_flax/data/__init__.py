"""Training data on the host: images, masks, captions, prompts, and the seeded batches made of them.

| module | holds |
| --- | --- |
| `images.py` | listing, decoding, cropping and resizing images; SDXL's size-and-crop ids; buckets; masks |
| `captions.py` | caption files beside the images, tokenized and checked |
| `prompts.py` | the one prompt encoder (templates, captions, validation prompts, `generate`'s prompts) |
| `batches.py` | batch types (`PixelBatch`, `LatentBatch`, `Bucketed`) and one concept's batch source |
| `concept_mix.py` | several concepts' batches, drawn by weight |
| `buckets.py` | `--enable_bucket`'s batches, one bucket each |

Every batch source is a pure function of (seed, step) over numpy arrays: no jax, no devices.
Imports `config`, `tokens`, `files` and `errors` only.
"""
