"""Write docs/flags.md, the flag reference, from the one declaration of each flag.

    python scripts/flag_reference.py          # rewrite docs/flags.md
    python scripts/flag_reference.py --check  # exit 1 if docs/flags.md is stale

The training flags come from TrainConfig's fields (`flag(...)`, ti_flax/config/flags.py), the other
commands' from their parsers, and the table of closed value lists from ti_flax/config/choices.py
(the exporter's `--format` row from the formats registry). tests/test_docs.py keeps the page equal
to this script's output.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "flags.md")


def command_section(title, parser, skip=()):
    """A Markdown table of a command's own flags, from its argparse parser."""
    from ti_flax.config import flags

    lines = [f"## {title}", "", "| flag | default | what it does |", "| --- | --- | --- |"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest in skip or isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{(action.metavar or action.dest).upper()}`"
        if action.required:
            default = "required"
        elif action.nargs == 0:
            default = "off"
        else:
            default = "unset" if action.default is None else f"`{action.default}`"
        text = action.help or ""
        if action.choices:
            text = flags.sentence(text) + " One of " + ", ".join(f"`{c}`" for c in action.choices) + "."
        lines.append(f"| {names} | {default} | {flags.table_text(text)} |")
    return lines + [""]


def reference_text():
    """docs/flags.md as it should read."""
    from ti_flax.commands import export, generate, plan
    from ti_flax.config import TrainConfig, choices, cli, flags

    trained = {a.dest for a in cli.build_parser()._actions}
    lines = ["# Flags", "",
             "Generated from each flag's one declaration by `scripts/flag_reference.py`; "
             "`python -m ti_flax.<command> --help` prints the same help.", "",
             "## python -m ti_flax.train", "", flags.reference(TrainConfig).rstrip(), "",
             "`python -m ti_flax.plan` takes every training flag above plus its own; `ti_flax.export` and "
             "`ti_flax.generate` take theirs alone.", ""]
    lines += command_section("python -m ti_flax.plan", plan.build_parser(), skip=trained)
    lines += command_section("python -m ti_flax.export", export.build_parser())
    lines += command_section("python -m ti_flax.generate", generate.build_parser())
    lines += ["## Choices", "", "The flags that take one of a fixed list of values, printed from the one list that each "
              "command line, its checks and the code read (`--format` from the formats registry):", "",
              choices.markdown_table((*choices.TABLE, export.FORMAT_CHOICE)).rstrip(), ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/flags.md differs from the declarations")
    args = p.parse_args(argv)
    text = reference_text()
    if args.check:
        with open(PAGE, encoding="utf-8") as f:
            return 0 if f.read() == text else 1
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
