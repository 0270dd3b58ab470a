"""The method zoo. Importing this package imports every module in it, which registers each
built-in method: one method, one file, no list to keep in sync."""

import importlib
import pkgutil

from .base import LayerInput, Method
from .registry import available, make, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LayerInput", "Method", "available", "make", "register"]
