"""The public entry points: apply a method to a model, remove it, read the reduced tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .. import adapters
from ..core import Tokens, unmerge
from ..core.config import load_config
from ..methods import Method, make

_ATTR = "_tokenfuse_patch"


def apply(
    model: nn.Module,
    method: str | Method = "tome",
    keep: float | None = None,
    *,
    config: str | Path | dict[str, Any] | None = None,
    temperature: float | None = None,
    protect_ids: Sequence[int] = (),
    **options: Any,
) -> nn.Module:
    """Patch `model` in place so it reduces tokens with `method`, and return it.

    keep: fraction of token-layer work kept (1.0 = nothing removed). config: a configuration found
    by `tokenfuse calibrate` (its JSON path or dict), which sets the method, its options and its
    schedule, and a classifier's temperature if it was fitted. temperature: divide a classifier's
    logits by it, to restore the confidence calibration that fewer tokens change. protect_ids: token
    ids never merged or removed, besides the first and last token ([CLS], [SEP]). Other options go
    to the method (`tokenfuse methods` lists them). Applying again replaces the previous method.
    """
    if config is not None:
        config = load_config(config)
        method, keep = config["method"], None
        options = {**config["options"], "schedule": config["schedule"], **options}
        temperature = config.get("temperature") if temperature is None else temperature
    if keep is not None:
        options["keep"] = keep
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    method = make(method, **options)
    remove(model)
    patch = adapters.install(model, method, protect_ids)
    if temperature is not None:
        patch.hold(model.register_forward_hook(_scale_logits(temperature)))
    setattr(model, _ATTR, patch)
    return model


def _scale_logits(temperature: float):
    def hook(module: nn.Module, args: tuple, out):
        if isinstance(out, Tensor):  # timm classifiers return the logits
            return out / temperature
        if getattr(out, "logits", None) is None:
            raise TypeError("a temperature scales a classifier's logits, and this model returns none")
        out["logits"] = out.logits / temperature
        return out

    return hook


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: every hook is taken away and the model computes exactly as before."""
    patch = getattr(model, _ATTR, None)
    if patch is not None:
        patch.remove()
        delattr(model, _ATTR)
    return model


def patch_of(model: nn.Module) -> adapters.Patch | None:
    return getattr(model, _ATTR, None)


def last_tokens(model: nn.Module) -> Tokens:
    """Token state (sizes, protected, sources) of the patched model's last forward in the calling
    thread (each thread reads its own, so concurrent calls do not mix)."""
    patch = patch_of(model)
    if patch is None or patch.tokens is None:
        raise RuntimeError("no reduced forward to read: apply a method and run the model first")
    return patch.tokens


def token_sizes(model: nn.Module) -> Tensor:
    """(B, N) how many input tokens each output token of this thread's last forward stands for
    (0 = padding); use it to pool a reduced output. Once tokens were reduced, the real ones come
    first in every row: a left-padded input comes out right-padded."""
    return last_tokens(model).size


def to_grid(model: nn.Module, x: Tensor) -> Tensor:
    """Dense outputs: map the last forward's reduced tokens x (B, N, C) back to every input position
    (B, N0, C), so that a dense head (segmentation, saliency) runs unchanged. Apply the method with
    track_source=True. Pruned positions get the mean of the surviving tokens (engine.unmerge)."""
    return unmerge(x, last_tokens(model))
