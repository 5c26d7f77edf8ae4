"""AUTOMATIC1111 / Forge's layout.

A `.pt` is what A1111's own `Embedding.save()` writes: `torch.save` of
`{"string_to_token": {"*": 265}, "string_to_param": {"*": [N, D]}, "name", "step",
"sd_checkpoint", "sd_checkpoint_name"}`; the token is `name`.

safetensors holds only a flat name -> tensor map, so A1111's dict cannot go in as it is: a
`.safetensors` holds one tensor keyed by the name (A1111 and ComfyUI read any single-tensor file,
and diffusers takes the key as the token), the other fields as metadata strings, with
`layout=a1111` so that ti_flax reads the name and step back.
"""

from ..errors import UserError
from .base import Layout, describe, file_content, int_or_none, register

# A1111 writes this fixed id for its placeholder "*" (modules/textual_inversion/textual_inversion.py).
STRING_TO_TOKEN = {"*": 265}
SAFETENSORS_TAG = "a1111"  # the metadata `layout` of our A1111-layout safetensors


def is_pickled_layout(data):
    """Whether a loaded torch dict is A1111's own (it has `string_to_param`)."""
    return "string_to_param" in data


def read_pickled(path, data):
    """(token, rows, step) of A1111's dict; UserError unless string_to_param holds one tensor."""
    params = data["string_to_param"]
    if not isinstance(params, dict) or len(params) != 1:
        raise UserError(f"{path}: A1111 embedding must hold exactly one tensor in string_to_param, found {describe(params)}")
    name = data.get("name")
    return (str(name) if name is not None else None), next(iter(params.values())), int_or_none(data.get("step"))


def is_tagged(metadata):
    """Whether safetensors metadata marks our A1111-layout file."""
    return (metadata or {}).get("layout") == SAFETENSORS_TAG


def read_tagged(key, rows, metadata):
    """(token, rows, step) of our A1111-layout safetensors: one tensor, the name in metadata."""
    return metadata.get("name", key), rows, int_or_none(metadata.get("step"))


def encode(embedding, name, path):
    """A1111-layout bytes for `path`: safetensors with the fields as metadata, else torch.save."""
    rows, step = embedding.rows, embedding.step
    if path.endswith(".safetensors"):
        metadata = {"layout": SAFETENSORS_TAG, "name": name, "string_to_token": '{"*": 265}'}
        if step is not None:
            metadata["step"] = str(step)
        return file_content({name: rows}, path, metadata)
    # A1111's own Embedding.save(): torch.save of exactly these six entries.
    return file_content({
        "string_to_token": dict(STRING_TO_TOKEN),
        "string_to_param": {"*": rows},
        "name": name,
        "step": step,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }, path)


LAYOUT = register(Layout(
    "a1111", "A1111 / Forge: string_to_param in a .pt, or one tensor named by `name` in a .safetensors",
    extensions=(".pt", ".safetensors"), encode=encode, token_from="name",
))
