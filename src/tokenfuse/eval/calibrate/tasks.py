"""The objective of each task, and its run: text encoders (mean embedding cosine to the full model on
BBC News) and classifiers (KL divergence of the class distribution on Fashion-MNIST, optionally a
fitted temperature)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np

from ...api.progress import progress_bar
from ...assets import text as data
from ...core.config import model_record
from .. import bench_text, bench_vision, measure, metrics
from .run import Settings, calibrate_sets, calibrated_configs, config_of, results
from .search import Candidate


def run_text(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate an encoder on BBC News (objective: mean embedding cosine to the full model, over the
    documents at `max_length` and again cut to `short_length` tokens) and evaluate on held-out
    documents, and on LP50 as the bench does: (results, config). The held-out set is the bench's,
    the first `holdout` documents of the fixed shuffled order; the calibration sets follow it,
    disjoint.

    Why the short copies: a configuration runs on inputs of every length, and a schedule fitted to
    long ones can squeeze short ones: fitted to documents of up to 512 tokens, the search chose a
    back-loaded shape that beat ToMe's constant schedule on held-out BBC documents and lost on
    LP50's short ones (README, calibration at a speed)."""
    s = dataclasses.replace(
        settings,
        holdout=400 if settings.holdout is None else settings.holdout,
        batch_size=16 if settings.batch_size is None else settings.batch_size,
        timing_size=256 if settings.timing_size is None else settings.timing_size,
    )
    s.budget()  # fail on a bad budget before loading anything
    docs = data.bbc_news()
    starts = s.starts(len(docs.texts), "documents")
    model, tokenizer = data.load_text_model(s.model)

    def documents(
        first: int, count: int, lp: data.Similarity | None = None, length: int = s.max_length
    ) -> bench_text.TextTask:
        part = slice(first, first + count)
        return bench_text.TextTask(
            s.model, model, tokenizer, docs.texts[part], s.batch_size, length, docs.labels[part], lp
        )

    lengths = [s.max_length, *([s.short_length] if s.short_length and s.short_length < s.max_length else [])]

    def objective(first: int):
        tasks = [documents(first, s.calib_size, length=n) for n in lengths]
        full = [t.run(measure.FULL).outputs["embedding"] for t in tasks]

        def score(candidate: Candidate) -> np.ndarray:
            """One cosine per document and length: a change must beat the choice over both."""
            config = config_of(candidate)
            reduced = [t.run(config).outputs["embedding"] for t in tasks]
            return np.concatenate([metrics.cosine_rows(r, f) for r, f in zip(reduced, full, strict=True)])

        return score, tasks[0]

    start = time.monotonic()
    timing = s.timing_inputs and documents(s.timing_inputs[0], s.timing_size)
    found = calibrate_sets(model, objective, s, starts, timing)
    seconds = time.monotonic() - start
    configs = calibrated_configs(found, ("truncation",), s.target("text"))
    with progress_bar(s.progress) as bar:
        rows, notes = measure.compare(documents(0, s.holdout, data.lp50()), configs, s.eval_repeats, bar)
    closeness = "mean embedding cosine to the full model, documents cut to " + " and ".join(map(str, lengths))
    closeness += " tokens"
    return results(found, rows, notes, s.record("bbc"), closeness, seconds, "cosine")


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on labelled inputs (Guo et al.,
    ICML 2017); log-probabilities stand in for logits, which they equal up to a per-row constant."""

    def nll(log_t: float) -> float:
        z = log_probs / math.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]).mean())

    lo, hi = math.log(0.05), math.log(20.0)  # golden-section search: NLL is unimodal in log T
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return math.exp((lo + hi) / 2)


def run_classifier(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate the Fashion-MNIST classifier (objective: mean KL divergence of the reduced model's
    class distribution from the full one's) and evaluate on held-out test images. The held-out set
    is the vision bench's, the first `holdout` test images; the calibration sets follow it. With
    `fit_temperature`, a temperature is fitted on the calibration set's labels and stored in the config."""
    s = dataclasses.replace(
        settings,
        model="fmnist-vit",
        holdout=500 if settings.holdout is None else settings.holdout,
        timing_size=1000 if settings.timing_size is None else settings.timing_size,
    )
    s.budget("vision")  # fail on a bad budget before loading anything
    last = s.timing_inputs[1] if s.timing_inputs else s.holdout + s.calib_size * s.repeats
    subject = bench_vision.classifier(last, s.data_path, s.batch_size)
    starts = s.starts(len(subject.labels), "images")
    s.batch_size, model = subject.batch_size, subject.model

    def log_probs(images: bench_vision.Subject, config: measure.Config) -> np.ndarray:
        return np.log(images.run(config).outputs["probs"] + 1e-12)

    def objective(first: int):
        images = subject.inputs(first, s.calib_size)
        full = log_probs(images, measure.FULL)

        def score(candidate: Candidate) -> np.ndarray:
            reduced = log_probs(images, config_of(candidate))
            return -(np.exp(full) * (full - reduced)).sum(1)

        return score, images

    start = time.monotonic()
    timing = s.timing_inputs and subject.inputs(s.timing_inputs[0], s.timing_size)
    found = calibrate_sets(model, objective, s, starts, timing, "vision")
    extra = {}
    if s.fit_temperature:
        first = found[0]
        images = subject.inputs(first.first, s.calib_size)
        extra["temperature"] = fit_temperature(
            log_probs(images, config_of(first.best, first.keep)), images.labels
        )
    seconds = time.monotonic() - start
    configs = calibrated_configs(found, ("resize",), s.target("vision"))
    if extra:
        first = found[0]
        configs.insert(2, config_of(first.best, first.keep, "calibrated + temperature", **extra))
    with progress_bar(s.progress) as bar:
        rows, notes = measure.compare(subject.inputs(0, s.holdout), configs, s.eval_repeats, bar)
    for row, config in zip(rows, configs, strict=True):
        row["name"] = config.title
    closeness = "mean KL(full || reduced) of class distributions"
    result, config = results(found, rows, notes, s.record("fmnist"), closeness, seconds, "accuracy")
    config.update(extra, model=model_record(model))  # a temperature is checked against it on apply
    return result, config
