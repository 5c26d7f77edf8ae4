"""Each training flag declared once: `flag(...)` is a `TrainConfig` field's default and its command line.

A field of `TrainConfig` is `name: type = flag(default, group=..., resume=..., help=...)`. From that
one declaration come the dataclass field (its default), the argparse flag `--name` of
`python -m ti_flax.train` (`add_arguments`: its group, type, choices, metavar, help), the resume
guard (`resume`: whether a checkpoint's value must equal the run's, checkpoint.MUST_MATCH), and
the flag reference in the docs (`reference`).

Why our own and not a library: the command line must stay exactly what it is (diffusers' flag
names, `store_true` switches, the `--zero_terminal_snr` / `--no_zero_terminal_snr` pair, the
`--allow-pickle` alias, argument groups and the help text), and every flag needs a resume
decision; the dataclass-to-argparse libraries (transformers' HfArgumentParser, simple-parsing,
tyro) each render bools, Optionals and help differently, and none carries such a decision.
"""

import dataclasses
from typing import Callable, Optional

# Resume decisions: a checkpoint resumes only into a run whose MATCH settings equal its own;
# MAY_CHANGE settings (steps, saving, logging, speed, the optimizer's rates) may differ.
MATCH, MAY_CHANGE = "match", "may change"
RESUME = (MATCH, MAY_CHANGE)

# The argparse groups, in the order `--help` lists them.
MODEL = "model"
MODEL_FILES = "a model kept as files (FLUX.1's parts apart, as ComfyUI and Forge keep them; kohya's flags)"
DATA = "concept and data"
BUCKETS = "aspect-ratio buckets (kohya sd-scripts' flags; off by default)"
OPTIMISATION = "optimisation"
LOSS = "loss recipe (diffusers' and kohya's flags, each off by default)"
MASKS = "masked loss (kohya's and OneTrainer's flags, off by default)"
ROWS = "the learned rows after each optimizer update (all off by default)"
SPEED = "speed and memory"
OUTPUTS = "outputs"
VALIDATION = "validation images"
VALIDATION_LOSS = "validation loss"
STOPPING = "early stopping (off by default)"
LORA = "pivotal tuning: a LoRA of the UNet beside the rows (kohya's and diffusers' flags; off by default)"
LOGGING = "logging"
PROCESSES = "multi-process (a multi-host TPU slice needs none of these)"
FLOW = "rectified flow (FLUX.1; kohya's flags)"
GROUPS = (MODEL, MODEL_FILES, DATA, BUCKETS, OPTIMISATION, LOSS, FLOW, MASKS, ROWS, LORA, SPEED, OUTPUTS, VALIDATION,
          VALIDATION_LOSS, STOPPING, LOGGING, PROCESSES)


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a TrainConfig field appears on the command line and what a resume does with it.

    Attributes:
      group: one of GROUPS. resume: MATCH or MAY_CHANGE (see checkpoint.MUST_MATCH).
      help: the --help text (None: none). type: argparse's type (int, float; None: str).
      switch: a `store_true` flag (the field is a bool, False by default).
      choices, metavar, nargs, required: argparse's.
      aliases: more option strings, e.g. ("--allow-pickle",).
      negation: for a tri-state bool (default None): the help of `--no_NAME`, which sets False
        where `--NAME` sets True.
      from_cli: converts the parsed value into the field's (e.g. 0 -> None, a list -> a tuple).
    """

    group: str
    resume: str
    help: Optional[str] = None
    type: Optional[Callable] = None
    switch: bool = False
    choices: Optional[tuple] = None
    metavar: Optional[str] = None
    nargs: Optional[str] = None
    required: bool = False
    aliases: tuple = ()
    negation: Optional[str] = None
    from_cli: Optional[Callable] = None

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"flag group {self.group!r} is not one of GROUPS")
        if self.resume not in RESUME:
            raise ValueError(f"resume must be {MATCH!r} or {MAY_CHANGE!r}, got {self.resume!r}")


def flag(default, *, group, resume, **options):
    """A TrainConfig field: its `default`, and its Flag (`group`, `resume`, and Flag's other options).

    `resume` has no default: a new flag states whether a resumed run may change it."""
    return dataclasses.field(default=default, metadata={"flag": Flag(group, resume, **options)})


def flags(config_class):
    """[(name, Flag, default)] of every field of `config_class`, in declaration order.

    Raises TypeError for a field declared without `flag()`: each one needs its command line and
    its resume decision."""
    out = []
    for field in dataclasses.fields(config_class):
        declared = field.metadata.get("flag")
        if not isinstance(declared, Flag):
            raise TypeError(f"{config_class.__name__}.{field.name} is not declared with flag(): give it a group, "
                            "a resume decision and its help")
        out.append((field.name, declared, field.default))
    return out


def must_match(config_class):
    """The fields whose value a resumed run must keep (resume=MATCH), in declaration order."""
    return tuple(name for name, declared, _ in flags(config_class) if declared.resume == MATCH)


def add_arguments(parser, config_class, only=None):
    """Add every field of `config_class` to `parser` as its flag, in GROUPS' order (a group is
    made the first time one of its flags is added); `only`: the groups to add (default: all), for
    a command that shares some of the trainer's flags (ti_flax.generate: MODEL_FILES)."""
    groups = {}
    for name, declared, default in flags(config_class):
        if only is not None and declared.group not in only:
            continue
        if declared.group not in groups:
            groups[declared.group] = parser.add_argument_group(declared.group)
        group = groups[declared.group]
        names = [f"--{name}", *declared.aliases]
        if declared.switch:
            group.add_argument(*names, action="store_true", help=declared.help)
            continue
        if declared.negation is not None:
            group.add_argument(*names, action="store_const", const=True, default=default, help=declared.help)
            group.add_argument(f"--no_{name}", dest=name, action="store_const", const=False, help=declared.negation)
            continue
        options = {"required": True} if declared.required else {"default": default}
        for key in ("type", "choices", "metavar", "nargs"):
            if getattr(declared, key) is not None:
                options[key] = getattr(declared, key)
        group.add_argument(*names, help=declared.help, **options)
    return parser


