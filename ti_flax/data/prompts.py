"""Prompts to token ids: the one encoder of every prompt, and the training templates.

Every prompt (a training template filled with the placeholder text, a caption, the validation
prompt, `generate`'s prompt and negative prompt) becomes ids through `encode_prompt`: BOS, the
text's ids with each concept's first token expanded to all of its tokens, EOS, padding. What a
prompt longer than the text encoder's context gets is the caller's explicit `overflow` rule:
training refuses it (a cut would drop placeholder vectors or caption words unseen), sampling cuts
it with a warning, as diffusers' pipelines do.

A model whose text encoders read different vocabularies (FLUX: CLIP-L and T5) is given its
tokenizers together (ModelFamily.prompt_tokenizers): a prompt is then each tokenizer's ids, each
padded to its own context, one after the other.

    >>> concepts = [["<cat-toy>", "<cat-toy>_1"]]  # doctest: +SKIP
    >>> ids = encode_prompt(tokenizer, "a photo of <cat-toy>", concepts, overflow=CUT)  # doctest: +SKIP
"""

import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import UserError
from ..tokens import expand_placeholders

# The small ImageNet templates of the textual-inversion paper, as in the diffusers examples.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

# The overflow rule of sampling: keep the first tokens, with a warning (diffusers' pipelines).
CUT = "cut"


def templates_for(learnable_property: str) -> tuple[str, ...]:
    """Returns the prompt templates for "object" or "style"."""
    if learnable_property == "object":
        return OBJECT_TEMPLATES
    if learnable_property == "style":
        return STYLE_TEMPLATES
    raise UserError(f"learnable_property must be 'object' or 'style', not {learnable_property!r}")


def max_prompt_length(tokenizer) -> int:
    """The text encoder's context in tokens, BOS and EOS included (77 for CLIP)."""
    max_len = tokenizer.model_max_length
    if not 0 < max_len <= 4096:  # a tokenizer folder without tokenizer_config.json says 1e30
        raise UserError(f"tokenizer.model_max_length is {max_len}; its config file is missing")
    return max_len


def tokenizers_of(tokenizers):
    """A tuple of tokenizers, from one tokenizer or several."""
    return tuple(tokenizers) if isinstance(tokenizers, (tuple, list)) else (tokenizers,)


def _spelled_out(tokenizer, tokens):
    """The ids a concept's first token expands to: its id, then the ids the tokenizer gives the
    rest after a space, as it tokenizes the text diffusers' `maybe_convert_prompt` writes ("<cat>" ->
    "<cat> <cat>_1"). CLIP and transformers 5's T5 give one id per token; transformers 4's T5 puts
    a "▁" piece before each added token, and FluxPipeline's T5 then sees it between the vectors too."""
    first = tokenizer.convert_tokens_to_ids(tokens[0])
    if len(tokens) == 1:
        return [first]
    return [first, *tokenizer(" " + " ".join(tokens[1:]), add_special_tokens=False).input_ids]


def _uncut_ids(tokenizer, text, concepts=()):
    """list[int]: BOS (where the tokenizer has one: not T5's), the text's ids with each concept's
    first token expanded, EOS; any length."""
    groups = [_spelled_out(tokenizer, tokens) for tokens in concepts]
    expanded = expand_placeholders(tokenizer(text, add_special_tokens=False).input_ids, groups)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [*bos, *expanded, tokenizer.eos_token_id]


