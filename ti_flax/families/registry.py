"""The registered model families, in the order messages list them."""

from . import flux, sd1, sd2, sdxl

FAMILIES = (sd1.FAMILY, sd2.FAMILY, sdxl.FAMILY, flux.FAMILY)
# Every family's file flags (ModelFamily.file_flags): what families.load_model's `separate` takes.
FILE_FLAGS = tuple(dict.fromkeys(name for family in FAMILIES for name in family.file_flags))
_BY_NAME = {family.name: family for family in FAMILIES}


def get(name):
    """The family registered as `name` ("sd1", "sd2", "sdxl"); KeyError naming the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no model family {name!r}; known: {', '.join(_BY_NAME)}") from None


def of(spec):
    """The family of a models.ModelSpec."""
    return get(spec.family)
