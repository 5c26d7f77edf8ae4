"""The one exception type that means "the user asked for something we cannot do"."""

import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""

    label = "error"
    exit_code = 2


def run_cli(action):
    """Run a command's `action()` and return its exit status.

    A UserError becomes one line on stderr (`error: ...`, at most ~300 characters: longer
    messages are cut with a count) and its exit code (2); Ctrl-C outside training (which
    handles it itself) exits 130 without a traceback. Warnings print as one line each
    (`warning: ...`).
    """
    import warnings

    from .files import one_line

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
