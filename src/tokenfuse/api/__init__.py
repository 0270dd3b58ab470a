"""The public API: apply a method to a model, remove it, read the reduced tokens, embed texts."""

from .onnx import export_onnx
from .patching import apply, kept, last_tokens, patch_of, remove, to_grid, token_sizes
from .text import embed

__all__ = [
    "apply",
    "embed",
    "export_onnx",
    "kept",
    "last_tokens",
    "patch_of",
    "remove",
    "to_grid",
    "token_sizes",
]
