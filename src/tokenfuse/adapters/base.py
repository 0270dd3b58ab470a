"""The names adapters imported from here before the engine and the hook plumbing got files of their
own: the engine (`Forward`, `Patch` and its `reduce_at`, padding and per-pair gathers) is in `engine`,
the hooks, per-thread slots, timers and call-argument helpers in `hooks`. Import from those; this
module keeps the older imports working while adapters move to them.
"""

from .engine import Forward, Patch, ahead, check_attention, left_padded, pairs_at, right_padded
from .hooks import Hooks, argument, first, replace_first, with_argument, with_mask

__all__ = [
    "Forward",
    "Hooks",
    "Patch",
    "ahead",
    "argument",
    "check_attention",
    "first",
    "left_padded",
    "pairs_at",
    "replace_first",
    "right_padded",
    "with_argument",
    "with_mask",
]
