"""What reduced layers attend with: padding masked, and each key weighted by the tokens it stands for."""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import Tokens


def attention_bias(tokens: Tokens, dtype: torch.dtype, proportional: bool) -> Tensor:
    """Additive attention mask (B, 1, 1, N): padding is masked, and with proportional attention
    each key counts as many times as the tokens it stands for (log size on the logits, as in ToMe)."""
    size = tokens.size.to(dtype)
    bias = size.log() if proportional else torch.zeros_like(size)
    return bias.masked_fill(~tokens.mask, torch.finfo(dtype).min)[:, None, None, :]


def attention_probs(q: Tensor, k: Tensor, tokens: Tokens, proportional: bool) -> Tensor:
    """Attention probabilities (B, H, Nq, N) of queries over the keys of `tokens`, as the layer
    computed them (scaled dot product, padding masked, log size added when proportional)."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    logits += attention_bias(tokens, logits.dtype, proportional)
    return logits.softmax(-1)
