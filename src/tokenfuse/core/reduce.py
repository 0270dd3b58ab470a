"""Applying a `Reduction`: one way, shared by every method and every model."""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import Reduction, Tokens


def reduce(x: Tensor, tokens: Tokens, red: Reduction, width: int | None = None) -> tuple[Tensor, Tokens]:
    """Apply a reduction to features (B, N, C) and to the token state together.

    Survivors are compacted to the front, in their current order or by `red.order`; padding
    follows, up to the longest survivor count, or to `width` where the caller knows a bound (static
    mode: nothing is read back from the tensors, a bound too small fails). A survivor's feature is
    the size-weighted (times feature_weight) average of the shares sent to it, times `red.gain`.
    """
    B, N, C = x.shape
    dest, weight = _shares(red, tokens)
    _check_protected(tokens, dest, weight, static=width is not None)
    survives, position, new_n = survivors(dest, red.order, width)
    rows = flat_rows(dest, position, new_n)
    sum_into = gather_sum(rows, B * new_n)

    mass = weight * tokens.size[..., None]
    size = sum_into(mass).view(B, new_n)
    # each share's weight in its destination's average, so that one pass over the features sums
    # the averages (no division of the result): the sizes, or the sizes times feature_weight
    fmass = mass if red.feature_weight is None else mass * red.feature_weight[..., None]
    total = size if red.feature_weight is None else sum_into(fmass).view(B, new_n)
    at_dest = torch.cat([total.flatten(), total.new_ones(1)])[rows].view_as(fmass)
    share = (fmass / at_dest.clamp_min(torch.finfo(at_dest.dtype).tiny)).to(x.dtype)
    values = x[:, :, None, :] * share[..., None] if dest.shape[-1] > 1 else x * share
    out = sum_into(values).view(B, new_n, C)

    slot = torch.where(survives, position, new_n)  # each token's place in the result; new_n: gone

    def placed(t: Tensor) -> Tensor:
        """A per-token state (B, N) at its token's place in the result (B, new_n), 0 at padding."""
        return t.new_zeros(B, new_n + 1).scatter_(1, slot, t)[:, :new_n]

    if red.gain is not None:
        out = out * placed(red.gain.to(out.dtype))[..., None]
    source = None
    if tokens.source is not None:
        shares = tokens.source[:, :, None, :] * weight[..., None].to(tokens.source.dtype)
        source = sum_into(shares).view(B, new_n, -1)
    origin = None if tokens.origin is None else placed(tokens.origin)
    rebuild = _rebuild(tokens, red, dest, weight, position, slot, new_n)
    return out, Tokens(
        size=size, protected=placed(tokens.protected), source=source, origin=origin, rebuild=rebuild
    )


def _rebuild(
    tokens: Tokens, red: Reduction, dest: Tensor, weight: Tensor, position: Tensor, slot: Tensor, new_n: int
) -> Tensor | None:
    """The weights rebuilding each starting position from the result (`Tokens.rebuild`): the
    reduction's own, its columns moved to the survivors' places; after one that brought them, a
    reduction without its own rebuilds each token from where its shares went. Composed with the
    earlier ones; None while no reduction brought any."""
    if red.rebuild is None and tokens.rebuild is None:
        return None
    if red.rebuild is None:
        at = position.gather(1, dest.clamp_min(0).flatten(1)).view_as(dest)
        index, values = torch.where(dest >= 0, at, new_n), weight
    else:
        index, values = slot[:, None, :].expand(red.rebuild.shape), red.rebuild.float()
    step = values.new_zeros(*index.shape[:2], new_n + 1).scatter_add_(2, index, values)[..., :new_n]
    return step if tokens.rebuild is None else tokens.rebuild @ step


def _shares(red: Reduction, tokens: Tokens) -> tuple[Tensor, Tensor]:
    """The reduction's destinations and shares, padding's shares dropped: padding never moves into
    a real token."""
    weight = red.weight * tokens.mask[..., None]
    return red.dest.masked_fill(weight <= 0, -1), weight


def survivors(
    dest: Tensor, order: Tensor | None = None, width: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """dest (B, N, K), optional sort key order (B, N) -> which tokens receive a share (B, N), each
    survivor's new position (B, N) when survivors are compacted in their current order (or by
    increasing key, ties in current order), and the width of the result: the longest survivor count
    (one host sync), or `width`, checked on the device, where the caller gives one."""
    B, N, _ = dest.shape
    survives = torch.zeros(B, N + 1, dtype=torch.bool, device=dest.device)
    survives.scatter_(1, (dest + 1).flatten(1), True)
    survives = survives[:, 1:]
    if width is None:
        new_n = int(survives.sum(1).max())
    else:
        new_n = width
        torch._assert_async(
            (survives.sum(1) <= width).all(),
            "static mode: a sequence kept more tokens than its batch's static width, because the method "
            "removed fewer than its schedule asks; apply it with static=False",
        )
    if order is None:
        return survives, survives.cumsum(1) - 1, new_n
    if order.shape != (B, N):
        raise ValueError(f"a reduction's order must be one key per token, {(B, N)}, got {tuple(order.shape)}")
    # survivors ahead of each token in key order; a non-survivor's position is never used
    by_key = order.argsort(dim=1, stable=True)
    ahead = survives.gather(1, by_key).cumsum(1) - 1
    return survives, torch.empty_like(ahead).scatter_(1, by_key, ahead), new_n


def flat_rows(dest: Tensor, position: Tensor, new_n: int) -> Tensor:
    """(B * N * K,) row of each share in a flat (B * new_n + 1) buffer; a dropped share goes to the
    last row, which is thrown away."""
    B = dest.shape[0]
    rows = position.gather(1, dest.clamp_min(0).flatten(1)).view_as(dest)
    rows = rows + torch.arange(B, device=dest.device)[:, None, None] * new_n
    return torch.where(dest >= 0, rows, B * new_n).flatten()


def gather_sum(rows: Tensor, out_rows: int):
    """The sum of per-share values (B, N, K, ...) into their destination rows (out_rows, ...)."""

    def sum_into(values: Tensor) -> Tensor:
        flat = values.reshape(rows.shape[0], -1)
        return flat.new_zeros(out_rows + 1, flat.shape[1]).index_add_(0, rows, flat)[:-1]

    return sum_into


def _check_protected(tokens: Tokens, dest: Tensor, weight: Tensor, static: bool = False) -> None:
    """A method that merges or drops a protected token, or merges into one, is a bug: fail loudly
    (static: checked on the device, without reading anything back)."""
    if not static and not tokens.protected.any():
        return
    own = torch.arange(dest.shape[1], device=dest.device)[None, :, None]
    moved = (dest != own) & (dest >= 0) & (weight > 0)
    kept_whole = (dest[..., 0] == own[..., 0]) & (weight[..., 0] == 1) & (weight[..., 1:] == 0).all(-1)
    into = torch.zeros_like(tokens.size).scatter_add_(
        1, dest.clamp_min(0).flatten(1), moved.flatten(1).float()
    )
    touched = (tokens.protected & (~kept_whole | (into > 0))).any()
    message = "a reduction touched a protected token; methods must leave them alone"
    if static:
        torch._assert_async(~touched, message)
    elif touched:
        raise RuntimeError(message)
