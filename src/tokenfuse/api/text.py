"""Embedding texts with a (possibly reduced) encoder: tokenization, length-sorted batches, pooling."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import pool_mean
from .patching import patch_of
from .pipeline import POOLINGS, pipeline_of
from .progress import progress_bar


class TruncationWarning(UserWarning):
    """Some texts were longer than max_length and were cut to it; `count` of `total`."""

    def __init__(self, count: int, total: int, max_length: int):
        super().__init__(
            f"{count} of {total} texts are longer than {max_length} tokens (max_length) and were "
            "truncated to it"
        )
        self.count = count


@dataclass(frozen=True)
class Batch:
    """One batch of an encoding pass: which texts, their embeddings, and the tokens each layer
    processed for each text (entering attention, entering the MLP), shape (layers, 2, B)."""

    index: list[int]
    embedding: Tensor
    layer_tokens: Tensor


def model_max_length(model: nn.Module, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    if getattr(model.config, "model_type", None) in ("roberta", "xlm-roberta", "mpnet"):
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
    if max_length <= specials:
        raise ValueError(
            f"max_length {max_length} leaves no room for text: the tokenizer adds {specials} special "
            f"tokens; give at least {specials + 1}"
        )
    full = tokenizer([str(t) for t in texts], verbose=False)["input_ids"]  # numpy's str_ as str
    too_long = sum(len(ids) > max_length for ids in full)
    if too_long:
        warnings.warn(TruncationWarning(too_long, len(texts), max_length), stacklevel=3)
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


def pool(hidden: Tensor, size: Tensor, pooling: str) -> Tensor:
    """(B, N, C) last hidden state, (B, N) token sizes (0: padding) -> (B, C): each pooling as
    sentence-transformers computes it on the full model, made size-aware so that a reduced model's
    merged tokens count for the tokens they stand for.

    mean: size-weighted mean. mean_sqrt_len_tokens: the size-weighted sum over the square root of the
    original length (sizes sum to it). cls, lasttoken: the first, the last real token; every adapter
    keeps both as they are. max: per feature, the max over real tokens; a merged token holds the
    size-weighted average of what it merged, so on a reduced model this is a max over merged
    features, not over the original tokens' features (which are gone).
    """
    if pooling == "mean":
        return pool_mean(hidden, size)
    weight = size.to(hidden.dtype)[..., None]
    if pooling == "mean_sqrt_len_tokens":
        return (hidden * weight).sum(1) / weight.sum(1).clamp_min(1e-9).sqrt()
    real = size > 0
    if pooling == "max":
        return hidden.masked_fill(~real[..., None], float("-inf")).amax(1)
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    if pooling == "cls":
        index = torch.where(real, positions, real.shape[1]).amin(1)
    elif pooling == "lasttoken":
        index = torch.where(real, positions, -1).amax(1)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return hidden[torch.arange(len(hidden), device=hidden.device), index]


def encode_batches(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
    pooling: str = "auto",
    prefix: float = 1.0,
    normalize: bool | None = None,
) -> Iterator[Batch]:
    """Embed texts batch by batch, longest first (similar lengths share a batch: less padding), by
    the model's own pipeline (`pipeline_of`) with what `pooling` and `normalize` force."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_length is not None and not isinstance(max_length, int):
        raise TypeError(f"max_length must be an int (tokens) or None, got {type(max_length).__name__}")
    pipeline = pipeline_of(model, pooling, normalize)
    for index, batch in padded_batches(model, tokenizer, texts, batch_size, max_length, prefix):
        yield encode_padded(model, index, batch, pipeline.pooling, pipeline.normalize)


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
def encode_padded(
    model: nn.Module, index: list[int], batch: dict[str, Tensor], pooling: str, normalize: bool = False
) -> Batch:
    """The model and the pooling (`pool`) on one batch of `padded_batches`, L2-normalised if
    `normalize` (as sentence-transformers' Normalize and `encode(normalize_embeddings=True)` do)."""
    mask = batch["attention_mask"]
    out = model(input_ids=batch["input_ids"], attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    size, layer_tokens = sizes_and_trace(model, mask)
    emb = pool(hidden, size, pooling).float()
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return Batch(index=index, embedding=emb, layer_tokens=layer_tokens)


def sizes_and_trace(model: nn.Module, mask: Tensor) -> tuple[Tensor, Tensor]:
    """After the model's forward on a batch with padding mask (B, N): the size of each output token
    (B, N'), to pool by, and the tokens each layer processed (layers, 2, B); the mask itself and
    every real token at every layer where the model is not reduced."""
    patch = patch_of(model)
    if patch is None:
        return mask, mask.sum(-1).expand(model.config.num_hidden_layers, 2, -1)
    return patch.tokens.size, patch.layer_tokens()


def embed(
    model: nn.Module,
    tokenizer,
    texts: str | Iterable[str],
    batch_size: int = 32,
    max_length: int | None = None,
    pooling: str = "auto",
    normalize: bool | None = None,
    progress: bool | None = None,
) -> Tensor:
    """One embedding per text (rows in input order), by the model's own pipeline (`pipeline_of`):
    its pooling made size-aware (`pool`), then L2 normalisation where the model ends in Normalize,
    whether or not a reduction is applied; `pooling` and `normalize` (True/False) force either.
    texts: one str, or any iterable of str (a list, a generator, a numpy array of strings). Shows a
    progress bar for long inputs (progress=None)."""
    texts = _text_list(texts)
    if not texts:
        raise ValueError("no texts to embed")
    out: Tensor | None = None
    show = len(texts) > 4 * batch_size if progress is None else progress
    with progress_bar(show) as bar:
        task = bar.add_task("embedding", total=len(texts))
        for batch in encode_batches(
            model, tokenizer, texts, batch_size, max_length, pooling, normalize=normalize
        ):
            if out is None:
                out = batch.embedding.new_empty(len(texts), batch.embedding.shape[-1])
            out[batch.index] = batch.embedding
            bar.advance(task, len(batch.index))
    return out


def _text_list(texts: str | Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, bytes | bytearray):
        raise TypeError("texts are bytes; decode them to str first")
    try:
        return list(texts)
    except TypeError:
        raise TypeError(f"texts must be a str or an iterable of str, got {type(texts).__name__}") from None
