"""The method zoo. Importing this package registers every built-in method."""

from . import random_merge, tome  # noqa: F401  (registration)
from .base import LayerInput, Method
from .registry import available, make, register

__all__ = ["LayerInput", "Method", "available", "make", "register"]
