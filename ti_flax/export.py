"""`python -m ti_flax.export`: the command line of `ti_flax.export` (the same as `ti-flax-export`).

The function and its flags live in commands/export.py. Run this module with `python -m`; do not import it:
importing a submodule makes it the package's attribute of that name, in place of the function
`ti_flax.export`.
"""

if __name__ == "__main__":
    import sys

    from ti_flax.commands.export import main

    sys.exit(main())
