"""The one exception type that means "the user asked for something we cannot do", and the
helpers that keep its messages one line: long values are shortened with a count (`short_list`,
`short_text`, `one_line`; `first_line` for a library's exception)."""

import sys

MAX_LINE = 300  # the longest error line printed; longer ones are cut with a count


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""

    label = "error"
    exit_code = 2


def first_line(err):
    """`TypeName: first line of the message` of an exception, at most ~120 characters."""
    text = str(err).strip().splitlines()
    return short_text(f"{type(err).__name__}: {text[0]}" if text else type(err).__name__, 90)


def short_text(text, limit=80):
    """`text` whole if it fits in `limit` characters, else its start and how much was cut."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    keep = max(limit - len(f"... ({len(text)} more characters)"), 10)
    return f"{text[:keep]}... ({len(text) - keep} more characters)"


def short_list(items, limit=3, sep=", "):
    """"a, b, c and 74 more" for a long list; the whole list when it has at most `limit` items."""
    items = [str(x) for x in items]
    if len(items) <= limit:
        return sep.join(items)
    return f"{sep.join(items[:limit])} and {len(items) - limit} more"


def one_line(message, limit=MAX_LINE):
    """A message as one line of at most about `limit` characters (whitespace collapsed)."""
    return short_text(message, limit)


def run_cli(action):
    """Run a command's `action()` and return its exit status.

    A UserError becomes one line on stderr (`error: ...`, at most ~300 characters: longer
    messages are cut with a count) and its exit code (2); Ctrl-C outside training (which
    handles it itself) exits 130 without a traceback. Warnings print as one line each
    (`warning: ...`).
    """
    import warnings

    def format_warning(message, *_, **__):
        return f"warning: {one_line(message)}\n"

    # formatwarning, not showwarning: a caller recording warnings (pytest.warns) still sees them.
    previous = warnings.formatwarning
    warnings.formatwarning = format_warning
    try:
        action()
    except UserError as err:
        print(one_line(f"{err.label}: {err}"), file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous
    return 0
