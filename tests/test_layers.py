"""The package's layering holds: the import-linter contracts in pyproject.toml ([tool.importlinter]).

They fail when a module imports one above it, when siblings anywhere in ti_flax import each other
both ways (a lazy import inside a function counts: grimp reads every import statement), or when
one embedding layout starts importing another.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_hold():
    # import-linter's command line in a child: its console writer closes the streams it used.
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
