"""The method zoo. Importing this package imports every module in it and in `vlm`, which registers
each built-in method and visual-token operator: one method, one file, no list to keep in sync."""

import importlib
import pkgutil

from . import vlm
from .base import LayerInput, Method
from .registry import available, make, register
from .vlm import VisualInput, VisualMethod

for _package in (__name__, vlm.__name__):
    for _module in pkgutil.iter_modules(importlib.import_module(_package).__path__):
        importlib.import_module(f"{_package}.{_module.name}")

__all__ = ["LayerInput", "Method", "VisualInput", "VisualMethod", "available", "make", "register"]
