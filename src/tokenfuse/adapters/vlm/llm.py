"""The in-LLM stage: the hidden states entering decoder layer K are reduced by the in-LLM operator,
and every later layer gets the matching mask, rotary angles and position ids (kept tokens keep their
positions). The operator scores with layer K - 1's own projections and rotary embedding, computed
for the rows it needs only, so the host's SDPA attention stays on.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...core import Tokens, reduce
from ...core.tokens import take_along
from ...methods import VisualInput, VisualMethod
from ..engine import ahead, pairs_at
from .decode import Stage, host_format
from .state import Pass, rows

if TYPE_CHECKING:
    from . import VlmPatch


class InLLM:
    """The in-LLM stage of `patch`, with its operator `method` (None: no in-LLM reduction; the layer
    hooks still serve decoding steps after it)."""

    def __init__(self, patch: VlmPatch, method: VisualMethod | None):
        self.patch = patch
        self.method = method
        self.stages = [] if method is None else method.stages()
        self.layers = patch.inner.get_submodule(patch.family.layers)
        n = len(self.layers)
        if any(not 1 <= k < n for k, _ in self.stages):
            raise ValueError(
                f"{method.name}: layer must be in 1..{n - 1} for this {n}-layer LLM, got "
                f"{[k for k, _ in self.stages]}"
            )

    def install(self, decode_layer) -> None:
        """Hooks on the scoring attentions and on every layer from the first stage on; a decoding
        step's layers are handed to `decode_layer`."""
        self.decode_layer = decode_layer
        for k, _ in self.stages:
            self.patch.before(self.layers[k - 1].self_attn, self._score_input, kwargs=True)
        if self.stages:
            for i in range(self.stages[0][0], len(self.layers)):
                self.patch.before(self.layers[i], partial(self._layer, i), kwargs=True)

    def reduces(self, fwd: Pass) -> bool:
        return any(f < 1.0 for _, f in self.stages) and bool(fwd.visual0.any())

    def _score_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the attention whose queries and keys score the next stage: keep its input."""
        fwd = self.patch.current()
        if fwd is None or fwd.layout is None or fwd.stage >= len(self.stages):
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        fwd.scoring = {"module": module, "hidden": hidden, "rotary": kwargs["position_embeddings"]}

    def _layer(self, i: int, module: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook of decoder layers from the first stage on: reduce at a stage's layer, and give each
        layer the mask, rotary angles and position ids of the current layout."""
        fwd = self.patch.current()
        if fwd is None:
            return None
        if fwd.layout is None:  # a decoding step
            return None if fwd.record is None else self.decode_layer(fwd, i, args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if fwd.stage < len(self.stages) and self.stages[fwd.stage][0] == i:
            hidden = self._reduce(fwd, i, hidden, kwargs)
        if fwd.layout.call is None:
            return None
        args = (hidden, *args[1:]) if args else ()
        new = {**kwargs, **fwd.layout.call}
        if not args:
            new["hidden_states"] = hidden
        return args, new

    def _reduce(self, fwd: Pass, layer: int, hidden: Tensor, kwargs: dict) -> Tensor:
        fraction = self.stages[fwd.stage][1]
        fwd.stage += 1
        layout = fwd.layout
        keep = self.method.counts(fwd.visual0, fraction)
        keep = torch.minimum(keep, (layout.visual & layout.valid).sum(1))
        if not bool((keep < layout.visual.sum(1)).any()):
            return hidden
        tokens = Tokens.start(layout.valid, layout.valid & ~layout.visual, track_origin=True)
        inp = VisualInput(
            x=hidden,
            tokens=tokens,
            visual=layout.visual & layout.valid,
            keep=keep,
            layer=layer,
            **self._needs(fwd),
        )
        red = self.patch.timed(self.method.decide, inp)
        hidden, tokens = reduce(hidden, tokens, red)
        if fwd.left:  # padding back in front, so that the last position stays each row's last token
            order = ahead(~tokens.mask)
            hidden = take_along(hidden, order)
            tokens = tokens.take(order)
        self._relayout(fwd, tokens.origin, tokens.mask, kwargs)
        fwd.stages.append(Stage(layer=layer, valid=tokens.mask))
        fwd.llm_trace.append((layer, tokens.count))
        return hidden

    def _relayout(self, fwd: Pass, at: Tensor, valid: Tensor, kwargs: dict) -> None:
        """The current layout becomes the kept tokens, at positions `at` (B, L') of it (any at
        padding, which `valid` marks): gather the per-token state, and build what the following
        layers are called with."""
        base = fwd.layout.call or {
            k: kwargs.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")
        }
        fwd.layout = fwd.layout.take(at, valid)
        B = at.shape[0]
        cos, sin = (take_along(t.expand(B, *t.shape[1:]), at) for t in base["position_embeddings"])
        out = {"position_embeddings": (cos, sin)}
        if base.get("position_ids") is not None:
            out["position_ids"] = base["position_ids"].expand(B, -1).gather(1, at)
        host = base["attention_mask"]
        L = at.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=at.device).tril()
        if host is None:
            allowed = causal[None, None] & valid[:, None, None, :]
        else:
            allowed = pairs_at(host, at)
            allowed = (allowed if allowed.dtype == torch.bool else allowed == 0) & valid[:, None, None, :]
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=at.device) & ~valid[:, None, :, None]
        if host is None and bool(valid.all()):
            out["attention_mask"] = None  # no padding: the host's causal attention holds as it is
        else:
            out["attention_mask"] = host_format(allowed, host, self.patch.config.text_config)
        fwd.layout.call = out

    def _needs(self, fwd: Pass) -> dict[str, Tensor]:
        """What the operator scores with (see VisualInput), computed only when it names it."""
        needs = self.method.needs
        if not needs:
            return {}
        s = fwd.scoring
        valid = fwd.layout.valid
        L = valid.shape[1]
        position = torch.arange(L, device=valid.device)
        last = torch.where(valid, position, -1).max(1).values  # (B,)
        index, qmask = rows(fwd.layout.question)
        index = torch.cat([index, last[:, None]], 1)
        probs = attention_rows(s["module"], s["hidden"], s["rotary"], index, valid)
        out = {}
        if "text_attention" in needs:
            out["text_attention"] = torch.where(qmask[..., None], probs[:, :-1], 0.0)
            out["question_mask"] = qmask
        if "last_attention" in needs:
            out["last_attention"] = probs[:, -1]
        return out


