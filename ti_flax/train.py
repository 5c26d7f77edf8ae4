"""`python -m ti_flax.train`: the command line of `ti_flax.train` (the same as `ti-flax-train`).

The function and its flags live in commands/train.py. Run this module with `python -m`; do not import it:
importing a submodule makes it the package's attribute of that name, in place of the function
`ti_flax.train`.
"""

if __name__ == "__main__":
    import sys

    from ti_flax.commands.train import main

    sys.exit(main())
