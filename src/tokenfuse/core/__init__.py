"""The core: token state, the reduction format and its one application, matching, schedules and
configuration files. Imports torch alone."""

from .attention import attention_bias, attention_probs
from .pooling import pool_mean, unmerge
from .reduce import reduce
from .tokens import Reduction, Tokens

__all__ = ["Reduction", "Tokens", "attention_bias", "attention_probs", "pool_mean", "reduce", "unmerge"]
