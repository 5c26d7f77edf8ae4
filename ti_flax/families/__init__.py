"""Model families: what makes SD 1.x, SD 2.x and SDXL different, asked of one object per family."""

from .base import Frozen

__all__ = ["Frozen"]
