"""The public entry points: apply a method to a model, remove it, read the reduced tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .. import adapters
from ..adapters import Installed, SentencePatch
from ..core import Tokens, unmerge
from ..core.config import check_fitted_on, load_config
from ..core.schedule import LayerCountError
from ..methods import Method, available, make
from ..methods.options import declared

_ATTR = "_tokenfuse_patch"


def apply(
    model: nn.Module,
    method: str | Method | None = None,
    keep: float | None = None,
    *,
    config: str | Path | dict[str, Any] | None = None,
    temperature: float | None = None,
    protect_ids: Sequence[int] = (),
    vision: str | Method | None = None,
    vision_keep: float | None = None,
    **options: Any,
) -> nn.Module:
    """Patch `model` in place so it reduces tokens with `method` ("tome" unless a config is given),
    and return it.

    keep: fraction of token-layer work kept (1.0 = nothing removed; 0.5 unless given or a `schedule`
    option fixes it; both only if they agree). config: a configuration found by `tokenfuse
    calibrate` (its JSON path or dict). It defines the reduction: the method, every option of it
    (those it records, the others at their defaults), the schedule and so the work, and a
    classifier's temperature if one was fitted (for the model it was fitted on only). Giving any of
    these beside it is an error, since one of the two would be dropped; options that change no
    decision (track_source, static: `Option.decides`) may be added. To vary a configuration, pass
    its parts instead: apply(model, c["method"], schedule=c["schedule"], **c["options"], ...).
    temperature: divide a classifier's logits by it, to restore the confidence calibration that
    fewer tokens change.
    protect_ids: token ids never merged or removed, besides the first and last token ([CLS],
    [SEP]). Other options go to the method (`tokenfuse methods` lists them). Applying again
    replaces the previous method.

    A SentenceTransformer (its first module a Transformer around a supported encoder, then a
    Pooling): the encoder is patched as above (and keeps its own patch, for `embed`), and the Pooling
    is handed the token sizes, so `encode` pools the reduced tokens. Removing it removes both.

    Vision-language models (LLaVA): `method` is a visual-token operator or a list of them (one at
    the boundary, one in the LLM; `tokenfuse methods --visual` lists them), `keep` the fraction of
    each image's visual tokens kept; `vision` a token method run in the vision tower, at
    `vision_keep`. Either may be None, not both.
    """
    kind = adapters.target(model)  # refuses, naming it, a model no adapter serves
    if kind == "vlm":
        return _apply_vlm(model, method, keep, vision, vision_keep, config, temperature, protect_ids, options)
    if vision is not None or vision_keep is not None:
        raise ValueError(
            "vision= and vision_keep= apply to vision-language models (their vision tower); this is a "
            f"{kind} model: give its method as the second argument"
        )
    host = adapters.encoder_of(model) if kind == "sentence-transformers" else model
    source = None
    if config is not None:
        source = f"config {config}" if isinstance(config, str | Path) else "the config"
        config = load_config(config)
        options = _configured(config, source, method, keep, temperature, options)
        check_fitted_on(config, host, source)
        method, keep, temperature = config["method"], None, config.get("temperature", temperature)
    if keep is not None:
        options["keep"] = keep
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    method = make("tome" if method is None else method, **options)
    remove(model)
    remove(host)  # a SentenceTransformer's encoder may carry a patch of its own
    try:
        patch = adapters.install(model, method, protect_ids)
    except LayerCountError as err:
        if source is None:
            raise
        found = config.get("found", {}).get("model")
        raise ValueError(
            f"{source} holds a schedule for a {err.entries - 1}-layer model"
            f"{f' ({found})' if found else ''} and this model has {err.num_layers} layers: calibrate a "
            "configuration for this model (tokenfuse calibrate)"
        ) from None
    if temperature is not None:
        patch.hold(host.register_forward_hook(ScaleLogits(temperature)))
    if host is not model:  # the encoder keeps its own patch, for tokenfuse.embed
        setattr(host, _ATTR, patch.encoder)
    setattr(model, _ATTR, patch)
    return model


def _apply_vlm(
    model, method, keep, vision, vision_keep, config, temperature, protect_ids, options
) -> nn.Module:
    given = {"config": config, "temperature": temperature}
    if unknown := [k for k, v in given.items() if v is not None] + (["protect_ids"] if protect_ids else []):
        raise ValueError(f"{', '.join(unknown)} do not apply to a vision-language model's visual tokens")
    if method is None and vision is None:
        raise ValueError(
            "give a visual-token operator (method=...) or a vision-tower method (vision=...), or both"
        )
    named = [] if method is None else list(method) if isinstance(method, list | tuple) else [method]
    if options and len(named) > 1:
        raise ValueError("options go with one operator; for several, pass operator objects")
    if keep is not None:
        options["keep"] = keep
    for name in named:
        if isinstance(name, str) and name not in available("visual") and name in available():
            raise ValueError(
                f"unknown visual-token operator {name!r}: {name!r} is a token method, which runs inside the "
                f"vision tower: apply(model, vision={name!r}, vision_keep=0.5), alone or beside an operator; "
                f"visual-token operators: {', '.join(available('visual'))}"
            )
    methods = [make(m, kind="visual", **options) for m in named]
    tower = None
    if vision is not None:
        tower = make(vision, **({} if vision_keep is None else {"keep": vision_keep}))
    elif vision_keep is not None:
        raise ValueError("vision_keep was given without vision= (the token method for the vision tower)")
    remove(model)
    setattr(model, _ATTR, adapters.install(model, methods, vision_method=tower))
    return model


def _configured(
    config: dict[str, Any],
    source: str,
    method: str | Method | None,
    keep: float | None,
    temperature: float | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The method options a configuration sets, with the caller's additions; an error naming both
    sides for anything the caller gave that the configuration already sets."""
    made = make(config["method"], **config["options"], schedule=config["schedule"])
    decisive = {name for name, option in declared(type(made)).items() if option.spec.decides}
    sets = {"method": config["method"], **{k: v for k, v in made.options().items() if k in decisive}}
    if "temperature" in config:
        sets["temperature"] = config["temperature"]
    named = {"method": method, "keep": keep, "temperature": temperature}
    given = {**{k: v for k, v in named.items() if v is not None}, **options}
    clash = ", ".join(
        f"{k}={_shown(v)} (the config: {_shown(sets[k])})" for k, v in given.items() if k in sets
    )
    if clash:
        raise ValueError(
            f"{clash} given beside {source}, which sets the method, its options, the schedule (so the "
            "work) and any fitted temperature: give the config alone, or its parts without it "
            '(apply(model, c["method"], schedule=c["schedule"], **c["options"], ...)) to change them'
        )
    return {**config["options"], "schedule": config["schedule"], **options}


