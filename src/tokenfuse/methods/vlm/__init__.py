"""Visual-token operators for vision-language models, one per file; `tokenfuse.methods` imports
every module here (registering each operator) once its registry exists."""

from .base import VisualInput, VisualMethod

__all__ = ["VisualInput", "VisualMethod"]
