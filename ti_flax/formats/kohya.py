"""kohya sd-scripts' layout, which ComfyUI reads too: `{"emb_params": float32 [N, D]}`.

The file does not name its token: ComfyUI uses the file name (`embedding:NAME` in a prompt),
diffusers needs `token=`.
"""

from .base import Layout, file_content, register

KEY = "emb_params"


def read(key, rows):
    """(token, rows, step) of a kohya file: no token, no step."""
    return None, rows, None


def encode(embedding, name, path):
    """safetensors or torch bytes of `{"emb_params": rows}`, by `path`'s extension."""
    return file_content({KEY: embedding.rows}, path)


LAYOUT = register(Layout(
    "kohya", '{"emb_params": [N, D]} (kohya sd-scripts, ComfyUI)',
    extensions=(".safetensors", ".pt"), encode=encode, token_from=None,
), aliases=("comfyui",))