def _shown(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


@dataclass(frozen=True)
class ScaleLogits:
    """Forward hook dividing a classifier's logits by a temperature. A class, not a closure, so
    that a patched model can be deep-copied and pickled with it."""

    temperature: float

    def __call__(self, module: nn.Module, args: tuple, out: Any) -> Any:
        if isinstance(out, Tensor):  # timm classifiers return the logits
            return out / self.temperature
        if getattr(out, "logits", None) is None:
            raise TypeError("a temperature scales a classifier's logits, and this model returns none")
        out["logits"] = out.logits / self.temperature
        return out


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: every hook is taken away and the model computes exactly as before."""
    patch = getattr(model, _ATTR, None)
    if patch is not None:
        patch.remove()
        delattr(model, _ATTR)
        if isinstance(patch, SentencePatch) and patch_of(patch.encoder.model) is patch.encoder:
            delattr(patch.encoder.model, _ATTR)  # its hooks went with the SentenceTransformer's
    return model


def patch_of(model: nn.Module) -> Installed | None:
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


def kept(model: nn.Module) -> list[Tensor]:
    """Vision-language models: per image of this thread's last prompt, in prompt order, the indices
    (sorted) of its visual tokens that reached the LLM's last layers, counted in the image's tower
    output (LLaVA-1.5: 0..575, row-major over the patch grid). Other models refuse, saying what to read."""
    patch = patch_of(model)
    if patch is None:
        raise RuntimeError("no reduction to read: apply a visual-token operator and run the model first")
    return patch.kept()


def to_grid(model: nn.Module, x: Tensor) -> Tensor:
    """Dense outputs: map the last forward's reduced tokens x (B, N, C) back to every input position
    (B, N0, C), so that a dense head (segmentation, saliency) runs unchanged. Apply the method with
    track_source=True. Merged positions get the token they went into, pruned ones the mean of the
    surviving tokens; a method that brings its own reconstruction (Expedite) rebuilds every position
    with it (core.unmerge)."""
    return unmerge(x, last_tokens(model))
