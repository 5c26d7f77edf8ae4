"""`python -m ti_flax.generate`: the command line of `ti_flax.generate` (the same as `ti-flax-generate`).

The function and its flags live in commands/generate.py. Run this module with `python -m`; do not import it:
importing a submodule makes it the package's attribute of that name, in place of the function
`ti_flax.generate`.
"""

if __name__ == "__main__":
    import sys

    from ti_flax.commands.generate import main

    sys.exit(main())
