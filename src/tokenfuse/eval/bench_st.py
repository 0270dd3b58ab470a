"""`tokenfuse bench --task st`: one reduction through sentence-transformers' `encode` and through
`tokenfuse.embed`, timed in the same run, on the packaged all-MiniLM-L6-v2 loaded as a
SentenceTransformer (Transformer, mean Pooling, Normalize) and BBC News.

Every configuration (the full model, then each method at each keep) runs, in each timing round of
`measure`'s protocol (warm-up, interleaved rounds, median):
- embed: what `tokenfuse bench` times (`encode_padded`: the encoder and tokenfuse's pooling, on
  batches tokenized and length-sorted by token count before the clock), on the encoder inside the
  SentenceTransformer, with the method applied to that encoder;
- encode: `SentenceTransformer.encode(texts, batch_size)` with the method applied to the
  SentenceTransformer; its clock covers the whole call, as a user's runs it: its own tokenization
  and its length sort (by characters) included.
Rows: speedup (embed), encode speedup, encode/embed (the ratio of the two: 1 where encode gains
what the embed path gains), and how far encode's embeddings are from embed's normalized ones (the
model's Normalize): the largest absolute difference of any coordinate, and the smallest cosine.
Tokens and FLOPs come from the embed pass (encode hands back no per-text trace).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..api.pipeline import pooling_of
from ..api.progress import progress_bar
from ..api.text import encode_padded, padded_batches
from ..assets import text as data
from . import measure, meta, metrics
from .measure import Config, Pass

BASELINES = ("full",)


@dataclass
class STTask:
    """Documents through a SentenceTransformer two ways (`measure.Task`): `tokenfuse.embed`'s path on
    its encoder, and its own `encode`."""

    st: nn.Module
    texts: list[str]
    batch_size: int
    max_length: int
    name: str = "minilm"

    def __post_init__(self) -> None:
        self.model = self.st[0].auto_model  # the encoder: the embed path runs it, FLOPs read its config
        self.tokenizer = self.st.tokenizer
        self.st.max_seq_length = self.max_length  # encode truncates where embed does
        self.pooling = pooling_of(self.model)

    @cached_property
    def batches(self) -> list[tuple[list[int], dict[str, Tensor]]]:
        """The embed path's batches, made on the first pass (its truncation warning becomes a note)."""
        return padded_batches(self.model, self.tokenizer, self.texts, self.batch_size, self.max_length)

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        batches = self.batches[: 1 if warm_up else None]
        order = [i for index, _ in batches for i in index]
        texts = [self.texts[i] for i in sorted(order)]  # in input order, as embed's outputs come
        baseline = config.method in BASELINES
        embed = measure.run_pass(self.model, config, baseline, batches, self._embed, order)
        encode = measure.run_pass(self.st, config, baseline, [texts], self._encode)
        return dataclasses.replace(
            embed,
            outputs={**embed.outputs, "encode": encode.outputs["embedding"]},
            extra={"encode": encode.seconds},
        )

    def _embed(self, batch: tuple[list[int], dict[str, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
        out = encode_padded(self.model, *batch, self.pooling)
        return {"embedding": out.embedding}, out.layer_tokens

    def _encode(self, texts: list[str]) -> tuple[dict[str, Tensor], Tensor]:
        """encode over every text at once; the trace is NaN, encode keeps only its last batch's."""
        emb = self.st.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            show_progress_bar=False,
        )
        trace = torch.full((self.model.config.num_hidden_layers, 2, len(texts)), float("nan"))
        return {"embedding": emb}, trace

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        return timed

    def head(self, config: Config) -> dict[str, Any]:
        return {"name": config.title}

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict[str, Any]:
        embed, encode = quality.outputs["embedding"], quality.outputs["encode"]
        cosine = metrics.cosine_rows(embed, full.outputs["embedding"])
        embed = embed / np.linalg.norm(embed, axis=1, keepdims=True)
        return {
            "cosine": float(cosine.mean()),
            "encode_max_diff": float(np.abs(encode - embed).max()),
            "encode_min_cosine": float(metrics.cosine_rows(encode, embed).min()),
        }


def load() -> nn.Module:
    """The packaged all-MiniLM-L6-v2 as a SentenceTransformer, on the CPU, offline."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ValueError("the st bench needs sentence-transformers: pip install 'tokenfuse[st]'") from None
    return SentenceTransformer(str(data.minilm_path()), device="cpu", local_files_only=True)


def run(
    methods: str = "tome",
    keeps: tuple[float, ...] = (0.5,),
    max_length: int = 512,
    batch_size: int = 16,
    limit: int | None = 400,
    repeats: int = 3,
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the bench and return its results as a JSON-ready dict ({"meta", "rows", "notes"}).
    limit: the first BBC documents (None: all)."""
    measure.check_positive(max_length=max_length, limit=limit, batch_size=batch_size, repeats=repeats)
    configs = measure.configs_for(
        measure.method_names(methods, BASELINES), list(keeps), options or {}, BASELINES
    )
    texts = data.bbc_news(limit).texts
    task = STTask(load(), texts, batch_size, max_length)
    with progress_bar(progress) as bar:
        rows, notes = measure.compare(task, configs, repeats, bar)
    for row in rows:
        row["encode_ratio"] = row["encode_speedup"] / row["speedup"]
    arguments = meta.arguments(
        "st",
        methods,
        keeps,
        limit,
        batch_size,
        repeats,
        options,
        model="minilm",
        data=["bbc"],
        max_length=max_length,
        documents=len(texts),
    )
    return meta.results(rows, notes, arguments)
