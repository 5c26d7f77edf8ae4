"""Reading embeddings, under the name earlier versions of ti_flax used: all of it lives in
`ti_flax.formats` now (`read_embedding`, `check_embedding_fits`, `Embedding`)."""

from .formats import Embedding, check_embedding_fits, read_embedding

__all__ = ["Embedding", "check_embedding_fits", "read_embedding"]
