"""Embedding texts with a (possibly reduced) encoder: tokenization, length-sorted batches, pooling."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core import pool_mean
from .patching import patch_of
from .progress import progress_bar

POOLINGS = ("auto", "mean", "cls")


@dataclass(frozen=True)
class Batch:
    """One batch of an encoding pass: which texts, their embeddings, and the tokens each layer
    processed for each text (entering attention, entering the MLP), shape (layers, 2, B)."""

    index: list[int]
    embedding: Tensor
    layer_tokens: Tensor


def model_max_length(model: nn.Module, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    if getattr(model.config, "model_type", None) in ("roberta", "xlm-roberta"):
        limits[0] -= 2  # position ids start after the padding index
    return min(n for n in limits if n is not None and n < 1_000_000)


def tokenize(tokenizer, texts: Sequence[str], max_length: int, prefix: float = 1.0) -> list[list[int]]:
    """Token ids with special tokens, truncated to max_length (with a warning saying how many).

    prefix < 1 keeps only the first fraction of each text's tokens, special tokens included: the
    truncation baseline, which feeds the model as much as `prefix` of the work.
    """
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, expected str")
        if not text.strip():
            raise ValueError(f"text {i} is empty; drop it or give it some content")
    lead, trail = _special_counts(tokenizer)
    specials = lead + trail
    full = tokenizer(list(texts), verbose=False)["input_ids"]
    too_long = sum(len(ids) > max_length for ids in full)
    if too_long:
        warnings.warn(
            f"{too_long} of {len(texts)} texts are longer than {max_length} tokens (max_length) "
            "and were truncated to it",
            stacklevel=3,
        )
    out = []
    for ids in full:
        n = min(len(ids), max_length) - specials
        if prefix < 1.0:
            n = max(1, round(prefix * (n + specials)) - specials)
        out.append(ids[: lead + n] + ids[len(ids) - trail :])
    return out


def _special_counts(tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text ([CLS] ... [SEP])."""
    probe = tokenizer("a", verbose=False)["input_ids"]
    content = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    lead = next(i for i in range(len(probe)) if probe[i : i + len(content)] == content)
    return lead, len(probe) - lead - len(content)


def pooling_of(model: nn.Module) -> str:
    """The model's own pooling: from a sentence-transformers folder if there is one, else mean."""
    folder = Path(str(getattr(model.config, "_name_or_path", "")))
    config = folder / "1_Pooling" / "config.json"
    if config.is_file():
        modes = json.loads(config.read_text())
        if modes.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def encode_batches(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
    pooling: str = "auto",
    prefix: float = 1.0,
) -> Iterator[Batch]:
    """Embed texts batch by batch, longest first (similar lengths share a batch: less padding)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "auto":
        pooling = pooling_of(model)
    for index, batch in padded_batches(model, tokenizer, texts, batch_size, max_length, prefix):
        yield encode_padded(model, index, batch, pooling)


def padded_batches(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    max_length: int | None = None,
    prefix: float = 1.0,
) -> list[tuple[list[int], dict[str, Tensor]]]:
    """The work before the model, done at once (the bench keeps it off its clock): token ids in
    length-sorted batches, padded and on the model's device, each with the texts it holds."""
    limit = model_max_length(model, tokenizer)
    if max_length is None:
        max_length = limit
    elif max_length > limit:
        warnings.warn(
            f"max_length {max_length} exceeds the model's maximum {limit}; using {limit}", stacklevel=4
        )
        max_length = limit
    ids = tokenize(tokenizer, texts, max_length, prefix)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device = next(model.parameters()).device
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in index]}, return_tensors="pt")
        batches.append((index, {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}))
    return batches


@torch.inference_mode()
def encode_padded(model: nn.Module, index: list[int], batch: dict[str, Tensor], pooling: str) -> Batch:
    """The model and the pooling ("mean" or "cls") on one batch of `padded_batches`."""
    mask = batch["attention_mask"]
    out = model(input_ids=batch["input_ids"], attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    patch = patch_of(model)
    if patch is None:
        size, layer_tokens = mask, mask.sum(-1).expand(model.config.num_hidden_layers, 2, -1)
    else:
        size = patch.tokens.size
        layer_tokens = patch.layer_tokens()
    emb = hidden[:, 0] if pooling == "cls" else pool_mean(hidden, size)
    return Batch(index=index, embedding=emb.float(), layer_tokens=layer_tokens)


def embed(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
    pooling: str = "auto",
    progress: bool | None = None,
) -> Tensor:
    """One embedding per text (rows in input order), by the model's own pooling made size-aware,
    whether or not a reduction is applied. Shows a progress bar for long inputs (progress=None)."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("no texts to embed")
    out: Tensor | None = None
    show = len(texts) > 4 * batch_size if progress is None else progress
    with progress_bar(show) as bar:
        task = bar.add_task("embedding", total=len(texts))
        for batch in encode_batches(model, tokenizer, texts, batch_size, max_length, pooling):
            if out is None:
                out = batch.embedding.new_empty(len(texts), batch.embedding.shape[-1])
            out[batch.index] = batch.embedding
            bar.advance(task, len(batch.index))
    return out
