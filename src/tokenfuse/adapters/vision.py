"""Vision transformers: Hugging Face ViT, DeiT, DINOv2 (with or without registers), the CLIP and
SigLIP vision towers (alone, or inside `CLIPModel` / `SiglipModel`, whose text half is left alone),
and timm's `VisionTransformer` (DeiT, ViT, DINOv2-style models with LayerScale and register tokens).

Like the text adapter, hooks only: the host's own norms, attention, LayerScale and MLP run
unchanged. These blocks are pre-norm, so the residual add sits inside the block's forward, where a
hook cannot reach it. Tokens are reduced between attention and MLP (as ToMe does) like this:
  - before the MLP's norm: the input is the residual stream after attention; reduce it (x -> x');
  - after the MLP branch's last module: keep its output m' (already on the reduced tokens) and
    hand the block zeros of the unreduced shape, so its residual add passes x through unchanged;
  - after the block: return x' + m', what the block computes on the reduced tokens.
Anything between the branch's last module and the add (dropout, drop path) is the identity in
eval mode, which reduction requires. The [CLS], distillation and register tokens are protected;
SigLIP has none (every token is a patch), so methods that score by [CLS] attention are refused there.
CLIP's `pre_layrnorm` runs on the full grid (the pass opens at its output) and its `post_layernorm`
on the [CLS] token the host pools, as written; SigLIP's attention-pooling head weighs tokens by size
(`heads`).

Each pass keeps its state apart (see `hooks`): the embeddings' output opens it, x' and m' are kept
in it between the MLP's hooks and the block's, and the last block closes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..core import unmerge
from ..methods import Method
from . import checks
from .engine import Forward, Patch, check_attention
from .heads import weigh_pooling
from .hooks import first, replace_first, with_mask
from .vision_families import TIMM, Family, find_layers, prefix_tokens, tower_of


@dataclass(eq=False)
class VisionForward(Forward):
    """pending: x' (reduced) and the unreduced shape, from the MLP's input to the block's output;
    branch: m', the MLP branch's output on the reduced tokens; final: the tokens a pooling head reads."""

    pending: tuple[Tensor, torch.Size] | None = None
    branch: Tensor | None = None
    final: Tensor | None = None  # the last norm's output, for a pooling head (adapters.heads)


class VisionPatch(Patch):
    """Token reduction installed on one vision transformer."""

    state_type = VisionForward
    has_grid = True

    def __init__(self, model: nn.Module, family: Family, method: Method):
        base = tower_of(model, family)
        if family is TIMM:
            heads = model.blocks[0].attn.num_heads
        else:
            check_attention(base)
            heads = base.config.num_attention_heads
        layers = find_layers(base, family)
        checks.check_vision(model, method, timm=family is TIMM)
        checks.check_cls(method, family.has_cls, f"{family.name} models")
        super().__init__(model, method, len(layers), heads, has_cls=family.has_cls)
        self.family = family
        self.prefix = self.fixed_protected = prefix_tokens(model, family)

        self.after(base.get_submodule(family.embeddings), self._embedded)
        if "grid" in method.needs:
            self._watch_grid(base)
        if family is not TIMM:
            self._hidden_states_at_full_resolution(model, base, layers)
        for i, layer in enumerate(layers):
            self.before(layer, self._enter, kwargs=True)
            self.before(layer.get_submodule(family.mlp_in), partial(self._before_mlp, i + 1))
            self.after(layer.get_submodule(family.mlp_out), self._after_mlp)
            self.after(layer, self._after_layer)
            if self.wants_attention:
                names = ("qkv",) if len(family.qkv) == 1 else "qkv"
                for name, path in zip(names, family.qkv, strict=True):
                    self.after(layer.get_submodule(path), partial(self._keep, name), first=False)
                if family is TIMM:
                    self._keep_normed(layer.attn)
        self.after(layers[-1], self.close, first=False)
        weigh_pooling(self, model, base, family is TIMM, self.prefix)

    def _keep_normed(self, attn: nn.Module) -> None:
        """timm attention with qk_norm: the queries and keys it uses are the outputs (B, H, N, D) of
        its q_norm and k_norm, kept in place of the projection's."""
        for name in "qk":
            if not isinstance(norm := getattr(attn, f"{name}_norm"), nn.Identity):
                self.after(norm, partial(self._keep_head_major, name), first=False)

    def _keep_head_major(self, name: str, module: nn.Module, args: tuple, out: Tensor) -> None:
        """A q_norm / k_norm output (B, H, N, D), kept as the projection's layout (B, N, H * D)."""
        self._keep(name, module, args, out.transpose(1, 2).flatten(2))

    def _watch_grid(self, base: nn.Module) -> None:
        """For methods that need the image's patch grid: read it from the output (B, C, h, w) of the
        tower's patch embedding, its first convolution."""
        conv = next((m for m in base.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise TypeError(
                f"{self.method.name} needs the image's patch grid, read from the patch embedding's "
                f"convolution, and this {type(base).__name__} has none: choose a method without a grid"
            )
        self.after(conv, self._patch_grid)

    def _hidden_states_at_full_resolution(self, model: nn.Module, base: nn.Module, layers: nn.Module) -> None:
        """Hugging Face towers: the hidden states a caller asks for (output_hidden_states, a
        backbone's feature maps) come back at every input position where sources are tracked
        (track_source=True; a backbone, whose feature maps are grids, always tracks them): each
        layer's tokens are unmerged, or rebuilt by the method's own reconstruction."""
        self.tracks_source = checks.is_backbone(model)
        encoder = next(m for m in base.modules() if any(c is layers for c in m.children()))
        self.after(encoder, self._hidden_states_to_grid)

    def _hidden_states_to_grid(self, module: nn.Module, args: tuple, out):
        """The encoder's output with each recorded hidden state (B, N_l, C) mapped to (B, N0, C),
        from the token state that held it (entering each layer, then the last)."""
        fwd = self.last
        states = getattr(out, "hidden_states", None)
        if fwd is None or states is None or not fwd.reduced or fwd.tokens.source is None:
            return None
        held = [*fwd.entering, fwd.tokens]
        if len(held) != len(states):
            return None
        out.hidden_states = tuple(
            None if h is None else unmerge(h, t) for h, t in zip(states, held, strict=True)
        )
        return out

    def _patch_grid(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        """The patch grid (h, w) of this thread's image, for the pass its embeddings open."""
        self._local.grid = tuple(out.shape[-2:])

    def _embedded(self, module: nn.Module, args: tuple, out):
        fwd = self.open()
        x = first(out)
        B, N, _ = x.shape
        mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
        protected = (torch.arange(N, device=x.device) < self.prefix).expand(B, N)
        self.begin(fwd, mask, protected)
        grid = getattr(self._local, "grid", None)
        fwd.grid = grid if grid is not None and grid[0] * grid[1] == N - self.prefix else None
        x = self.reduce_at(fwd, 0, x)
        return None if x is None else replace_first(out, x)

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        fwd = self.current()
        if fwd is None:
            return None
        bias = self.enter(fwd, args[0].dtype)
        return None if bias is None else with_mask(args, kwargs, self.family.mask_arg, bias)

    def _before_mlp(self, point: int, module: nn.Module, args: tuple):
        fwd = self.current()
        if fwd is None:
            return None
        if self.schedule[point] < 1.0 and module.training:
            raise RuntimeError("token reduction runs in eval mode: call model.eval() first")
        x = args[0]
        reduced = self.reduce_at(fwd, point, x)
        if reduced is None:
            return None
        fwd.pending = (reduced, x.shape)
        return (reduced, *args[1:])

    def _after_mlp(self, module: nn.Module, args: tuple, out: Tensor):
        fwd = self.current()
        if fwd is None or fwd.pending is None:
            return None
        fwd.branch = out
        return out.new_zeros(fwd.pending[1])

    def _after_layer(self, module: nn.Module, args: tuple, out):
        fwd = self.current()
        if fwd is None or fwd.pending is None:
            return None
        x = fwd.pending[0] + fwd.branch
        fwd.pending = fwd.branch = None
        return replace_first(out, x)
