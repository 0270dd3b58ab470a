"""`tokenfuse bench`: speed and quality of reduction methods side by side, against the unreduced
model and the baselines a user would otherwise pick.

Every configuration embeds the same documents through the same code path (`encode_batches`), so
timings differ only by the model's work and the method's own overhead. Timing rounds are
interleaved (each round runs every configuration once) and the median per configuration is kept;
speedups are ratios to the full model's median from the same run.
"""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..api import apply, patch_of, remove
from ..api.progress import progress_bar
from ..api.text import encode_batches
from ..assets import text as data
from ..core.config import load_config
from ..methods import available
from . import metrics

BASELINES = ("full", "truncation")
DATASETS = ("bbc", "lp50")


@dataclass(frozen=True)
class Config:
    method: str
    keep: float
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # how results call it; the method's name unless set

    @property
    def title(self) -> str:
        return self.name or self.method

    @property
    def label(self) -> str:
        return "full" if self.method == "full" else f"{self.title} @ {self.keep:g}"


def method_names(spec: str, baselines: tuple[str, ...] = BASELINES) -> list[str]:
    """A comma list of method names; 'all' stands for every registered method and baseline."""
    known = [*baselines, *available()]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if "all" in names:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from: all, {', '.join(known)}")
    return names


def configs_for(
    methods: list[str], keeps: list[float], options: dict[str, Any], baselines: tuple[str, ...] = BASELINES
) -> list[Config]:
    """The full model first, then every method at every keep; fails on a bad keep or option now,
    before any long work."""
    out = [Config("full", 1.0)]
    for keep in keeps:
        out += [Config(m, keep, {} if m in baselines else options) for m in methods if m != "full"]
    for config in out[1:]:
        if config.method not in baselines:
            available()[config.method](keep=config.keep, **config.options)
    return out


@dataclass
class Pass:
    """One encoding pass of one configuration over a document set."""

    embeddings: np.ndarray
    layer_tokens: np.ndarray  # (docs, layers, 2): tokens entering attention and the MLP
    seconds: float
    scoring: float  # share of the time spent in the method's decisions


def encode(model, tokenizer, texts, config: Config, batch_size: int, max_length: int) -> Pass:
    if config.method in BASELINES:
        remove(model)
    else:
        apply(model, config.method, keep=config.keep, **config.options)
    prefix = config.keep if config.method == "truncation" else 1.0
    emb = layer_tokens = None
    start = time.perf_counter()
    for batch in encode_batches(model, tokenizer, texts, batch_size, max_length, prefix=prefix):
        if emb is None:
            emb = np.empty((len(texts), batch.embedding.shape[1]), dtype=np.float32)
            layer_tokens = np.empty((len(texts), *batch.layer_tokens.shape[:2]), dtype=np.int64)
        emb[batch.index] = batch.embedding.numpy()
        layer_tokens[batch.index] = batch.layer_tokens.permute(2, 0, 1).numpy()
    seconds = time.perf_counter() - start
    patch = patch_of(model)
    scoring = patch.decide_seconds / seconds if patch else 0.0
    remove(model)
    return Pass(emb, layer_tokens, seconds, scoring)


def run(
    model_name: str = "minilm",
    datasets: tuple[str, ...] = ("bbc", "lp50"),
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
    config: a `tokenfuse calibrate` configuration, benched as one more row named "config"."""
    unknown = set(datasets) - set(DATASETS)
    if unknown or not datasets:
        raise ValueError(f"unknown data set(s) {sorted(unknown)}; choose from: {', '.join(DATASETS)}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    configs = configs_for(method_names(methods), list(keeps), options or {})
    if config is not None:
        found = load_config(config)
        schedule = {"schedule": found["schedule"]}
        configs.append(
            Config(found["method"], found["keep"], {**found["options"], **schedule}, name="config")
        )
    model, tokenizer = data.load_text_model(model_name)
    bbc = data.bbc_news(limit) if "bbc" in datasets else None
    lp = data.lp50() if "lp50" in datasets else None
    rows, notes = measure(model, tokenizer, configs, bbc, lp, batch_size, max_length, repeats, progress)
    meta = {
        **environment(),
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
            "documents": len(bbc.texts if bbc else lp.texts),
        },
    }
    return {"meta": meta, "rows": rows, "notes": notes}


def measure(
    model,
    tokenizer,
    configs: list[Config],
    bbc: data.Labelled | None,
    lp: data.Pairs | None,
    batch_size: int,
    max_length: int | None,
    repeats: int,
    progress: bool,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of speed and quality for each configuration (the first must be the full model), timed on
    the BBC documents (else the LP50 ones) in interleaved rounds; notes from warnings on the way."""
    timing_texts = bbc.texts if bbc else lp.texts
    passes: list[list[Pass]] = [[] for _ in configs]
    lp_emb: list[np.ndarray] = []
    with progress_bar(progress) as bar, warnings.catch_warnings(record=True) as caught:
        task = bar.add_task("warm-up", total=len(configs) * (repeats + (lp is not None)) + 1)
        warnings.simplefilter("ignore")
        encode(model, tokenizer, timing_texts[:batch_size], configs[0], batch_size, max_length)
        bar.advance(task)
        warnings.simplefilter("always")
        for r in range(repeats):
            for i, config in enumerate(configs):
                bar.update(task, description=f"round {r + 1}/{repeats}: {config.label}")
                passes[i].append(encode(model, tokenizer, timing_texts, config, batch_size, max_length))
                bar.advance(task)
        if lp is not None:
            for config in configs:
                bar.update(task, description=f"LP50: {config.label}")
                lp_emb.append(encode(model, tokenizer, lp.texts, config, batch_size, max_length).embeddings)
                bar.advance(task)
    notes = sorted({str(w.message) for w in caught})

    full = passes[0][0]
    full_time = statistics.median(p.seconds for p in passes[0])
    hidden, inter = model.config.hidden_size, metrics.mlp_width(model.config)
    full_tokens = full.layer_tokens.mean(-1).sum()
    full_flops = metrics.encoder_flops(full.layer_tokens[..., 0], full.layer_tokens[..., 1], hidden, inter)
    rows = []
    for i, config in enumerate(configs):
        first = passes[i][0]
        seconds = statistics.median(p.seconds for p in passes[i])
        flops = metrics.encoder_flops(first.layer_tokens[..., 0], first.layer_tokens[..., 1], hidden, inter)
        row = {
            "name": config.title,
            "method": config.method,
            "keep": config.keep,
            "options": config.options,
            "tokens": float(first.layer_tokens.mean(-1).sum() / full_tokens),
            "flops": flops / full_flops,
            "speedup": full_time / seconds,
            "seconds": seconds,
            "scoring": statistics.median(p.scoring for p in passes[i]),
            "cosine": float(metrics.cosine_rows(first.embeddings, full.embeddings).mean()),
        }
        if bbc is not None:
            row["bbc_knn_acc"] = metrics.knn_accuracy(first.embeddings, bbc.labels)
        if lp is not None:
            e = lp_emb[i]
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            sims = (e[lp.pairs[:, 0]] * e[lp.pairs[:, 1]]).sum(1)
            row["lp50_pearson"] = metrics.pearson(sims, lp.scores)
            row["lp50_spearman"] = metrics.spearman(sims, lp.scores)
        rows.append(row)
    return rows, notes


def environment() -> dict[str, Any]:
    """Versions and machine, recorded with every result."""
    import transformers

    return {
        "versions": {
            "tokenfuse": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(),
        },
    }
