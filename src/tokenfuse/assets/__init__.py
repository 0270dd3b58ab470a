"""Packaged models and data sets, loaded offline from installed registry packages."""

from .packages import MissingAsset

__all__ = ["MissingAsset"]
