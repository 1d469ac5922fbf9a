"""ctsearch: content-based image retrieval of CT slices.

Importing ctsearch (or any module outside ``ctsearch.jobs``) never imports Ray.
"""

__version__ = "0.1.0"

from ctsearch.errors import CTSearchInputError

__all__ = ["CTSearchInputError", "__version__"]
