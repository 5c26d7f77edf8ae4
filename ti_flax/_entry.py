"""Modules that are also functions: `ti_flax.train`, `ti_flax.export`, `ti_flax.generate`.

Each name is both a module (`python -m ti_flax.train`) and the function users call
(`ti_flax.train(config)`). Once a submodule is imported, Python binds the package attribute to
the module, so `from ti_flax import train` may give either; a callable module makes
both work.
"""

import sys


def make_callable(module_name, function_name):
    """Let module `module_name` be called as its function `function_name`."""
    module = sys.modules[module_name]

    class CallableModule(type(module)):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    module.__class__ = CallableModule
