"""tokenfuse: training-free token reduction for pretrained transformers."""

from .api import apply, last_tokens, patch_of, remove, to_grid, token_sizes
from .engine import Reduction, Tokens, attention_bias, pool_mean, reduce, unmerge
from .methods import LayerInput, Method, available, register
from .text import embed

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
