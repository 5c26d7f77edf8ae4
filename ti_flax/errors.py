"""The one exception type that means "the user asked for something we cannot do"."""

import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""

    label = "error"
    exit_code = 2


def run_cli(action):
    """Run a command's `action()` and return its exit status.

    A UserError becomes one line on stderr (`error: ...`) and its exit code (2); Ctrl-C outside
    training (which handles it itself) exits 130 without a traceback.
    """
    try:
        action()
    except UserError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
