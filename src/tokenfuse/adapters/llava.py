"""LLaVA-family vision-language models (transformers' `LlavaForConditionalGeneration`, with any vision
tower and decoder LLM that class accepts): visual tokens reduced in the vision tower (a token method,
through the vision adapter), at the vision-to-LLM boundary and inside the LLM, in any combination.

Boundary: a pre-hook of `LlavaModel.forward` runs the host's own `get_image_features` (tower, layer
selection, projector), with the operator applied to the projector's input; it then rebuilds the
sequence with one `<image>` placeholder per kept token (padding on the caller's side), the attention
mask and the position ids, and hands the host `inputs_embeds` filled as the host fills them.
In the LLM: the hidden states entering decoder layer K are reduced, and every later layer gets the
matching mask, rotary angles and position ids (kept tokens keep their positions).

Decoding: a reduced prefill leaves a `Record` on its own KV cache object, so each later step, whose
attention mask and position ids the caller (generate() or a hand-written loop) grows from the
unreduced prompt, is translated to the reduced cache. State of a pass stays in that pass (per-thread
`LlavaForward`), state of a generation on that generation's cache.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from ..core import Tokens, reduce
from ..core.tokens import take_along
from ..methods import Method, VisualInput, VisualMethod
from . import vision
from .base import Forward, Hooks, ahead, check_attention, left_padded, pairs_at

_RECORD = "_tokenfuse_record"
_TOWER = "_tokenfuse_tower"
_ARGS = ("input_ids", "pixel_values", "attention_mask", "position_ids", "cache", "inputs_embeds")


def llava_model(model: nn.Module) -> nn.Module | None:
    """The `LlavaModel` inside `model` (or `model` itself), None for other models."""
    inner = getattr(model, "model", model)
    if type(inner).__name__ != "LlavaModel":
        return None
    return inner


@dataclass(eq=False)
class Stage:
    """An in-LLM reduction of one prefill: from decoder layer `layer` on, the cache holds tokens
    laid out as `valid` (B, Lj) says (False: a padding slot)."""

    layer: int
    valid: Tensor


@dataclass(eq=False)
class Record:
    """What decoding needs from a reduced prefill, kept on that generation's cache.

    length: the prompt length the caller counts. prefix: (B, Lb) mask of the prompt the LLM saw.
    shift: (B, 1) real prompt tokens removed at the boundary: later positions move down by it.
    """

    length: int
    prefix: Tensor
    shift: Tensor
    stages: list[Stage] = field(default_factory=list)


@dataclass(eq=False)
class TowerPass:
    """One run of the patched vision tower: what the boundary step reads from it. It travels on the
    tower's output object, since generate() encodes the images before the prefill that uses them.

    full: patches per image of the caller's pixels (the budget's base). grid: (h, w) of the pixels the
    tower saw. qk: captured [CLS] queries and keys per tower layer (B, H, *, D). selected: (B, N, C)
    the projector's input. tokens: the vision adapter's final tokens when the tower reduces.
    layer_tokens: (layers, B) tokens entering each tower layer."""

    full: int
    grid: tuple[int, int]
    layer_tokens: Tensor | None = None
    qk: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    selected: Tensor | None = None
    tokens: Tokens | None = None


@dataclass(eq=False)
class LlavaForward(Forward):
    """One pass. In the LLM, in the current layout: visual, valid (B, L) and question (B, L) tokens;
    left: whether rows are left-padded; visual0: (B,) visual tokens entering the LLM; llm_trace:
    (first layer, tokens per row) per layout. boundary: tokens per image after the boundary;
    tower_trace: (layers, B_img) tokens entering each tower layer, when the images were reduced.
    scoring: the input of the attention that scores the next stage. layer_kwargs: what the layers
    of the current layout are called with. record: a decoding step's record."""

    visual: Tensor | None = None
    valid: Tensor | None = None
    question: Tensor | None = None
    visual0: Tensor | None = None
    left: bool = False
    llm_trace: list[tuple[int, Tensor]] = field(default_factory=list)
    boundary: Tokens | None = None
    tower_trace: Tensor | None = None
    scoring: dict | None = None
    layer_kwargs: dict | None = None
    stage: int = 0
    stages: list[Stage] = field(default_factory=list)
    record: Record | None = None


