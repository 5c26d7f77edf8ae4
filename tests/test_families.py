"""The model families: one object per family that the rest of ti_flax asks, and nothing else asks
which family it has.

- Every registered family answers every question of ModelFamily: one that inherits a question
  unanswered (a new family half done) fails here, not in a user's run.
- A folder is claimed by exactly one family (SD 1.x / SD 2.x folders share a pipeline class and
  differ in their text encoder's activation; SDXL's have a second encoder): overlapping claims
  would make loading depend on the registry's order.
- No module outside ti_flax/families/ tests the family: an `is_sdxl`, a comparison of a spec's
  family name, or a lookup of one family by name elsewhere fails the scan.
"""

import inspect
import json
import os
import re

import pytest

from ti_flax import families
from ti_flax.families import ModelFamily

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The methods every family must answer: those ModelFamily leaves unanswered (a method with a
# default answer, as `claims_file`'s False for families whose files models/single_file.py reads,
# is answered where it differs).
QUESTIONS = [name for name, value in vars(ModelFamily).items()
             if inspect.isfunction(value) and not name.startswith("_") and "raise NotImplementedError" in
             inspect.getsource(value)]


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_every_family_answers_every_question(family):
    unanswered = [name for name in QUESTIONS if getattr(type(family), name) is getattr(ModelFamily, name)]
    if type(family).claims_file is ModelFamily.claims_file:  # it claims no file: nothing for load_file
        unanswered.remove("load_file")
    assert not unanswered, f"{family.name} does not answer {unanswered}"
    for attribute in ("name", "title", "encoders", "pipeline_class"):
        assert getattr(family, attribute), f"{family.name}: {attribute} is not set"
    assert families.get(family.name) is family


def test_the_file_flags_are_the_model_files_group():
    """What families.load_model's `separate` takes is what `train` and `generate` parse in one group."""
    from ti_flax import TrainConfig
    from ti_flax.config import flags

    declared = [name for name, flag, _ in flags.flags(TrainConfig) if flag.group == flags.MODEL_FILES]
    assert list(families.FILE_FLAGS) == declared == ["clip_l", "t5xxl", "ae", "t5xxl_tokenizer"]


def fake_folder(path, class_name, hidden_act, second_encoder=False, transformer=False):
    """What `claims` reads of a model folder: model_index.json, text_encoder/config.json and
    transformer/config.json (FLUX.1's)."""
    os.makedirs(os.path.join(path, "text_encoder"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": class_name}, f)
    with open(os.path.join(path, "text_encoder", "config.json"), "w") as f:
        json.dump({"hidden_act": hidden_act, "hidden_size": 32, "num_attention_heads": 4}, f)
    if second_encoder:
        os.makedirs(os.path.join(path, "text_encoder_2"))
    if transformer:
        os.makedirs(os.path.join(path, "transformer"))
        with open(os.path.join(path, "transformer", "config.json"), "w") as f:
            json.dump({"_class_name": "FluxTransformer2DModel"}, f)
    return path


@pytest.mark.parametrize("name, class_name, hidden_act, second, transformer", [
    ("sd1", "StableDiffusionPipeline", "quick_gelu", False, False),
    ("sd2", "StableDiffusionPipeline", "gelu", False, False),
    ("sdxl", "StableDiffusionXLPipeline", "quick_gelu", True, False),
    ("sdxl", "", "quick_gelu", True, False),  # no index: the second encoder says it
    ("flux", "FluxPipeline", "quick_gelu", True, True),  # a second encoder too, and CLIP-L's activation
    ("flux", "", "quick_gelu", True, True),  # no index: the transformer's config says it
])
def test_each_folder_is_claimed_by_exactly_one_family(tmp_path, name, class_name, hidden_act, second, transformer):
    folder = fake_folder(str(tmp_path / "m"), class_name, hidden_act, second, transformer)
    claimed = [f.name for f in families.FAMILIES if f.claims(folder, class_name)]
    assert claimed == [name]
    assert families.family_of_folder(folder).name == name


# What testing a model's family looks like; only ti_flax/families/ may.
FAMILY_TESTS = re.compile(r"\bis_sdxl\b|\.family\s*[!=]=|\bfamily\.name\s*[!=]=|families\.get\(|\bsdxl\s*=")


def test_nothing_outside_the_families_tests_the_family():
    found = []
    for folder, _, names in os.walk(os.path.join(ROOT, "ti_flax")):
        if os.path.basename(folder) == "families":
            continue
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    found += [f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}"
                              for i, line in enumerate(f, 1) if FAMILY_TESTS.search(line)]
    assert not found, "\n".join(found)
