"""What a method is: a rule that, given one layer's tokens, decides a `Reduction`. Nothing more."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..core import Reduction, Tokens, attention_probs
from ..core import schedule as sched
from .options import Option, declared, resolve


@dataclass(frozen=True)
class LayerInput:
    """What a method sees at one reduction point (tokenfuse.core.schedule): after the embeddings
    (point 0), or between layer l's attention and its MLP (point l + 1).

    x: (B, N, C) hidden states about to be reduced. tokens: their sizes, padding, protected set.
    remove: (B,) how many tokens each sequence should lose here; a method may remove fewer
    (bipartite matching caps at about half). q, k, v: (B, H, N, D) the layer's per-head queries,
    keys and values, present after an attention when the method needs attention inputs (never at
    point 0). The accessors below derive what methods score with, computing only that: the [CLS]
    row of attention costs O(N), the full map O(N^2), as much as the attention itself.
    grid: (h, w) the image's patch grid while no token was reduced: the last h * w tokens of every
    row are its patches, row-major, after the protected [CLS] and registers; None for inputs that
    are no image (text) and once tokens were reduced.
    """

    point: int
    x: Tensor
    tokens: Tokens
    remove: Tensor
    num_layers: int = 1
    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    prop_attn: bool = True
    has_cls: bool = True
    grid: tuple[int, int] | None = None

    def qkv(self) -> tuple[Tensor, Tensor, Tensor]:
        """The layer's per-head queries, keys and values, or a clear error where there are none."""
        if self.k is None:
            raise ValueError(
                f"no attention at reduction point {self.point}: declare attention inputs in the method's "
                "`needs` (they exist only after a layer's attention, not at the embeddings)"
            )
        return self.q, self.k, self.v

    def keys(self) -> Tensor:
        """(B, N, D) attention keys averaged over heads (ToMe's matching metric)."""
        return self.qkv()[1].mean(1)

    def cls_attention(self) -> Tensor:
        """(B, N) attention of the [CLS] query to every token, averaged over heads."""
        if not self.has_cls:
            raise ValueError("this model has no [CLS] token; use a method that does not score by it")
        q, k, _ = self.qkv()
        return attention_probs(q[:, :, :1], k, self.tokens, self.prop_attn)[:, :, 0].mean(1)

    def attention(self) -> Tensor:
        """(B, H, N, N) the layer's attention probabilities, per head."""
        q, k, _ = self.qkv()
        return attention_probs(q, k, self.tokens, self.prop_attn)

    def value_norms(self) -> Tensor:
        """(B, N) norm of each token's value vector (all heads together)."""
        v = self.qkv()[2]
        return v.transpose(1, 2).flatten(2).norm(dim=-1)


class Method:
    """Base class. Subclasses set `name`, `paper`, `needs` and implement `decide`."""

    name: ClassVar[str]
    paper: ClassVar[str]
    #: what `decide` reads, shown by `tokenfuse methods`: "hidden" (the states being reduced),
    #: attention inputs: "keys", "cls_attention", "attention", "values", or "grid" (the image's patch
    #: grid, `LayerInput.grid`: vision models only)
    needs: frozenset[str] = frozenset()
    #: True for methods that drop tokens (their sizes no longer add up to the input length)
    prunes: ClassVar[bool] = False
    #: True for methods that remove a per-input number of tokens, at least what the schedule asks;
    #: they must leave a sequence whole when its `remove` is 0 (the adapter skips a point only when
    #: no sequence of the batch has anything to remove, so anything else breaks padding invariance)
    adaptive: ClassVar[bool] = False
    #: the largest share of the tokens entering a reduction point that `decide` can remove there:
    #: 0.5 for bipartite matching (at most one token per A-token). The default schedule never asks
    #: for more, and a budget below what it allows is refused (core.schedule.least_work)
    max_removal: float = 1.0
    #: inputs that exist only after a layer's attention, so not at the embeddings
    ATTENTION_INPUTS = frozenset({"keys", "cls_attention", "attention", "values"})

    keep: float = Option(0.5, "the fraction of token-layer work kept", "(0, 1]")
    schedule: Sequence[float] | None = Option(None, "fraction of tokens left after each reduction point")
    prop_attn: bool = Option(True, "proportional attention: log size added to the attention logits")
    track_source: bool = Option(False, "track which input tokens each token holds", decides=False)
    static: bool = Option(False, "reduced widths known from the padded length alone", decides=False)
    min_tokens: int | None = Option(None, "no point takes a sequence below this many tokens", "[0, inf)")

    def __init__(self, **options: Any) -> None:
        """Options as declared above (`tokenfuse methods` lists every method's). keep: 0.5 unless a
        schedule is given (keep=None: the same). schedule: the fraction of tokens left after each
        reduction point (core.schedule); it fixes the work, so a keep beside it must equal that
        work. static: lay every reduced batch out at a width known from its padded length alone
        (ceil(length * the schedule's fraction), plus the tokens every sequence protects, at most
        the length), so that the engine reads nothing back from the tensors (torch.compile,
        export); each sequence is reduced as without it, the same up to padding columns.
        min_tokens: no reduction point takes a sequence below this many real tokens (shorter ones
        keep all theirs), since short inputs lose most by merging and gain least; None: the
        adapter's default (text encoders: `adapters.hf_text.MIN_TOKENS`, images: 0), 0: no floor."""
        if options.get("keep", 0) is None:
            del options["keep"]
        given = "keep" in options
        if given:
            sched.check_keep(options["keep"])  # its own message: what a keep is, with an example
        for name, value in resolve(type(self), options).items():
            setattr(self, name, value)
        if self.schedule is not None:
            self.schedule = sched.check_fractions(self.schedule)
            work = sched.work(self.schedule)
            if given and abs(self.keep - work) > sched.WORK_TOLERANCE:
                raise ValueError(
                    f"keep {self.keep} was given beside a schedule whose work is {work:.6g}: a schedule "
                    "fixes the work, so give one of them (the keep for a constant-ratio schedule)"
                )
            self.keep = work
        if self.static and self.adaptive:
            raise ValueError(
                f"{self.name} removes a number of tokens that depends on each input, so its reduced "
                "width is not known in advance: static=True needs a method that follows the schedule"
            )

    def schedule_for(self, num_layers: int) -> list[float]:
        """Fraction of original tokens left after each of the num_layers + 1 reduction points."""
        at_embeddings = not (self.needs & self.ATTENTION_INPUTS)
        schedule = None if self.schedule is None else sched.check_schedule(self.schedule, num_layers)
        try:
            sched.check_reach(self.keep, num_layers, at_embeddings, self.max_removal)
        except ValueError as err:
            given = "" if schedule is None else " (the given schedule's work)"
            raise ValueError(f"{self.name}{given}: {err}") from None
        if schedule is None:
            schedule = sched.geometric(self.keep, num_layers, at_embeddings, self.max_removal)
        return schedule

    def decide(self, inp: LayerInput) -> Reduction:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The settings that define this method instance, every declared option (recorded in results)."""
        return {name: getattr(self, name) for name in declared(type(self))}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if v is not None)
        return f"{type(self).__name__}({opts})"
