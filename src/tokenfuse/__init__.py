"""tokenfuse: training-free token reduction for pretrained transformers.

Layers, each importing only those below it (CI checks it): core (token state, reductions, matching,
schedules, configuration files; torch alone) < methods < adapters < api < assets < eval < cli.
"""

from .api import apply, embed, export_onnx, kept, last_tokens, patch_of, remove, to_grid, token_sizes
from .core import Reduction, Tokens, attention_bias, pool_mean, reduce, unmerge
from .methods import LayerInput, Method, available, register

__version__ = "0.1.0"

__all__ = [
    "LayerInput",
    "Method",
    "Reduction",
    "Tokens",
    "apply",
    "attention_bias",
    "available",
    "embed",
    "export_onnx",
    "kept",
    "last_tokens",
    "patch_of",
    "pool_mean",
    "reduce",
    "to_grid",
    "register",
    "remove",
    "token_sizes",
    "unmerge",
]