def encode_prompt(tokenizer, text: str, concepts: Sequence[Sequence[str]] = (), *, overflow) -> np.ndarray:
    """Token ids of one prompt, padded to the text encoder's context as diffusers pads them.

    Args:
      tokenizer: a CLIP tokenizer that already holds the concepts' tokens; or a model's prompt
        tokenizers together (ModelFamily.prompt_tokenizers), whose ids follow each other.
      text: the prompt, e.g. "a photo of <cat-toy> on a beach".
      concepts: token lists such as [["<cat>", "<cat>_1", "<cat>_2"]]. A concept's first token in
        the text stands for all of them, as in diffusers' `maybe_convert_prompt` ("<cat>" ->
        "<cat> <cat>_1 <cat>_2"); a text that already spells them out is kept.
      overflow: the rule for a text longer than the context: CUT keeps its first
        `model_max_length - 2` tokens with a warning (sampling: generate, validation images); a
        function `(length, limit) -> str` refuses it with a UserError of that message (training:
        see `too_long`), `length` counting BOS and EOS.

    Returns:
      int32 [model_max_length]: BOS, the expanded ids, EOS, padding (several tokenizers: each's,
      one after the other).
    Raises:
      UserError when the tokenizer has no context length, or the text does not fit and `overflow`
      refuses it.
    """
    if overflow != CUT and not callable(overflow):
        raise ValueError(f"overflow must be CUT or a function that words the refusal, got {overflow!r}")
    if isinstance(tokenizer, (tuple, list)):
        return np.concatenate([encode_prompt(t, text, concepts, overflow=overflow) for t in tokenizer])
    ids = _uncut_ids(tokenizer, text, concepts)
    limit = max_prompt_length(tokenizer)
    if len(ids) > limit:
        if overflow != CUT:
            raise UserError(overflow(len(ids), limit))
        specials = 1 if tokenizer.bos_token_id is None else 2  # EOS, and BOS where there is one
        warnings.warn(f"prompt {text!r} is {len(ids) - specials} tokens long; only the first {limit - specials} "
                      "are used")
        ids = ids[: limit - 1] + [tokenizer.eos_token_id]
    return np.asarray(ids + [tokenizer.pad_token_id] * (limit - len(ids)), dtype=np.int32)


def too_long(name: str, tokens: Sequence[str]):
    """The overflow rule of a training prompt written with a concept's placeholder: refuse it.

    Args:
      name: what the prompt is, e.g. "caption file cat_toy/1.txt" or "--validation_prompt".
      tokens: the concept's placeholder tokens, e.g. ["<cat-toy>", "<cat-toy>_1"].
    Returns:
      The `overflow` argument of encode_prompt that words the refusal: the prompt's name, its
      length and the limit.
    """

    def message(length, limit):
        vectors = f" with {tokens[0]} as {len(tokens)} vectors" if len(tokens) > 1 else ""
        fewer = " or use fewer --num_vectors" if len(tokens) > 1 else ""
        return (f"{name} is {length} tokens{vectors} (BOS and EOS included), more than the text encoder's "
                f"{limit}; shorten it{fewer}")

    return message


def mentions(tokenizer, text: str, token: str) -> bool:
    """Whether `token` (a placeholder the tokenizer holds; of several, the first) is one of the
    tokens of `text`."""
    tokenizer = tokenizers_of(tokenizer)[0]
    return tokenizer.convert_tokens_to_ids(token) in tokenizer(text, add_special_tokens=False).input_ids


def encode_templates(tokenizer, templates: Sequence[str], placeholder_text: str) -> np.ndarray:
    """Fills each template with the placeholder text and encodes it, refusing any that overflows.

    Args:
      tokenizer: a Hugging Face CLIP tokenizer that already knows the placeholder tokens (or a
        model's prompt tokenizers, see `encode_prompt`).
      templates: strings with one "{}", e.g. OBJECT_TEMPLATES.
      placeholder_text: e.g. "<cat-toy> <cat-toy>_1 <cat-toy>_2" (tokens.placeholder_text).

    Returns:
      int32 [len(templates), tokenizer.model_max_length] token ids, padded.
    Raises:
      UserError naming the longest template, its length and the limit when any template does not
      fit: every template is checked here, at start-up, never cut.
    """
    texts = [t.format(placeholder_text) for t in templates]
    # Name the template and count the placeholders rather than repeat the expanded prompt.
    words = placeholder_text.split()
    shown = " ".join(words) if len(words) <= 3 else f"{words[0]} {words[1]} ... {words[-1]}"
    # The longest for the tokenizer with the least room goes first.
    room = lambda text: min(max_prompt_length(t) - len(_uncut_ids(t, text)) for t in tokenizers_of(tokenizer))  # noqa: E731
    longest = int(np.argmin([room(text) for text in texts]))

    def refuse(length, limit):
        return (f"prompt {templates[longest].format(shown)!r} ({len(words)} placeholder tokens) is {length} tokens, "
                f"more than the text encoder's {limit}; use fewer vectors per token (--num_vectors)")

    # The longest goes first, so a refusal names it; once it fits, every template does.
    encode_prompt(tokenizer, texts[longest], overflow=refuse)
    return np.stack([encode_prompt(tokenizer, text, overflow=refuse) for text in texts])
