"""Caption files: each training image's own prompt, in a text file beside it (kohya, A1111).

`1.png`'s caption is `1.txt` (with `--caption_extension .txt`), written with the placeholder
token where the concept goes: "a photo of <cat-toy> on a wooden table". Every caption is read,
checked and tokenized once, at start-up: a caption that is empty, lacks the placeholder or does
not fit the text encoder is an error naming its file, never a silent cut. Images without a
caption file use the templates (prompts.py), which shows them as before.
"""

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np

from ..errors import UserError, first_line, short_list
from .prompts import encode_prompt, mentions, too_long


def caption_path(data_dir: str, image_name: str, extension: str) -> str:
    """The caption file of an image: same folder, same name stem, `extension` (".txt")."""
    return os.path.join(data_dir, os.path.splitext(image_name)[0] + extension)


def read_captions(data_dir: str, names: Sequence[str], extension: str) -> list[Optional[tuple[str, str]]]:
    """The caption file beside each image, as kohya's and A1111's trainers read them.

    Args:
      data_dir: the training data folder.
      names: the image file names, as images.load_image_set returns them.
      extension: e.g. ".txt": image `1.png`'s caption is `1.txt`.

    Returns:
      Per image, (path, text) with the file's text stripped (UTF-8; a byte-order mark is dropped),
      or None where the image has no caption file.
    Raises:
      UserError naming the file when a caption file is empty or cannot be read, and when no image
      has one (the extension is most likely wrong).
    """
    out = []
    for name in names:
        path = caption_path(data_dir, name, extension)
        if not os.path.isfile(path):
            out.append(None)
            continue
        try:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read().strip()
        except PermissionError:
            raise UserError(f"cannot read caption file {path}: permission denied; make it readable") from None
        except UnicodeDecodeError as e:
            raise UserError(f"caption file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise UserError(f"cannot read caption file {path} ({first_line(e)})") from None
        if not text:
            raise UserError(
                f"caption file {path} is empty; write the prompt for {name} in it, or delete it to train "
                "that image on the templates"
            )
        out.append((path, text))
    if all(c is None for c in out):
        raise UserError(
            f"--caption_extension {extension}: no image in {data_dir} has a caption file "
            f"(looked for {short_list([os.path.basename(caption_path(data_dir, n, extension)) for n in names])})"
        )
    return out


def tokenize_captions(
    tokenizer, captions: Sequence[Optional[tuple[str, str]]], tokens: Sequence[str], prefix_token: bool = False
) -> list[Optional[np.ndarray]]:
    """Token ids of each image's caption, checked at start-up.

    Args:
      tokenizer: a CLIP tokenizer that already knows the placeholder tokens.
      captions: per image, (path, text) or None, as read_captions returns them.
      tokens: the placeholder tokens; `tokens[0]` in a caption expands to all of them.
      prefix_token: put `tokens[0]` in front of a caption that lacks it ("<cat-toy>, a photo of
        ..."); without it such a caption is an error.

    Returns:
      Per image, int32 [model_max_length] ids (prompts.encode_prompt), or None where there is no caption.
    Raises:
      UserError naming the file for a caption without the placeholder (unless prefix_token) or one
      too long for the text encoder.
    """
    out = []
    for caption in captions:
        if caption is None:
            out.append(None)
            continue
        path, text = caption
        name = f"caption file {path}"
        if not mentions(tokenizer, text, tokens[0]):
            if not prefix_token:
                raise UserError(
                    f"caption file {path} does not contain the placeholder {tokens[0]}: write it where the "
                    f"concept goes (\"a photo of {tokens[0]} on a table\"), or pass --caption_prefix_token to put "
                    "it in front"
                )
            text, name = f"{tokens[0]}, {text}", f"caption file {path} with {tokens[0]} in front"
        out.append(encode_prompt(tokenizer, text, [tokens], overflow=too_long(name, tokens)))
    return out
