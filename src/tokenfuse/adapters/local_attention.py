"""Rotary angles and sliding-window attention at the tokens' original positions (ModernBERT).

ModernBERT rotates queries and keys by their positions (its encoder computes one (cos, sin) per
position of the unreduced input and hands them to every layer), and its local layers attend to the
keys within `config.sliding_window` positions either side, a window the host builds from the slots
of the unreduced input. Once tokens are reduced, slots are no longer positions: each token is given
the host's own (cos, sin) gathered at its original position (`Tokens.origin`), and a local layer's
mask lets a query see a key when their original positions are within the window, whatever slots they
sit in now. A merged token takes the position of the token whose slot survives (as MPNet's bias
does, see `hf_text.TextPatch`): its angle and its window are that token's, never a mean that two
tokens could share or that none of them held; the tokens merged into it reach the queries near
their own position only through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.tokens import take_along

#: config.layer_types' name for a layer of windowed attention (transformers 5.x)
LOCAL = "sliding_attention"


def local_windows(config, num_layers: int) -> list[int | None]:
    """Per layer, how many positions either side its attention reaches (inclusive), or None for
    global attention."""
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    return [config.sliding_window if kind == LOCAL else None for kind in kinds]


def rotary_at(host: tuple[Tensor, Tensor], origin: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The host's rotary (cos, sin), each (B|1, width, D) for the unreduced input's positions,
    gathered at the original positions origin (B, M): each (B, M, D)."""
    if not isinstance(host, tuple | list) or any(t.dim() != 3 or t.shape[1] != width for t in host):
        shapes = [tuple(t.shape) for t in host] if isinstance(host, tuple | list) else type(host).__name__
        raise ValueError(
            f"the rotary embeddings this encoder hands its layers are {shapes}, and tokenfuse reads a "
            f"(cos, sin) pair of shape (batch, {width}, head_dim) for {width} tokens: this transformers "
            "version lays out its encoders differently from the one tokenfuse was tested with (5.x)"
        )
    B = origin.shape[0]
    cos, sin = (take_along(t.expand(B, -1, -1), origin) for t in host)
    return cos, sin


def rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """(B, H, N, D) queries or keys rotated by the angles (cos, sin), each (B|1, N, D), computed in
    float32 as the host's attention computes them."""
    cos, sin, t32 = cos[:, None].float(), sin[:, None].float(), t.float()
    half = t.shape[-1] // 2
    turned = torch.cat((-t32[..., half:], t32[..., :half]), dim=-1)
    return (t32 * cos + turned * sin).to(t.dtype)


def window_bias(bias: Tensor, origin: Tensor, reach: int) -> Tensor:
    """(B, 1, M, M) the engine's attention bias (B, 1, 1, M) with, in addition, every key further
    than `reach` original positions from the query masked (the dtype's minimum, never added to the
    bias, so that no row overflows to -inf). origin: (B, M) the tokens' original positions."""
    at = origin.to(torch.int32)  # half the memory of int64 over M x M pairs, built at every reduction
    far = (at[:, :, None] - at[:, None, :]).abs_() > reach
    return torch.where(far[:, None], torch.finfo(bias.dtype).min, bias)
