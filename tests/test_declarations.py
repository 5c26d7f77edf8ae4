"""Each flag is declared once, with a resume decision, and the resume guard follows the specs.

- Every TrainConfig field comes from `flag(...)`: a field added as a plain dataclass field (no
  group, no help, no resume decision) fails `flags.flags`, and with it this file.
- checkpoint.MUST_MATCH is exactly the fields declared resume=MATCH: a hand-kept list beside the
  declarations would fail the first test when the two drift apart.
- The loss recipe (losses.LossSpec) and what OptimizerSpec keeps across a resume (the accumulation,
  the norm control, the EMA) are derived from flags a resume must keep: the flags their
  `from_config` reads (recorded, over configs that switch every option on) are all MATCH. A new knob
  of either spec whose flag is declared MAY_CHANGE fails here, instead of changing silently on resume.
- Every OptimizerSpec field says whether a resume keeps it: a field added without that metadata
  fails; the fields `rules_from_config` makes are exactly the ones it must keep.
"""

import dataclasses

import pytest

from ti_flax import TrainConfig
from ti_flax.config import cli, flags
from ti_flax.training import checkpoint
from ti_flax.training.losses import LossSpec
from ti_flax.training.optim import OptimizerSpec

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}

# Configs that together switch on every option the two specs read (norm targets for both encoders).
EVERYTHING_ON = [
    TrainConfig(),
    TrainConfig(snr_gamma=5.0, noise_offset=0.1, loss_type="huber", huber_c=0.2, huber_schedule="exponential",
                min_timestep=100, max_timestep=900, alpha_mask=True, unmasked_weight=0.1,
                embedding_norm="preserve", embedding_norm_target=(0.4, 0.5), use_ema=True, ema_decay=0.99,
                ema_update_after_step=3, gradient_accumulation_steps=2),
    TrainConfig(masked_loss=True, loss_type="smooth_l1", embedding_norm_decay=0.1),
    TrainConfig(timestep_sampling="shift", discrete_flow_shift=2.0, sigmoid_scale=0.5, guidance_scale=3.5),
]


class Reads:
    """A TrainConfig whose field reads are recorded (its properties run on the recorder, so the
    fields a property reads are recorded too)."""

    def __init__(self, config):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "names", set())

    def __getattr__(self, name):
        attr = getattr(type(self._config), name, None)
        if isinstance(attr, property):
            return attr.fget(self)
        if name in FIELDS:
            self.names.add(name)
        return getattr(self._config, name)


def test_every_field_is_a_declared_flag_with_a_resume_decision():
    declared = flags.flags(TrainConfig)
    assert {name for name, _, _ in declared} == FIELDS
    assert all(flag.resume in (flags.MATCH, flags.MAY_CHANGE) for _, flag, _ in declared)
    assert checkpoint.MUST_MATCH == flags.must_match(TrainConfig)

    @dataclasses.dataclass(frozen=True)
    class Undeclared:
        a: int = flags.flag(1, group=flags.MODEL, resume=flags.MATCH)
        b: int = 2

    with pytest.raises(TypeError, match=r"Undeclared\.b is not declared with flag\(\)"):
        flags.flags(Undeclared)
    with pytest.raises(TypeError):
        flags.flag(1, group=flags.MODEL)  # no resume decision


def test_the_parser_is_the_declarations():
    """Each field is its flag, with the field's default: an unset command line is TrainConfig()."""
    parser = cli.build_parser()
    dests = {a.dest for a in parser._actions} - {"help", "local_rank"}
    assert dests == FIELDS
    config = cli.parse_config(["--pretrained_model_name_or_path", "m"], validate=False)
    assert config == TrainConfig(pretrained_model_name_or_path="m")
    parsed = cli.parse_config(["--pretrained_model_name_or_path", "m", "--max_train_steps", "0",
                               "--embedding_norm_target", "0.4", "0.5", "--no_zero_terminal_snr"], validate=False)
    assert (parsed.max_train_steps, parsed.embedding_norm_target, parsed.zero_terminal_snr) == (None, (0.4, 0.5), False)


def loss_reads():
    names = set()
    for config in EVERYTHING_ON:
        reads = Reads(config)
        for flow in (False, True):  # a DDPM family's recipe, and a rectified-flow family's (FLUX.1)
            LossSpec.from_config(reads, 1000, flow=flow)
        names |= reads.names
    return names


def test_the_loss_recipe_comes_from_flags_a_resume_keeps():
    read = loss_reads()
    assert {"snr_gamma", "noise_offset", "loss_type", "huber_c", "huber_schedule", "min_timestep", "max_timestep",
            "masked_loss", "alpha_mask", "unmasked_weight", "timestep_sampling", "discrete_flow_shift",
            "sigmoid_scale", "guidance_scale"} <= read  # the recorder sees through properties
    assert read <= set(checkpoint.MUST_MATCH), sorted(read - set(checkpoint.MUST_MATCH))


def test_what_the_optimizer_keeps_comes_from_flags_a_resume_keeps():
    decisions = {f.name: f.metadata.get("resume") for f in dataclasses.fields(OptimizerSpec)}
    assert set(decisions.values()) <= {flags.MATCH, flags.MAY_CHANGE}, decisions
    kept = {name for name, decision in decisions.items() if decision == flags.MATCH}
    read = set()
    for config in EVERYTHING_ON:
        reads = Reads(config)
        rules = OptimizerSpec.rules_from_config(reads, (0.4, 0.5), (768, 1280))
        assert set(rules) == kept
        read |= reads.names
    assert {"gradient_accumulation_steps", "embedding_norm", "embedding_norm_decay", "use_ema", "ema_decay",
            "ema_update_after_step"} <= read
    assert read <= set(checkpoint.MUST_MATCH), sorted(read - set(checkpoint.MUST_MATCH))


def test_a_knob_declared_may_change_would_be_caught():
    """The check above fails for a loss flag a resume may change: here --noise_offset, re-declared."""
    may_change = set(checkpoint.MUST_MATCH) - {"noise_offset"}
    assert not loss_reads() <= may_change
