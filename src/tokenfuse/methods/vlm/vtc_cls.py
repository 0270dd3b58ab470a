"""VTC-CLS (Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs", 2024;
reference code THU-MIG/VTC-CLS).

Faithful: each visual token is scored by the tower's [CLS] attention to it (mean over heads), summed
over an ensemble of tower layers, from `start_layer` up to the selected layer, and each image keeps its
top tokens in patch order; the rest are dropped. The default, the last 7 layers, is the reference's
default start layer 16 on LLaVA-1.5's CLIP ViT-L/14 (layers 16 to 22, its selected layer). Deviations:
the layer mean here ranks as the reference's sum; ties go to the earlier token (the reference's topk
leaves them unspecified). The reference's CLI takes the start layer as an absolute index; here a
negative one counts back from the selected layer, so the default carries to towers of other depths.

Why the defaults: keep 0.25 as the other operators; start_layer -7 is the reference's own default
on LLaVA-1.5's tower.
"""

from __future__ import annotations

from ...core import Reduction
from ..options import Option
from ..registry import register
from .base import VisualInput, VisualMethod, prune_to, top_keep


@register
class VTCCLS(VisualMethod):
    name = "vtc-cls"
    paper = (
        "Wang et al. 2024, [CLS] Token Tells Everything Needed for Training-free Efficient MLLMs (VTC-CLS)"
    )
    placement = "boundary"
    prunes = True
    needs = frozenset({"cls_attention_layers"})

    #: the first tower layer of the ensemble (0 = the first layer; negative counts back, -1 = the
    #: selected layer alone); every layer from it to the selected one is averaged
    start_layer: int = Option(-7, "the ensemble's first tower layer; negative counts back")

    def check(self, tower_layers: int) -> None:
        if not -tower_layers <= self.start_layer < tower_layers:
            raise ValueError(
                f"vtc-cls: start_layer {self.start_layer} is outside the tower's {tower_layers} layers up to "
                f"the selected one; choose one in [-{tower_layers}, {tower_layers - 1}]"
            )

    def decide(self, inp: VisualInput) -> Reduction:
        self.check(inp.cls_attention_layers.shape[1])
        score = inp.cls_attention_layers[:, self.start_layer :].float().mean(1)
        return prune_to(top_keep(score, inp), inp)