class LlavaPatch(Hooks):
    """Visual-token reduction installed on a LLaVA model. `tower` is the vision adapter's patch when a
    token method runs in the vision tower."""

    state_type = LlavaForward

    def __init__(self, model: nn.Module, methods: list[VisualMethod], tower_method: Method | None = None):
        super().__init__()
        inner = llava_model(model)
        if inner is None:
            raise TypeError("not a LLaVA model (transformers' LlavaForConditionalGeneration / LlavaModel)")
        self.inner = inner
        self.config = inner.config
        self.boundary = self._one(methods, "boundary")
        self.in_llm = self._one(methods, "llm")
        self.stages = [] if self.in_llm is None else self.in_llm.stages()
        layers = inner.language_model.layers
        if any(not 1 <= k < len(layers) for k, _ in self.stages):
            raise ValueError(
                f"{self.in_llm.name}: layer must be in 1..{len(layers) - 1} for this {len(layers)}-layer "
                f"LLM, got {[k for k, _ in self.stages]}"
            )
        check_attention(inner.language_model)
        self.tower = None
        feature_layer = self.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise ValueError("tokenfuse supports LLaVA models that select one vision feature layer")
        attention = self._tower_attention()
        self.n_tower = n_tower = len(attention)
        self.feature_layer = feature_layer % (n_tower + 1) - 1  # hidden_states[0] is the embeddings
        if self.boundary is not None:
            self.boundary.check(self.feature_layer + 1)
        if tower_method is not None:
            if self.feature_layer != n_tower - 1:
                raise ValueError(
                    "reducing in the vision tower needs the LLaVA config to select its last layer "
                    f"(vision_feature_layer -1), this one selects {feature_layer}"
                )
            family = vision.family_of(inner.vision_tower)
            if family is None:
                raise TypeError(
                    f"the vision tower {type(inner.vision_tower).__name__} has no tokenfuse adapter"
                )
            scored = (
                self.boundary.needs & {"cls_attention", "cls_attention_layers", "keys"}
                if self.boundary
                else None
            )
            if scored:
                raise ValueError(
                    f"{self.boundary.name} scores with the tower's attention ({', '.join(sorted(scored))}), "
                    "whose tokens a vision-tower method changes inside each layer: combine the tower method "
                    "with an operator that does not read it (random, resize, fastv, sparsevlm, aim-prune)"
                )
            self.tower = vision.VisionPatch(inner.vision_tower, family, tower_method)
        self._install(inner, attention)

    @staticmethod
    def _one(methods: list[VisualMethod], placement: str) -> VisualMethod | None:
        found = [m for m in methods if m.placement == placement]
        if len(found) > 1:
            raise ValueError(f"one {placement} operator at a time, got {[m.name for m in found]}")
        return found[0] if found else None

    def _tower_attention(self) -> list[nn.Module]:
        """Each tower layer's attention module (the one holding q_proj and k_proj)."""
        found = [
            m for m in self.inner.vision_tower.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")
        ]
        if not found:
            raise TypeError(f"no q_proj/k_proj attention found in {type(self.inner.vision_tower).__name__}")
        return found

    def _install(self, inner: nn.Module, attention: list[nn.Module]) -> None:
        tower = inner.vision_tower
        self.before(inner, self._begin, kwargs=True)
        self.after(inner, self._end, kwargs=True)
        self.before(tower, self._tower_begin, kwargs=True)
        self.after(tower, self._tower_end)
        self.before(inner.multi_modal_projector, self._tower_selected)
        needs = self.boundary.needs if self.boundary is not None else frozenset()
        wanted = range(self.feature_layer + 1) if "cls_attention_layers" in needs else [self.feature_layer]
        if needs & {"cls_attention", "cls_attention_layers", "keys"}:
            for i in wanted:
                for name in ("q_proj", "k_proj"):
                    keep = partial(self._tower_keep, i, name[0])
                    self.after(getattr(attention[i], name), keep, first=False)
        layers = inner.language_model.layers
        for k, _ in self.stages:
            self.before(layers[k - 1].self_attn, self._score_input, kwargs=True)
        if self.stages:
            for i in range(self.stages[0][0], len(layers)):
                self.before(layers[i], partial(self._layer, i), kwargs=True)

    def remove(self) -> None:
        super().remove()
        if self.tower is not None:
            self.tower.remove()

    # -- a pass -------------------------------------------------------------------------------
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = {**dict(zip(_ARGS, args, strict=False)), **kwargs}
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        fwd = self.open()
        cache = kwargs.get("cache")
        record = getattr(cache, _RECORD, None)
        if record is not None:
            return (), self._decoding(fwd, record, kwargs)
        ids = kwargs.get("input_ids")
        if ids is None:
            if kwargs.get("pixel_values") is not None and self._reduces_images():
                raise ValueError(
                    "pass input_ids, not inputs_embeds, with pixel_values: tokenfuse finds each image's "
                    "placeholders in them to rebuild the shorter prompt"
                )
            return (), kwargs
        if cache is not None and cache.get_seq_length() > 0 and kwargs.get("pixel_values") is not None:
            raise ValueError("a reduced prompt cannot continue an unreduced cache: start a new cache")
        self._local.prefill = fwd
        mask = kwargs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        length = ids.shape[1]
        shift = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
        changed = False
        images = kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get(
            "image"
        )
        if images is not None and self._reduces_images():
            kwargs, valid, shift, ids = self._rebuild(fwd, module, kwargs, valid)
            changed = True
        fwd.visual = (ids == self.config.image_token_id) & valid
        fwd.valid = valid
        fwd.visual0 = fwd.visual.sum(1)
        fwd.left = left_padded(valid)
        fwd.question = _question(fwd.visual, valid)
        fwd.llm_trace = [(0, valid.sum(1))]
        if any(f < 1.0 for _, f in self.stages) and bool(fwd.visual0.any()):
            changed = True
        if changed and kwargs.get("use_cache", self.config.text_config.use_cache) and cache is None:
            kwargs["cache"] = cache = _host(self.inner.language_model).DynamicCache(
                config=self.config.text_config
            )
        if changed and cache is not None:
            fwd.record = Record(length=length, prefix=valid, shift=shift)
        return (), kwargs

    def _end(self, module: nn.Module, args: tuple, kwargs: dict, out) -> None:
        fwd = self.current()
        if fwd is None:
            return
        cache = getattr(out, "cache", None)
        if fwd.record is not None and cache is not None and getattr(cache, _RECORD, None) is None:
            fwd.record.stages = fwd.stages
            setattr(cache, _RECORD, fwd.record)
        fwd.scoring = fwd.layer_kwargs = None
        self._local.current = None

    def _reduces_images(self) -> bool:
        if self.tower is not None:
            return True
        return self.boundary is not None and self.boundary.keep < 1.0

    # -- the vision tower -----------------------------------------------------------------------
    def _tower_begin(self, module: nn.Module, args: tuple, kwargs: dict):
        """Tower pre-hook: a tower pass opens; the `resize` baseline changes the pixels here."""
        if not self._reduces_images():
            return None
        pixels = args[0] if args else kwargs["pixel_values"]
        patch = self.config.vision_config.patch_size
        full = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        resized = self.boundary.pixels(pixels, patch) if self.boundary is not None else None
        if resized is not None:
            pixels = resized
            args, kwargs = (
                ((pixels, *args[1:]), kwargs) if args else (args, {**kwargs, "pixel_values": pixels})
            )
        self._local.tower = TowerPass(full=full, grid=(pixels.shape[-2] // patch, pixels.shape[-1] // patch))
        return args, kwargs

    def _tower_end(self, module: nn.Module, args: tuple, out) -> None:
        tower = getattr(self._local, "tower", None)
        if tower is not None:
            if self.tower is None:
                tower.layer_tokens = torch.full(
                    (self.n_tower, out.last_hidden_state.shape[0]), out.last_hidden_state.shape[1]
                )
            else:
                tower.tokens, tower.layer_tokens = self.tower.tokens, self.tower.layer_tokens()[:, 0]
            setattr(out, _TOWER, tower)  # the output object get_image_features returns

    def _tower_keep(self, layer: int, name: str, module: nn.Module, args: tuple, out: Tensor) -> None:
        """Forward hook of a tower q/k projection: keep the [CLS] query or all keys, per head."""
        tower = getattr(self._local, "tower", None)
        if tower is None:
            return
        heads = self.config.vision_config.num_attention_heads
        B, N, C = out.shape
        per_head = (out[:, :1] if name == "q" else out).view(B, -1, heads, C // heads).transpose(1, 2)
        tower.qk.setdefault(layer, {})[name] = per_head

    def _tower_selected(self, module: nn.Module, args: tuple) -> None:
        """Projector pre-hook: its input is the selected features; the tower pass is complete."""
        tower = getattr(self._local, "tower", None)
        if tower is not None:
            tower.selected = args[0]
            self._local.tower = None

    # -- the boundary ---------------------------------------------------------------------------
    def _rebuild(self, fwd: LlavaForward, module: nn.Module, kwargs: dict, valid: Tensor):
        """Reduce the images' selected features, project the kept ones, and rebuild the sequence
        around them: (the host's new kwargs, real tokens (B, L'), real tokens removed per row (B, 1),
        new input_ids). The host then embeds and fills the placeholders itself."""
        ids = kwargs["input_ids"]
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            encoded = module.get_image_features(
                pixel_values=kwargs["pixel_values"],
                vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                image_sizes=kwargs.get("image_sizes"),
                return_dict=True,
            )
        tower = getattr(encoded, _TOWER, None)
        if tower is None or tower.selected is None:
            raise RuntimeError("these image features were encoded before tokenfuse.apply: encode them again")
        is_image = ids == self.config.image_token_id
        n_images = tower.selected.shape[0]
        per_image, extra = divmod(int(is_image.sum()), max(n_images, 1))
        if extra:
            raise ValueError(
                f"{int(is_image.sum())} image tokens for {n_images} images: each needs the same number"
            )
        x, tokens = self._reduce_images(tower, module, ids, valid, is_image, per_image)
        fwd.boundary, fwd.tower_trace = tokens, tower.layer_tokens
        features = module.multi_modal_projector(x)
        kept = tokens.count
        flat = is_image.flatten().cumsum(0).view_as(is_image) - 1
        image_of = (flat // per_image).clamp(0, n_images - 1)
        keep = valid & (~is_image | (flat % per_image < kept[image_of]))
        left = left_padded(valid)
        length = int(keep.sum(1).max())
        order = ahead(~keep)[:, -length:] if left else ahead(keep)[:, :length]
        new_valid = keep.gather(1, order)
        pad = self.config.text_config.pad_token_id
        new_ids = torch.where(new_valid, ids.gather(1, order), 0 if pad is None else pad)
        reduced = copy.copy(encoded)
        reduced.pooler_output = [f[m] for f, m in zip(features, tokens.mask, strict=True)]
        out = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "image_sizes")}
        out |= {
            "input_ids": new_ids,
            "mm_encoder_outputs": {**(kwargs.get("mm_encoder_outputs") or {}), "image": reduced},
        }
        mask = kwargs.get("attention_mask")
        if mask is not None or not bool(new_valid.all()):
            out["attention_mask"] = new_valid.to(torch.long if mask is None else mask.dtype)
        if kwargs.get("position_ids") is not None:
            out["position_ids"] = (new_valid.long().cumsum(1) - 1).masked_fill(~new_valid, 0)
        shift = (valid.sum(1) - new_valid.sum(1))[:, None]
        return out, new_valid, shift, new_ids

    def _reduce_images(
        self, tower: TowerPass, module, ids, valid, is_image, per_image
    ) -> tuple[Tensor, Tokens]:
        """(B_img, N', C) the selected features after the boundary operator, and their tokens."""
        x = tower.selected
        B, N, _ = x.shape
        none = torch.zeros(B, N, dtype=torch.bool, device=x.device)
        tokens = Tokens.start(~none, none)
        grid = tower.grid if tower.grid[0] * tower.grid[1] == N else None
        if (
            tower.tokens is not None
        ):  # the tower reduced: its sizes, the [CLS] dropped if the strategy drops it
            drop = tower.tokens.size.shape[1] - N
            tokens = Tokens(size=tower.tokens.size[:, drop:], protected=none)
            grid = None
        method = self.boundary
        if method is None or method.keep >= 1.0:
            return x, tokens
        keep = torch.minimum(method.counts(torch.full((B,), tower.full, device=x.device)), tokens.count)
        needs = self._boundary_needs(tower, module, x, ids, valid, is_image, per_image)
        inp = VisualInput(x=x, tokens=tokens, visual=tokens.mask, keep=keep, grid=grid, **needs)
        return reduce(x, tokens, self.timed(method.decide, inp))

    def _boundary_needs(
        self, tower: TowerPass, module, x, ids, valid, is_image, per_image
    ) -> dict[str, Tensor]:
        needs = self.boundary.needs
        out: dict[str, Tensor] = {}
        drop = 1 if self.config.vision_feature_select_strategy == "default" else 0
        if needs & {"cls_attention", "cls_attention_layers"}:
            layers = (
                range(self.feature_layer + 1) if "cls_attention_layers" in needs else [self.feature_layer]
            )
            maps = torch.stack([_cls_attention(tower.qk[i])[:, drop:] for i in layers], 1)
            if "cls_attention_layers" in needs:
                out["cls_attention_layers"] = maps
            if "cls_attention" in needs:
                out["cls_attention"] = maps[:, -1]
        if "keys" in needs:
            out["keys"] = tower.qk[self.feature_layer]["k"].mean(1)[:, drop:]
        if "projected" in needs:
            out["projected"] = module.multi_modal_projector(x)
        if "question" in needs:
            question = _question(is_image & valid, valid)
            rows = is_image.nonzero()[:, 0][::per_image]  # the row of each image, in image order
            index, qmask = _rows(question)
            embeds = module.get_input_embeddings()(ids.gather(1, index))
            out |= {"question": embeds[rows], "question_mask": qmask[rows]}
        return out

    # -- inside the LLM -------------------------------------------------------------------------
    def _score_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the attention whose queries and keys score the next stage: keep its input."""
        fwd = self.current()
        if fwd is None or fwd.visual is None or fwd.stage >= len(self.stages):
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        fwd.scoring = {"module": module, "hidden": hidden, "rotary": kwargs["position_embeddings"]}

    def _layer(self, i: int, module: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook of decoder layers from the first stage on: reduce at a stage's layer, and give each
        layer the mask, rotary angles and position ids of the current layout."""
        fwd = self.current()
        if fwd is None:
            return None
        if fwd.visual is None:  # a decoding step
            return None if fwd.record is None else self._decode_layer(fwd, i, args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if fwd.stage < len(self.stages) and self.stages[fwd.stage][0] == i:
            hidden = self._reduce_in_llm(fwd, i, hidden, kwargs)
        if fwd.layer_kwargs is None:
            return None
        args = (hidden, *args[1:]) if args else ()
        new = {**kwargs, **fwd.layer_kwargs}
        if not args:
            new["hidden_states"] = hidden
        return args, new

    def _reduce_in_llm(self, fwd: LlavaForward, layer: int, hidden: Tensor, kwargs: dict) -> Tensor:
        fraction = self.stages[fwd.stage][1]
        fwd.stage += 1
        keep = self.in_llm.counts(fwd.visual0, fraction)
        keep = torch.minimum(keep, (fwd.visual & fwd.valid).sum(1))
        if not bool((keep < fwd.visual.sum(1)).any()):
            return hidden
        tokens = Tokens.start(fwd.valid, fwd.valid & ~fwd.visual, track_origin=True)
        inp = VisualInput(
            x=hidden,
            tokens=tokens,
            visual=fwd.visual & fwd.valid,
            keep=keep,
            layer=layer,
            **self._llm_needs(fwd),
        )
        red = self.timed(self.in_llm.decide, inp)
        hidden, tokens = reduce(hidden, tokens, red)
        if fwd.left:  # padding back in front, so that the last position stays each row's last token
            order = ahead(~tokens.mask)
            hidden = take_along(hidden, order)
            tokens = tokens.take(order)
        self._relayout(fwd, tokens.origin, tokens.mask, kwargs)
        fwd.stages.append(Stage(layer=layer, valid=tokens.mask))
        fwd.llm_trace.append((layer, tokens.count))
        return hidden

    def _relayout(self, fwd: LlavaForward, at: Tensor, valid: Tensor, kwargs: dict) -> None:
        """The current layout becomes the kept tokens, at positions `at` (B, L') of it (any at
        padding, which `valid` marks): gather the per-token state, and build what the following
        layers are called with."""
        base = fwd.layer_kwargs or {
            k: kwargs.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")
        }
        fwd.visual = fwd.visual.gather(1, at) & valid
        fwd.question = fwd.question.gather(1, at) & valid
        fwd.valid = valid
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
            out["attention_mask"] = _host_format(allowed, host, self.config.text_config)
        fwd.layer_kwargs = out

    def _llm_needs(self, fwd: LlavaForward) -> dict[str, Tensor]:
        needs = self.in_llm.needs
        if not needs:
            return {}
        s = fwd.scoring
        valid = fwd.valid
        L = valid.shape[1]
        position = torch.arange(L, device=valid.device)
        last = torch.where(valid, position, -1).max(1).values  # (B,)
        rows, qmask = _rows(fwd.question)
        rows = torch.cat([rows, last[:, None]], 1)
        probs = _attention_rows(s["module"], s["hidden"], s["rotary"], rows, valid)
        out = {}
        if "text_attention" in needs:
            out["text_attention"] = torch.where(qmask[..., None], probs[:, :-1], 0.0)
            out["question_mask"] = qmask
        if "last_attention" in needs:
            out["last_attention"] = probs[:, -1]
        return out

    # -- decoding -------------------------------------------------------------------------------
    def _decoding(self, fwd: LlavaForward, record: Record, kwargs: dict) -> dict:
        """A step after a reduced prefill: the caller's mask and positions, translated."""
        fwd.record = record
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([record.prefix.to(mask.dtype), mask[:, record.length :]], 1)
        elif mask is None and not bool(record.prefix.all()):
            cache = kwargs["cache"]
            ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            grown = cache.get_seq_length() - record.prefix.shape[1] + ids.shape[1]
            kwargs["attention_mask"] = torch.cat(
                [record.prefix.long(), record.prefix.new_ones(ids.shape[0], grown).long()], 1
            )
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] - record.shift.to(kwargs["position_ids"].device)
        return kwargs

    def _decode_layer(self, fwd: LlavaForward, i: int, args: tuple, kwargs: dict):
        """A decoding step in a layer after an in-LLM stage: its cache holds the stage's layout, so the
        prompt part of the mask is the stage's, the part of the generated tokens the host's."""
        stage = next((s for s in reversed(fwd.record.stages) if s.layer <= i), None)
        if stage is None:
            return None
        host = kwargs.get("attention_mask")
        if host is None and bool(stage.valid.all()):
            return None
        if fwd.layer_kwargs is None or fwd.layer_kwargs["stage"] is not stage:
            prefix = fwd.record.prefix.shape[1]
            if host is None:  # no padding: the new tokens see each other causally
                t = (args[0] if args else kwargs["hidden_states"]).shape[1]
                grown_len = kwargs["cache"].get_seq_length(0) - prefix
                key = torch.arange(grown_len, device=stage.valid.device)
                query = torch.arange(t, device=stage.valid.device) + grown_len - t
                grown = (key[None] <= query[:, None])[None, None].expand(stage.valid.shape[0], 1, -1, -1)
                grown = _host_format(grown, None, self.config.text_config)
            else:
                grown = host[..., prefix:]
            old = stage.valid[:, None, None, :].expand(-1, 1, grown.shape[2], -1)
            mask = torch.cat([_host_format(old, grown, self.config.text_config), grown], -1)
            fwd.layer_kwargs = {"stage": stage, "attention_mask": mask}
        return args, {**kwargs, "attention_mask": fwd.layer_kwargs["attention_mask"]}

    # -- read by the bench ----------------------------------------------------------------------
    @property
    def prefill(self) -> LlavaForward | None:
        """This thread's last pass over a prompt (not a decoding step): what generate() reduced."""
        return getattr(self._local, "prefill", None)

    @property
    def llm_trace(self) -> list[tuple[int, Tensor]]:
        """This thread's last prompt pass: (first LLM layer, tokens per row) for each layout it used."""
        return [] if self.prefill is None else self.prefill.llm_trace


def _cls_attention(qk: dict[str, Tensor]) -> Tensor:
    """(B, N) the [CLS] query's attention over a tower layer's tokens, mean over heads."""
    q, k = qk["q"], qk["k"]
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)[:, :, 0].mean(1)


def _rows(chosen: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Q) the positions of each row's chosen tokens (B, N), in order, and (B, Q) which of them
    are real (rows with fewer are padded)."""
    width = max(int(chosen.sum(1).max()), 1)
    index = ahead(chosen)[:, :width]
    return index, chosen.gather(1, index)


def _question(visual: Tensor, valid: Tensor) -> Tensor:
    """(B, L) the question of each row: real non-visual tokens after its last visual token."""
    position = torch.arange(visual.shape[1], device=visual.device)
    last_visual = torch.where(visual, position, -1).max(1).values
    has = visual.any(1)
    return valid & ~visual & (position[None] > last_visual[:, None]) & has[:, None]


def _host(module: nn.Module):
    """The Python module that defines `module`'s class: its own rotary function and cache type."""
    return sys.modules[type(module).__module__]


def _attention_rows(
    attn: nn.Module, hidden: Tensor, rotary: tuple[Tensor, Tensor], rows: Tensor, valid: Tensor
) -> Tensor:
    """(B, R, L) attention of the rows `rows` (B, R) to every token, mean over heads, from the layer's
    own projections and rotary embedding (the host module's functions), causal, padding masked."""
    host = _host(attn)
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


def _host_format(allowed: Tensor, host: Tensor | None, config) -> Tensor:
    """A boolean mask (True = attend) in the host's format: boolean for SDPA, additive for eager."""
    if (
        host is not None
        and host.dtype == torch.bool
        or host is None
        and config._attn_implementation == "sdpa"
    ):
        return allowed
    dtype = host.dtype if host is not None else torch.float32
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
