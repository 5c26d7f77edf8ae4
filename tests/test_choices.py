"""Each closed list of flag values has one source (ti_flax/choices.py): the command lines offer
exactly its values with the documented default, validation rejects anything else in one line,
the code that acts on a value knows every one of them, and the docs' table (docs/flags.md) is printed from it."""

import dataclasses
import os

import pytest

from ti_flax.config import choices, cli
from ti_flax.commands import export as exporting, generate as generation, plan as planning
from ti_flax.data import images
from ti_flax.sampling import sampler
from ti_flax.config import TrainConfig
from ti_flax.errors import UserError
from ti_flax.models import attention, schedulers

FLAGS_PAGE = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "flags.md")
# Every row of the docs' table: the train and generate flags' lists, then the exporter's formats.
TABLE = (*choices.TABLE, exporting.FORMAT_CHOICE)
PARSERS = {"": cli.build_parser, "(ti_flax.generate)": generation.build_parser, "(ti_flax.export)": exporting.build_parser,
           "(ti_flax.plan)": planning.build_parser}


def _action(parser, flag):
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action


@pytest.mark.parametrize("choice", TABLE, ids=lambda c: c.flags)
def test_command_lines_offer_the_listed_values(choice):
    flag, _, command = choice.flags.partition(" ")
    action = _action(PARSERS[command](), flag)
    if action.choices is None:  # checked later, with its own message (--mixed_precision fp16, --format)
        listed = "{" + ",".join(choice.values) + "}"
        assert action.metavar == listed or ", ".join(choice.values) in action.help
    else:
        assert tuple(action.choices) == tuple(choice.values)
    if action.default is not None:
        assert action.default == choice.default


@pytest.mark.parametrize("choice", [c for c in choices.TABLE if not c.flags.count(" ")], ids=lambda c: c.flags)
def test_train_config_defaults_and_validation_follow_the_list(choice):
    field = choice.flags[2:]
    default = getattr(TrainConfig(), field)
    assert default in choice.values + (None,)
    assert default is None or default == choice.default
    base = dict(pretrained_model_name_or_path="m", train_data_dir="d", placeholder_token="<t>",
                initializer_token="toy", output_dir="out", report_to="none")
    for value in choice.values:
        if field == "report_to" and value == "tensorboard":
            continue  # needs tensorboardX, checked separately
        TrainConfig(**{**base, field: value}).validate()
    with pytest.raises(UserError, match=f"^{choice.flags} must be one of {', '.join(choice.values)}, got 'nope'$"):
        TrainConfig(**{**base, field: "nope"}).validate()


def test_the_code_acting_on_a_value_knows_every_value():
    assert tuple(images.RESAMPLING) == tuple(choices.INTERPOLATIONS)
    assert attention.IMPLEMENTATIONS == choices.ATTENTION
    assert sampler.SCHEDULERS == schedulers.SAMPLERS == choices.SAMPLERS
    assert schedulers.PREDICTION_TYPES == choices.PREDICTION_TYPES
    for name in choices.LR_SCHEDULERS:  # every schedule builds
        from ti_flax.training.optim import OptimizerSpec

        config = dataclasses.replace(TrainConfig(), lr_scheduler=name, lr_warmup_steps=2)
        assert callable(OptimizerSpec.from_config(config, 1, 10).schedule())


def test_docs_table_is_the_one_choices_prints():
    with open(FLAGS_PAGE, encoding="utf-8") as f:
        page = f.read()
    table = choices.markdown_table(TABLE)
    assert table in page, f"docs/flags.md's Choices table is stale; run python scripts/flag_reference.py:\n{table}"
