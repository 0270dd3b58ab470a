"""AIM (Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
ICCV 2025; reference code LaVi-Lab/AIM), as two operators that combine: "aim" merges before the LLM,
"aim-prune" prunes inside it.

"aim", faithful: ToMe's bipartite matching repeated until each image has its count: every round
splits the current tokens alternately, matches each A-token to its most cosine-similar B-token, and
merges the best-matched pairs, at most half the tokens a round (the reference's 576 -> 288 -> 144);
similarity on the projector's output (the LLM's input space), as the reference merges after the
projector. Deviations: the merged features are the size-weighted average of the tower features before
the projector (the reference averages projected features, with a plain mean of each destination and
its sources); the next round matches on the size-weighted mean of the projected features; survivors
keep their order (the reference lays out the unmerged A-tokens by score, then the B-tokens).

"aim-prune", faithful: the paper's piecewise-linear schedule. The layers before `layer` see every
visual token; from `layer` the kept fraction falls linearly, layer by layer, to `keep` at `end` and
stays there; each stage keeps the visual tokens of highest importance at that layer, text tokens
never pruned. The reference's schedule on its 28-layer Qwen2 (reduced from layer 15, no visual token
left from layer 22) is scaled to the 30-layer LLM here: defaults `layer` 16, `end` 24. Deviations: the
paper prunes every visual token from `end` on; the engine keeps at least one per image, so `keep`
(the floor, default one of LLaVA's 576) stands for the paper's 0. Importance is the attention the
question tokens pay each token, mean over heads and over question tokens; the reference runs
PageRank (five iterations, temperature 0.1, RMS over heads) over the layer's whole attention map,
which the SDPA host never materialises; the mean over question rows is one step of that walk
restricted to the text queries.

Why the defaults: "aim" keeps 0.25, the reference's 576 -> 144 after two rounds; "aim-prune"'s
schedule is the reference's, scaled to the LLM's depth.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...core import Reduction, Tokens, reduce
from ...core.matching import alternate_scores, bipartite_merge
from ...core.reduce import survivors
from ..options import Option
from ..registry import register
from .base import VisualInput, VisualMethod, prune_to, question_attention, top_keep


@register
class Aim(VisualMethod):
    name = "aim"
    paper = "Zhong et al. 2024, AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning"
    placement = "boundary"
    needs = frozenset({"projected"})

    def decide(self, inp: VisualInput) -> Reduction:
        """Merge rounds on the compacted tokens, tracking for each original token the current position
        of the token it went into (`where`) and for each current token the original slot it sits in."""
        tokens = Tokens(size=inp.tokens.size, protected=inp.tokens.mask & ~inp.visual)
        metric = inp.projected
        B, N = inp.visual.shape
        own = torch.arange(N, device=metric.device).expand(B, N)
        where, slot = own.clone(), own.clone()
        while True:
            movable = (tokens.mask & ~tokens.protected).sum(1)
            remove = torch.minimum(movable - inp.keep, movable // 2).clamp_min(0)
            if not bool(remove.any()):
                break
            red = bipartite_merge(alternate_scores(F.normalize(metric, dim=-1)), tokens, remove)
            dest = red.dest[..., 0].masked_fill(~tokens.mask, -1)  # as `reduce` sees it
            survives, position, new_n = survivors(dest[..., None])
            moved = position.gather(1, dest.clamp_min(0)).clamp_min(0)  # padding: anywhere, masked below
            where = moved.gather(1, where)
            spot = torch.where(survives, position, new_n)
            slot = slot.new_full((B, new_n + 1), -1).scatter_(1, spot, slot)[:, :new_n]
            metric, tokens = reduce(metric, tokens, red)
        return Reduction.hard(torch.where(inp.tokens.mask, slot.gather(1, where), -1))


@register
class AimPrune(VisualMethod):
    name = "aim-prune"
    paper = "Zhong et al. 2024, AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning"
    placement = "llm"
    prunes = True
    needs = frozenset({"text_attention"})

    keep: float = VisualMethod.keep.but(1 / 576)  # one of LLaVA's 576: the paper's 0, at least one
    layer: int = Option(16, "the LLM layer entered reduced", "[1, inf)")
    end: int = Option(24, "the layer from which only keep of them are left", "[1, inf)")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.end < self.layer:
            raise ValueError(f"aim-prune: end must be an int >= layer ({self.layer}), got {self.end!r}")

    def stages(self) -> list[tuple[int, float]]:
        steps = self.end - self.layer + 1
        return [
            (layer, 1 - (1 - self.keep) * (i + 1) / steps)
            for i, layer in enumerate(range(self.layer, self.end + 1))
        ]

    def decide(self, inp: VisualInput) -> Reduction:
        return prune_to(top_keep(question_attention(inp), inp), inp)
