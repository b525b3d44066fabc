"""spleenkit: a Jupyter-first teaching and reproducibility kit for 3D spleen segmentation in CT.

Importing the package is cheap on purpose: the heavy libraries (torch, MONAI) are imported by
the modules that need them, so that ``spleenkit --help`` starts fast.
"""

from spleenkit.errors import BadInputError, SpleenkitError

__version__ = "0.1.0"

__all__ = ["BadInputError", "SpleenkitError", "__version__"]
