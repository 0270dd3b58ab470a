"""Fashion-MNIST and a small ViT trained on it, so that token reduction can be measured on images.

The data come from the Debian package `dataset-fashion-mnist` (IDX files, read here with numpy); the
classifier's weights are committed under `tokenfuse/weights/fmnist_vit/` and were made by
`scripts/train_fmnist.py` (see TRAINING.md there). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .packages import MissingAsset

if TYPE_CHECKING:
    from transformers import ViTForImageClassification

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
WEIGHTS_DIR = Path(__file__).parent / "weights" / "fmnist_vit"

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# Pixel mean and std of the 60k training images (scaled to [0, 1]); the classifier was trained on these.
MEAN = 0.2860406
STD = 0.3530242

_SPLITS = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def _read(path: Path) -> bytes:
    """Read an IDX file whether or not it is gzipped (Debian ships .gz; hand-unpacked copies are plain)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err})") from err
    return raw


def _parse(path: Path, magic: int, dims: int) -> np.ndarray:
    """Check the IDX header (magic number, sizes) so that a truncated or wrong file fails loudly."""
    raw = _read(path)
    header = 4 + 4 * dims
    if len(raw) < header:
        raise ValueError(f"{path}: corrupt IDX file ({len(raw)} bytes, shorter than its header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: corrupt IDX file (magic number {found}, expected {magic})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: corrupt IDX file (header says {shape}, {len(raw) - header} data bytes)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise MissingAsset(
        f"Fashion-MNIST file {stem}(.gz) not found in {folder}; install it with: "
        "apt-get install dataset-fashion-mnist  (or pass path= the folder holding the IDX files)"
    )


def load(
    split: str = "test", path: str | Path | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of a split, in file order; `limit` keeps the first
    items (the test set is class-balanced overall, not in every prefix)."""
    if split not in _SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid splits: {sorted(_SPLITS)}")
    folder = Path(path) if path is not None else DEFAULT_DIR
    prefix = _SPLITS[split]
    images = _parse(_find(folder, f"{prefix}-images-idx3-ubyte"), _IMAGES_MAGIC, 3)
    labels = _parse(_find(folder, f"{prefix}-labels-idx1-ubyte"), _LABELS_MAGIC, 1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"{folder}: {split} images {images.shape} do not match labels {labels.shape}")
    if labels.max(initial=0) >= len(CLASSES):
        raise ValueError(f"{folder}: {split} labels outside 0..{len(CLASSES) - 1}")
    return images[:limit].copy(), labels[:limit].astype(np.int64)


def to_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) images -> the classifier's `pixel_values` (N, 1, 28, 28), normalized as in
    training."""
    x = torch.as_tensor(images).float().div(255.0)
    return ((x - MEAN) / STD).unsqueeze(1)


def load_classifier() -> ViTForImageClassification:
    """The committed Fashion-MNIST ViT (transformers.ViTForImageClassification), in eval mode; read from
    the package folder only, never from a hub."""
    from transformers import ViTForImageClassification  # lazy: transformers is slow to import
    from transformers.utils import logging

    logging.disable_progress_bar()

    if not (WEIGHTS_DIR / "model.safetensors").is_file():
        raise MissingAsset(f"no classifier weights in {WEIGHTS_DIR}; run scripts/train_fmnist.py --out there")
    model = ViTForImageClassification.from_pretrained(
        WEIGHTS_DIR, local_files_only=True, attn_implementation="sdpa"
    )
    return model.eval()
