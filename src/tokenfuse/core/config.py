"""Configuration files: a reduction found by `tokenfuse calibrate`, as JSON, read back by `apply`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
