"""Expedite: Liang, Yuan, Ding, Luo, Lin, Jia, Zhang, Zhang and Hu, "Expediting Large-Scale Vision
Transformer for Dense Prediction without Fine-tuning", NeurIPS 2022.

Dense models need every position back at the end. After layer alpha the patch tokens are clustered
into an h x w grid of clusters, the remaining layers run on the clusters, and a reconstruction
rebuilds every position from them. Faithful, to the authors' code (Expedit-Segmenter,
mmseg/ops/cluster.py and reconstruction.py; tests/test_method_expedite.py compares with it):
  - centres start as the adaptive average pool of the token grid to h x w; each of `iterations`
    rounds of soft k-means gives every token softmax(-cluster_temperature * squared distance) over the
    clusters within `window` cells of its own (its cell: the cluster grid resized to the token grid,
    nearest), and moves each centre to the affinity-weighted mean of its tokens;
  - the temperature multiplies the squared distance, as the code does (a detail the paper leaves out);
  - [CLS], distillation and register tokens are kept whole, out of the clusters;
  - the reconstruction weights go from each token at alpha to the final centres at alpha:
    exp(-rebuild_temperature * squared distance), the `k` largest kept (ties at the k-th kept
    too), L2-normalised as the code does (not summed to 1); they are applied to the clusters a
    layer puts out (`tokenfuse.to_grid`, hidden states), wherever sources are tracked.
  - defaults: the code's Segmenter ViT-L/16 configuration on ADE20K (640 px, 40 x 40 patches): after
    layer 10 of 24, 28 x 28 clusters, 5 rounds, window 5, temperature 0.02, k 20 at 0.02.
Deviations: tokenfuse reduces between a layer's attention and its MLP, so the clusters are made from
the stream after layer alpha's attention and layer alpha's MLP runs on them (the code clusters
after the whole layer). alpha defaults to the same share of the model's depth (10 / 24, rounded).
The cluster count follows the budget: `keep` (default: the work of the paper's ViT-L setting) gives
the share of tokens after alpha; the cluster grid is the one of the image's aspect with at most
that many cells (or a fixed `grid`, as the paper sets it). The last round's affinities are the
reduction's shares, so the engine's size-weighted average gives the last round's centres
(tokens at alpha stand for one input token each). Centres the code would leave at zero (a
cluster no token joins) do not survive here. A batch holds images of one size (one pixel tensor),
each image clustered on its own.

Why the defaults: they are the authors' own Segmenter ViT-L/16 setting, with alpha and the budget
scaled to the model's depth, so that a user gets what the paper ran unless they choose otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import Reduction
from ..core import schedule as sched
from .base import LayerInput, Method
from .options import Option
from .registry import register

#: the code's Segmenter ViT-L/16 setting: clustering after layer 10 of 24, 28 x 28 of 40 x 40 patches
PAPER_LAYERS, PAPER_ALPHA, PAPER_SHARE = 24, 10, 28 * 28 / (40 * 40)


def _after(alpha: int, num_layers: int, share: float) -> list[float]:
    """The schedule: every token kept before point alpha, `share` of them from there on."""
    return [1.0] * alpha + [share] * (num_layers + 1 - alpha)


PAPER_KEEP = sched.work(_after(PAPER_ALPHA, PAPER_LAYERS, PAPER_SHARE))


def square_distances(a: Tensor, b: Tensor) -> Tensor:
    """(B, N, C), (B, M, C) -> (B, N, M) squared Euclidean distances, expanded as the code does."""
    return (a * a).sum(-1)[..., None] + (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)


def cluster(
    x: Tensor, grid: tuple[int, int], cells: tuple[int, int], iterations: int, temperature: float, window: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Soft k-means of patch tokens x (B, h*w, C), row-major on `grid`, into `cells` (gh, gw) clusters.

    Returns the centres (B, gh*gw, C) after the last round, and for each token the clusters it may
    join, index (h*w, K) (-1 off the grid; K = window**2), with the last round's affinities
    (B, h*w, K), which sum to 1 over each token's window."""
    (h, w), (gh, gw) = grid, cells
    B, M, C = x.shape
    centres = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(B, C, h, w), cells).flatten(2).transpose(1, 2)
    labels = torch.arange(gh * gw, device=x.device, dtype=x.dtype).view(1, 1, gh, gw)
    own = F.interpolate(labels, size=grid, mode="nearest").flatten().long()  # (h*w,) each token's cell
    r = torch.arange(window, device=x.device) - window // 2
    rows = (own // gw)[:, None, None] + r[None, :, None]
    cols = (own % gw)[:, None, None] + r[None, None, :]
    inside = ((rows >= 0) & (rows < gh) & (cols >= 0) & (cols < gw)).flatten(1)
    index = torch.where(inside, (rows * gw + cols).flatten(1), -1)  # (h*w, K)
    at = index.clamp_min(0).expand(B, -1, -1)
    for _ in range(iterations):
        near = square_distances(x, centres).gather(2, at)
        affinity = (-temperature * near).masked_fill(~inside, -torch.inf).softmax(-1)  # (B, h*w, K)
        dense = x.new_zeros(B, M, gh * gw).scatter_add_(2, at, affinity)
        centres = dense.transpose(1, 2) @ x / dense.sum(1)[..., None].clamp_min(1e-16)
    return centres, index, affinity


def reconstruction(x: Tensor, centres: Tensor, k: int, temperature: float) -> Tensor:
    """(B, M, C) tokens, (B, G, C) centres -> (B, M, G) the weights rebuilding each token from the
    centres: exp(-temperature * squared distance), all but the k largest (and ties) zeroed,
    L2-normalised over the centres, as the code does."""
    weight = torch.exp(-temperature * square_distances(x, centres))
    kth = weight.topk(min(k, weight.shape[-1]), dim=-1).values[..., -1:]
    return F.normalize(torch.where(weight >= kth, weight, 0.0), dim=-1)


def cells_for(grid: tuple[int, int], count: int) -> tuple[int, int]:
    """The cluster grid of the image grid's aspect with at most `count` cells (at least 1 x 1)."""
    h, w = grid
    gh = min(h, max(1, round(h * math.sqrt(max(count, 1) / (h * w)))))
    return gh, min(w, max(1, count // gh))


def slots(grid: tuple[int, int], cells: tuple[int, int]) -> Tensor:
    """(gh*gw,) the patch token whose slot each cluster takes: the one at its cell's centre. Distinct
    and row-major in both grids, so the clusters come out in cluster-grid order."""
    (h, w), (gh, gw) = grid, cells
    rows = (torch.arange(gh) * 2 + 1) * h // (2 * gh)
    cols = (torch.arange(gw) * 2 + 1) * w // (2 * gw)
    return (rows[:, None] * w + cols[None, :]).flatten()


@register
class Expedite(Method):
    name = "expedite"
    paper = (
        "Liang et al., Expediting Large-Scale Vision Transformer for Dense Prediction without "
        "Fine-tuning, NeurIPS 2022"
    )
    needs = frozenset({"hidden", "grid"})

    keep: float = Method.keep.but(PAPER_KEEP)  # the work of the paper's ViT-L setting
    alpha: int | None = Option(
        None, "the point tokens are clustered at; None: 10/24 of the depth", "[0, inf)"
    )
    grid: tuple[int, int] | None = Option(None, "a fixed cluster grid (rows, columns); None: from keep")
    iterations: int = Option(5, "soft k-means rounds", "[1, inf)")
    cluster_temperature: float = Option(0.02, "factor on the k-means squared distance", "(0, inf)")
    window: int = Option(5, "side of the window of clusters a token may join, odd", "[1, inf)")
    k: int = Option(20, "clusters each token is rebuilt from", "[1, inf)")
    rebuild_temperature: float = Option(0.02, "factor on the reconstruction's squared distance", "(0, inf)")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.window % 2 == 0:
            raise ValueError(
                f"window must be an odd whole number of cells (5: two either side), got {self.window!r}"
            )
        if self.grid is not None:
            if len(self.grid) != 2 or any(
                isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in self.grid
            ):
                raise ValueError(
                    f"grid must be two whole numbers of clusters (rows, columns), got {self.grid!r}"
                )
            if self.static:
                raise ValueError(
                    "a fixed grid sets the cluster count whatever the schedule asks, so static mode cannot "
                    "know the reduced width: give keep instead of grid, or static=False"
                )

    def point(self, num_layers: int) -> int:
        """The reduction point where tokens are clustered on a model of num_layers layers."""
        alpha = max(1, round(num_layers * PAPER_ALPHA / PAPER_LAYERS)) if self.alpha is None else self.alpha
        if alpha > num_layers:
            raise ValueError(
                f"expedite: alpha {alpha} is past the last reduction point of a {num_layers}-layer model"
            )
        return alpha

    def schedule_for(self, num_layers: int) -> list[float]:
        """Nothing removed before point alpha, then the same share of tokens to the end."""
        alpha = self.point(num_layers)
        if self.schedule is not None:
            given = sched.check_schedule(self.schedule, num_layers)
            if given != _after(alpha, num_layers, given[-1]):
                raise ValueError(
                    f"expedite clusters once, at point {alpha}: its schedule is 1.0 before that point and "
                    f"one share from there on, got {given}; give keep (and alpha) instead"
                )
            return given
        if self.keep == 1.0:
            return [1.0] * (num_layers + 1)
        least = sched.work(_after(alpha, num_layers, 0.0))
        if self.keep <= least:
            raise ValueError(
                f"expedite: keep {self.keep:.6g} is below what clustering at point {alpha} of a "
                f"{num_layers}-layer model can reach: keep must be above {least:.6g} (or lower alpha)"
            )
        _, share = sched.bracket(lambda s: sched.work(_after(alpha, num_layers, s)), self.keep, 0.0, 1.0)
        return _after(alpha, num_layers, share)

    def decide(self, inp: LayerInput) -> Reduction:
        x, tokens = inp.x, inp.tokens
        B, N, _ = x.shape
        dest = torch.arange(N, device=x.device).expand(B, N)[..., None]
        if inp.grid is None:
            if inp.point > self.point(inp.num_layers):  # static mode's later points: everything stays
                return Reduction(dest, torch.ones_like(dest, dtype=torch.float32))
            raise ValueError(
                "expedite clusters an image's patch grid, which this model's adapter did not give at "
                f"reduction point {inp.point}: apply it to a supported vision transformer"
            )
        h, w = inp.grid
        prefix = N - h * w
        count = int((tokens.count - inp.remove).min()) - prefix
        cells = (
            cells_for(inp.grid, count) if self.grid is None else (min(self.grid[0], h), min(self.grid[1], w))
        )
        patches = x[:, prefix:].float()
        centres, index, affinity = cluster(
            patches, inp.grid, cells, self.iterations, self.cluster_temperature, self.window
        )
        slot = prefix + slots(inp.grid, cells).to(x.device)
        K = index.shape[1]
        into = torch.where(index >= 0, slot[index.clamp_min(0)], -1).expand(B, -1, -1)
        kept = F.pad(dest[:, :prefix], (0, K - 1), value=-1)
        share = torch.cat(
            [F.pad(torch.ones_like(kept[..., :1], dtype=torch.float32), (0, K - 1)), affinity], 1
        )
        rebuild = None
        if tokens.source is not None:  # dense outputs wanted: bring the reconstruction
            rebuild = x.new_zeros(B, N, N, dtype=torch.float32)
            rebuild[:, :prefix, :prefix] = torch.eye(prefix, device=x.device)
            rebuild[:, prefix:, slot] = reconstruction(patches, centres, self.k, self.rebuild_temperature)
        return Reduction(torch.cat([kept, into], 1), share, rebuild=rebuild)
