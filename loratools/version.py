"""The version of loratools: a leaf module, so that nothing inside the package imports its root for it."""

__version__ = "0.1.0"
