"""`tokenfuse bench`: speed and quality of reduction methods side by side, against the unreduced
model and the baselines a user would otherwise pick.

Every configuration embeds the same documents through the same code path (`encode_padded`, the
model and its pooling), timed by the protocol of `measure`: the documents are tokenized once per
configuration (truncation keeps a different prefix) before the clock starts, so that timings differ
only by the model's work and the method's own overhead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..api.progress import progress_bar
from ..api.text import encode_padded, padded_batches, pooling_of
from ..assets import text as data
from ..core.config import load_config
from . import measure, metrics
from .measure import Config, Pass

BASELINES = ("full", "truncation")
DATASETS = ("bbc", "lp50")
KNN = 10  # neighbours of the BBC topic accuracy


@dataclass
class TextTask:
    """Documents through a text encoder (`measure.Task`): timed on `texts`, whose embeddings give the
    cosine to the full model and, with `labels`, the topic k-NN accuracy; LP50 correlations come
    from a pass of their own."""

    name: str
    model: nn.Module
    tokenizer: Any
    texts: Sequence[str]
    batch_size: int
    max_length: int | None
    labels: np.ndarray | None = None
    lp: data.Similarity | None = None
    _batches: dict[tuple[str, float], list] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.pooling = pooling_of(self.model)

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        return self._pass(config, "texts", warm_up)

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        return timed

    def head(self, config: Config) -> dict[str, Any]:
        return {"name": config.title}

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict[str, Any]:
        emb = quality.outputs["embedding"]
        row = {"cosine": float(metrics.cosine_rows(emb, full.outputs["embedding"]).mean())}
        if self.labels is not None:
            row.update(measure.knn_column("bbc_knn_acc", emb, self.labels, KNN))
        if self.lp is not None:
            e = self._pass(config, "lp").outputs["embedding"]
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            sims = (e[self.lp.pairs[:, 0]] * e[self.lp.pairs[:, 1]]).sum(1)
            row["lp50_pearson"] = metrics.pearson(sims, self.lp.scores)
            row["lp50_spearman"] = metrics.spearman(sims, self.lp.scores)
        return row

    def _pass(self, config: Config, which: str, warm_up: bool = False) -> Pass:
        """A pass over `which` texts ("texts" or "lp"), tokenized once per prefix."""
        prefix = config.keep if config.method == "truncation" else 1.0
        if (which, prefix) not in self._batches:
            texts = self.texts if which == "texts" else self.lp.texts
            self._batches[which, prefix] = padded_batches(
                self.model, self.tokenizer, texts, self.batch_size, self.max_length, prefix
            )
        batches = self._batches[which, prefix][: 1 if warm_up else None]
        order = [i for index, _ in batches for i in index]
        return measure.run_pass(self.model, config, config.method in BASELINES, batches, self._forward, order)

    def _forward(self, batch: tuple[list[int], dict[str, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
        out = encode_padded(self.model, *batch, self.pooling)
        return {"embedding": out.embedding}, out.layer_tokens


def run(
    model_name: str = "minilm",
    datasets: tuple[str, ...] = DATASETS,
    methods: str = "tome,truncation,random",
    keeps: tuple[float, ...] = (0.5,),
    max_length: int | None = 512,
    batch_size: int = 16,
    limit: int | None = 400,
    repeats: int = 3,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    config: str | None = None,
) -> dict[str, Any]:
    """Run the bench and return its results as a JSON-ready dict ({"meta", "rows", "notes"}).
    limit: the first BBC documents (None: all); config: a `tokenfuse calibrate` configuration,
    benched as one more row named "config"."""
    unknown = set(datasets) - set(DATASETS)
    if unknown or not datasets:
        raise ValueError(f"unknown data set(s) {sorted(unknown)}; choose from: {', '.join(DATASETS)}")
    measure.check_positive(max_length=max_length, limit=limit, batch_size=batch_size, repeats=repeats)
    configs = measure.configs_for(
        measure.method_names(methods, BASELINES), list(keeps), options or {}, BASELINES
    )
    if config is not None:
        found = load_config(config)
        schedule = {"schedule": found["schedule"]}
        configs.append(
            Config(found["method"], found["keep"], {**found["options"], **schedule}, name="config")
        )
    model, tokenizer = data.load_text_model(model_name)
    bbc = data.bbc_news(limit) if "bbc" in datasets else None
    lp = data.lp50() if "lp50" in datasets else None
    timed = bbc.texts if bbc else lp.texts
    labels = bbc.labels if bbc else None
    task = TextTask(model_name, model, tokenizer, timed, batch_size, max_length, labels, lp)
    with progress_bar(progress) as bar:
        rows, notes = measure.compare(task, configs, repeats, bar)
    meta = {
        **measure.environment(),
        "arguments": {
            "model": model_name,
            "data": list(datasets),
            "methods": methods,
            "keeps": list(keeps),
            "max_length": max_length,
            "batch_size": batch_size,
            "limit": limit,
            "repeats": repeats,
            "options": options or {},
            "config": config,
            "documents": len(timed),
        },
    }
    return {"meta": meta, "rows": rows, "notes": notes}
