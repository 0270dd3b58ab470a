"""Configuration files: a reduction found by `tokenfuse calibrate`, as JSON, read back by `apply`,
with the record of the model it was found on."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_config(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A calibrated configuration, from its JSON file or as a dict, checked enough to fail clearly."""
    if not isinstance(config, dict):
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"config file {path} not found; write it with: tokenfuse calibrate --out {path}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            hint = "rewrite it with tokenfuse calibrate"
            raise ValueError(f"config file {path} is not JSON ({err}); {hint}") from None
    missing = {"method", "options", "schedule"} - set(config)
    if missing:
        raise ValueError(f"config lacks {sorted(missing)}; it should come from `tokenfuse calibrate`")
    return config


#: relative difference of a parameter tensor's norm below which it counts as the same weights: a cast
#: to float16 or bfloat16 rounds each weight by at most 2**-9 of itself, so its norm by no more
WEIGHT_NORM_RTOL = 2**-8


def model_record(model: nn.Module) -> dict[str, Any]:
    """What identifies the model a configuration was found on, for its `model` field: a fitted
    temperature holds for that model's logits alone (`check_fitted_on`).

    Compared: the model's class, its parameter count and the norm of each parameter tensor, which
    tell apart architectures, heads and checkpoints whatever the path the model was loaded from,
    and survive a cast to half precision (WEIGHT_NORM_RTOL); a checkpoint that moved no tensor by
    that much (a very short fine-tune) passes for the same. Recorded for the reader only: the
    Hugging Face `_name_or_path`, a hub id or a local path that names the same weights differently
    on each machine (and the packaged models by their install path), so it is not compared.
    """
    params = list(model.parameters())
    return {
        "class": type(model).__name__,
        "name": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "parameters": sum(p.numel() for p in params),
        "weight_norms": [float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)) for p in params],
    }


def check_fitted_on(config: dict[str, Any], model: nn.Module, label: str) -> None:
    """Refuse a configuration's temperature for a model other than the one it was fitted on."""
    if "temperature" not in config:
        return
    drop = "or drop 'temperature' from the config to apply its reduction alone"
    found = config.get("model")
    if not isinstance(found, dict) or not {"class", "parameters", "weight_norms"} <= set(found):
        raise ValueError(
            f"{label} carries a temperature but no record of the model it was fitted on ('model'), so "
            f"it cannot be checked against this one: recalibrate with --fit-temperature, {drop}"
        )
    this = model_record(model)
    names = [name for name, _ in model.named_parameters()]
    if found["class"] != this["class"]:
        differs = f"a {found['class']}, this model is a {this['class']}"
    elif (found["parameters"], len(found["weight_norms"])) != (this["parameters"], len(names)):
        differs = f"{found['parameters']:,} parameters, this model has {this['parameters']:,}"
    else:
        pairs = zip(names, found["weight_norms"], this["weight_norms"], strict=True)
        moved = [(n, a, b) for n, a, b in pairs if not math.isclose(a, b, rel_tol=WEIGHT_NORM_RTOL)]
        if not moved:
            return
        name, a, b = moved[0]
        differs = f"{len(moved)} weight tensors differ, {name} first (norm {a:.6g}, here {b:.6g})"
    fitted = found.get("name") or found["class"]
    raise ValueError(
        f"{label} carries a temperature fitted on another model ({fitted}: {differs}), and a "
        f"temperature holds for the logits of its own model alone. Fit one for this model "
        f"(tokenfuse calibrate --fit-temperature), {drop}"
    )