def from_cli(config_class, values):
    """{field: value} of parsed command-line `values` (argparse's dict), each converted by its
    Flag's `from_cli`; keys that are not fields are left out."""
    out = {}
    for name, declared, _ in flags(config_class):
        if name in values:
            value = values[name]
            out[name] = declared.from_cli(value) if declared.from_cli and value is not None else value
    return out


def reference(config_class):
    """The training flags as Markdown: a `###` section per group, a row per flag (its default,
    whether a resumed run must keep it, its help and choices). docs/flags.md holds this text
    (scripts/flag_reference.py writes it)."""
    lines = ["Every field of `ti_flax.TrainConfig` is the flag of the same name, declared once in "
             "`ti_flax/config/train_config.py`. *Resume*: whether a run resumed from a checkpoint must keep the "
             "checkpoint's value (**match**) or may change it.", ""]
    by_group = {}
    for name, declared, default in flags(config_class):
        by_group.setdefault(declared.group, []).append((name, declared, default))
    for group in GROUPS:
        if group not in by_group:
            continue
        lines += [f"### {group[0].upper() + group[1:]}", "", "| flag | default | resume | what it does |",
                  "| --- | --- | --- | --- |"]
        for name, declared, default in by_group[group]:
            names = ", ".join(f"`{n}`" for n in (f"--{name}", *declared.aliases))
            text = declared.help or ""
            if declared.negation is not None:
                names += f", `--no_{name}`"
                text = sentence(text) + f" `--no_{name}`: {declared.negation}"
            if declared.choices:
                text = sentence(text) + " One of " + ", ".join(f"`{c}`" for c in declared.choices) + "."
            shown = "required" if declared.required else ("off" if declared.switch else f"`{_shown(default)}`")
            resume = "**match**" if declared.resume == MATCH else "may change"
            lines.append(f"| {names} | {shown} | {resume} | {table_text(text)} |")
        lines.append("")
    return "\n".join(lines)


def sentence(text):
    """`text` ending in a full stop, so more can follow ("" stays "")."""
    text = text.strip()
    return text if not text or text.endswith(".") else text + "."


def table_text(text):
    """Help text as a Markdown table cell: pipes escaped, <token>s shown rather than read as HTML."""
    return text.strip().replace("|", "\\|").replace("<", "&lt;")


def _shown(default):
    return "unset" if default is None else (str(default) if not isinstance(default, str) else (default or '""'))
