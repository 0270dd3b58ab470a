"""Hugging Face text encoders (BERT family, MPNet, ModernBERT).

The adapter adds hooks and never replaces a forward: the host model's own attention, norms,
residuals and dropout run unchanged, so a new transformers release cannot silently lose a piece of
the computation. The hooks:
  - before the embeddings: open this pass's own state (see `hooks`), note tokens protected by id;
    hooks inside the model fire even when `model.forward(...)` is called directly;
  - before the first layer: read the padding mask from the attention mask the host hands it (the
    host builds it after the embeddings), protect the first and last real token ([CLS], [SEP],
    wherever padding sits), and reduce at point 0 (the embeddings' output);
  - after each layer's attention block: let the method decide, and apply its reduction (after the
    whole layer where the attention's residual is added inside the layer's forward: ModernBERT);
  - before each layer: once tokens were reduced, hand the layer the engine's attention mask
    (padding, plus log size for proportional attention), and at the tokens' original positions
    MPNet's position bias (`TextPatch.position_bias`), ModernBERT's rotary angles and local
    windows (`local_attention`);
  - on the query, key and value projections, only for methods that read attention;
  - after the last layer: close the pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..methods import Method
from . import checks
from .engine import Forward, Patch, check_attention, pairs_at
from .hooks import argument, first, replace_first, with_argument, with_mask
from .local_attention import local_windows, rotary_at, rotate, window_bias
from .text_families import Family

#: the default floor of a text encoder's reductions (`Method.min_tokens`), chosen on MiniLM at keep 0.5
#: by scripts/length_floor.py: below 32 tokens merging costs a text most of its agreement with the full
#: model while the time it saves shrinks towards none (README, "Short texts")
MIN_TOKENS = 32


def padding_of(host: Tensor | None, x: Tensor) -> Tensor:
    """(B, N) real tokens of the hidden states x (B, N, C), read from the attention mask the host
    hands its first layer: None (nothing masked), or a (B|1, H|1, N|1, N) mask, bool (True
    attends) or additive float (0 attends, the dtype's minimum masks). A bidirectional encoder's
    padding mask gives every real query the same row: the real keys, which are also the tokens that
    attend to themselves. Any other mask (causal, custom) is refused rather than misread (while
    torch.compile traces, by a check on the device: reading it back would split the graph)."""
    B, N, _ = x.shape
    if host is None:
        return torch.ones(B, N, dtype=torch.bool, device=x.device)
    refused = (
        f"tokenfuse reads the padding from the attention mask the encoder hands its layers, and this "
        f"one ({tuple(host.shape)}, {host.dtype}) is not a padding mask of a bidirectional encoder; "
        "pass a 2-D attention_mask of 0s and 1s to the model"
    )
    if host.dim() != 4:
        raise ValueError(refused)
    if host.dtype == torch.bool and not torch.compiler.is_compiling() and _rows_equal(host):
        return host[:, 0, 0, :].expand(B, N).contiguous()  # every query attends to the real keys
    if host.dtype == torch.bool:
        attend = host.expand(B, host.shape[1], N, N)
    else:  # additive: every entry attends (0) or masks (the dtype's minimum)
        attend = (host == 0).expand(B, host.shape[1], N, N)
    real = attend[:, 0].diagonal(dim1=-2, dim2=-1)  # (B, N)
    valid = ((attend == real[:, None, None, :]) | ~real[:, None, :, None]).all()
    if host.dtype != torch.bool:
        valid &= ((host == 0) | (host <= torch.finfo(host.dtype).min / 2)).all()
    if torch.compiler.is_compiling():  # its message must be a constant
        torch._assert_async(valid, "tokenfuse: not a padding mask; pass a 2-D attention_mask of 0s and 1s")
    elif not bool(valid):
        raise ValueError(refused)
    return real


def _rows_equal(host: Tensor) -> bool:
    """Whether every row of a bool mask (B, H, N, N) equals its first head's first row: the padding
    mask transformers builds, checked in one pass (a fifth of the general check's time)."""
    first = host[:, :1, :1, :]
    return not bool((host.view(torch.uint8) ^ first.view(torch.uint8)).any())


def ends(mask: Tensor) -> Tensor:
    """(B, N) the first and the last real token of each sequence ([CLS] and [SEP]), whichever side
    the padding is on."""
    N = mask.shape[-1]
    positions = torch.arange(N, device=mask.device)
    first_real = mask.int().argmax(-1)
    last_real = N - 1 - mask.flip(-1).int().argmax(-1)
    return (positions == first_real[:, None]) | (positions == last_real[:, None])


def host_position_bias(host: Tensor | None, x: Tensor) -> Tensor | None:
    """The position bias the host hands its first layer, checked: (B|1, H, N, N) for the hidden
    states x (B, N, C), or None (no bias, nothing to follow)."""
    B, N, _ = x.shape
    if host is None or (host.dim() == 4 and host.shape[0] in (1, B) and host.shape[2:] == (N, N)):
        return host
    raise ValueError(
        f"the position bias this encoder hands its layers has shape {tuple(host.shape)}, and tokenfuse "
        f"reads one of shape (batch, heads, {N}, {N}) for {N} tokens: this transformers version lays out "
        "its encoders differently from the one tokenfuse was tested with (5.x)"
    )


def parameter_index(module: nn.Module, name: str) -> int:
    """Where `module.forward` takes argument `name`, for reading it from a hook's positional args."""
    parameters = list(inspect.signature(module.forward).parameters)
    if name not in parameters:
        raise TypeError(
            f"{type(module).__name__}.forward takes no {name}: this transformers version lays out its "
            "encoders differently from the one tokenfuse was tested with (5.x)"
        )
    return parameters.index(name)


@dataclass(eq=False)
class TextForward(Forward):
    """named: (B, N) tokens protected by id, found at the embeddings, before the padding is known.
    host_bias: (B|1, H, N, N) the position bias the host hands its layers (MPNet), kept from the
    first layer until the pass ends. bias: (origin, the bias between the tokens at that origin), the
    bias of the current tokens, gathered once per reduction. window: (origin, the engine's mask with
    the local window between the tokens at that origin), built once per reduction, and angles: the
    rotary (cos, sin) the current layer rotates by (ModernBERT)."""

    named: Tensor | None = None
    host_bias: Tensor | None = None
    bias: tuple[Tensor, Tensor] | None = None
    window: tuple[Tensor, Tensor] | None = None
    angles: tuple[Tensor, Tensor] | None = None


class TextPatch(Patch):
    """Token reduction installed on one Hugging Face encoder.

    MPNet scores attention with a relative position bias: its encoder computes one (B, H, N, N)
    bias from the positions of the unreduced input and hands it to every layer. Once tokens are
    reduced, each layer is handed the host's own bias gathered at the original positions of the
    tokens it now holds (`Tokens.origin`), so that the bias between two tokens is the one
    between the positions they came from, whatever slot they sit in now. A pruned token's position
    leaves with it; a merged token keeps the position of the token it was merged into, the one
    whose slot survives (ToMe's B-token, EViT's most attended inattentive token), not a
    size-weighted mean: positions then stay distinct and each is one the merged token's own tokens
    held, while a mean can put two tokens on one position (the bias a token has to itself) or a
    merge of similar, far-apart tokens at a position none of them held, and would need the
    (B, N, N0) source tracked. The bias is gathered, not recomputed, so the host's bucketing is not
    redone here and cannot drift (its own `compute_position_bias(position_ids=...)` fails on
    transformers 5.24 for any shape of position ids).

    ModernBERT rotates queries and keys by position and attends within a window in its local
    layers: its rotary angles and windows follow the original positions alike (`local_attention`).
    Its layers add the attention's residual inside their forward, so tokens are reduced at a layer's
    output (point l + 1 after all of layer l, whose MLP then runs on what point l left, as the
    trace records), and point L, after the last layer, which would save no work, is not run. The
    queries and keys methods read are rotated as the layer's attention rotates them: without it,
    ToMe's keys would carry no position at all and repeated words would tie exactly. Methods that
    read attention probabilities are refused (`checks.check_local_attention`): tokenfuse computes
    them over all tokens, and a local layer attends within its window."""

    state_type = TextForward
    default_min_tokens = MIN_TOKENS

    def __init__(self, model: nn.Module, family: Family, method: Method, protect_ids: Sequence[int] = ()):
        check_attention(model)
        checks.check_text(model)
        checks.check_cls(method, family.has_cls, f"{family.name} models")
        base = model.base_model
        layers = base.get_submodule(family.layers)
        super().__init__(model, method, len(layers), model.config.num_attention_heads, family.has_cls)
        self.family = family
        self.protect_ids = torch.tensor(sorted(set(protect_ids)), dtype=torch.long)
        if method.static and len(self.protect_ids):
            raise ValueError(
                "static=True lays batches out by widths known in advance, and tokens protected by id "
                "(protect_ids) occur any number of times per text: use one or the other"
            )
        self.fixed_protected = 2  # the first and last real token
        embeddings = base.get_submodule(family.embeddings)
        self._ids_at = parameter_index(embeddings, "input_ids")
        self.tracks_origin = family.position_bias is not None or family.rotary is not None
        if family.position_bias is not None:
            self._bias_at = parameter_index(layers[0], family.position_bias)
        self.windows = [None] * len(layers)
        if family.rotary is not None:
            self._rotary_at = parameter_index(layers[0], family.rotary)
            self.windows = local_windows(model.config, len(layers))
            checks.check_local_attention(model.config, method, self.windows)

        self.before(embeddings, self._start, kwargs=True)
        whole = not family.merge_after  # reduced at the layer's output: not after the last one
        for i, layer in enumerate(layers):
            self.before(layer, partial(self._enter, i), kwargs=True)
            if not (whole and i == len(layers) - 1):
                self.after(layer.get_submodule(family.merge_after), partial(self._reduce, i + 1))
            if self.wants_attention:
                names = ("qkv",) if len(family.qkv) == 1 else "qkv"  # one fused projection, or three
                for name, path in zip(names, family.qkv, strict=True):
                    keep = self._keep_rotated if family.rotary else partial(self._keep, name)
                    self.after(layer.get_submodule(path), keep, first=False)
        self.after(layers[-1], self.close, first=False)

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        fwd = self.open()
        if not len(self.protect_ids):
            return
        ids = argument(args, kwargs, "input_ids", self._ids_at)
        if ids is None:
            raise ValueError(
                "protect_ids names token ids, and this forward passed inputs_embeds: pass input_ids"
            )
        fwd.named = torch.isin(ids, self.protect_ids.to(ids.device))

    def _enter(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        fwd = self.current()
        if fwd is None:
            return None
        x = args[0]
        if index == 0:
            if self.family.position_bias is not None:
                fwd.host_bias = host_position_bias(
                    argument(args, kwargs, self.family.position_bias, self._bias_at), x
                )
            mask = padding_of(argument(args, kwargs, "attention_mask", 1), x)
            protected = ends(mask) if fwd.named is None else ends(mask) | fwd.named
            self.begin(fwd, mask, protected)
            reduced = self.reduce_at(fwd, 0, x)
            if reduced is not None:
                args = (reduced, *args[1:])
        bias = self.enter(fwd, x.dtype)
        if self.family.rotary is not None:
            args, kwargs = self.rotary(fwd, args, kwargs, gather=bias is not None)
        if bias is None:
            return None
        if self.windows[index] is not None:
            bias = self.local_mask(fwd, bias, self.windows[index])
        args, kwargs = with_mask(args, kwargs, "attention_mask", bias)
        if fwd.host_bias is None:
            return args, kwargs
        return with_argument(args, kwargs, self.family.position_bias, self._bias_at, self.position_bias(fwd))

    def position_bias(self, fwd: TextForward) -> Tensor:
        """(B, H, N, N) the host's position bias between the original positions of the current
        tokens (see the class docstring), gathered once per reduction."""
        origin = fwd.tokens.origin
        if fwd.bias is None or fwd.bias[0] is not origin:
            fwd.bias = (origin, pairs_at(fwd.host_bias, origin))
        return fwd.bias[1]

    def rotary(self, fwd: TextForward, args: tuple, kwargs: dict, gather: bool) -> tuple[tuple, dict]:
        """A layer's call with the host's rotary (cos, sin) gathered at the original positions of the
        current tokens once they were reduced (`local_attention`); the angles the layer rotates by
        are kept for the queries and keys methods read (`_keep_rotated`)."""
        angles = argument(args, kwargs, self.family.rotary, self._rotary_at)
        if gather:
            angles = rotary_at(angles, fwd.tokens.origin, fwd.width)
            args, kwargs = with_argument(args, kwargs, self.family.rotary, self._rotary_at, angles)
        fwd.angles = angles
        return args, kwargs

    def _keep_rotated(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        """Forward hook on a fused q, k, v projection (`_keep`): the queries and keys rotated by the
        layer's angles, as its attention scores them."""
        self._keep("qkv", module, args, out)
        fwd = self.current()
        if fwd is not None and fwd.angles is not None:
            for name in "qk":
                fwd.qkv[name] = rotate(fwd.qkv[name], *fwd.angles)

    def local_mask(self, fwd: TextForward, bias: Tensor, reach: int) -> Tensor:
        """(B, 1, N, N) the engine's mask (B, 1, 1, N) for a local layer: keys within `reach`
        original positions of the query (`local_attention`), built once per reduction."""
        origin = fwd.tokens.origin
        if fwd.window is None or fwd.window[0] is not origin:
            fwd.window = (origin, window_bias(bias, origin, reach))
        return fwd.window[1]

    def close(self, module: nn.Module, args: tuple, out) -> None:
        """The pass ends: its position biases (as large as an attention map) are let go too."""
        fwd = self.current()
        if fwd is not None:
            fwd.host_bias = fwd.bias = fwd.window = fwd.angles = None
        super().close(module, args, out)

    def _reduce(self, point: int, module: nn.Module, args: tuple, out):
        fwd = self.current()
        if fwd is None:
            return None
        x = self.reduce_at(fwd, point, first(out))
        if x is None:
            return None
        if not self.family.merge_after:  # the layer's MLP ran on the tokens that entered it
            fwd.trace[-1] = (fwd.trace[-1][0], fwd.trace[-1][0])
        return replace_first(out, x)
