"""`python -m ti_flax.plan`: the command line of `ti_flax.plan` (the same as `ti-flax-plan`).

The function and its flags live in commands/plan.py. Run this module with `python -m`; do not import it:
importing a submodule makes it the package's attribute of that name, in place of the function
`ti_flax.plan`.
"""

if __name__ == "__main__":
    import sys

    from ti_flax.commands.plan import main

    sys.exit(main())