def host_module(module: nn.Module):
    """The Python module that defines `module`'s class: its own rotary function and cache type."""
    return sys.modules[type(module).__module__]


def attention_rows(
    attn: nn.Module, hidden: Tensor, rotary: tuple[Tensor, Tensor], rows: Tensor, valid: Tensor
) -> Tensor:
    """(B, R, L) attention of the rows `rows` (B, R) to every token, mean over heads, from the layer's
    own projections and rotary embedding (the host module's functions), causal, padding masked."""
    host = host_module(attn)
    B, L, _ = hidden.shape
    d = attn.head_dim
    at = rows[..., None].expand(-1, -1, hidden.shape[-1])
    q = attn.q_proj(hidden.gather(1, at)).view(B, rows.shape[1], -1, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(B, L, -1, d).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = (t.expand(B, *t.shape[1:]) for t in rotary)
    pick = rows[..., None].expand(-1, -1, cos.shape[-1])
    q, _ = host.apply_rotary_pos_emb(q, q, cos.gather(1, pick), sin.gather(1, pick))
    _, k = host.apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    key = torch.arange(L, device=rows.device)[None, None]
    allowed = (key <= rows[..., None]) & valid[:, None, :] | (key == rows[..., None])  # a padding row: itself
    scores = scores.masked_fill(~allowed[:, None], -torch.inf)
    return torch.softmax(scores.float(), dim=-1).mean(1)
