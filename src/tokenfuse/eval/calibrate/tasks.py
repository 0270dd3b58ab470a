"""The objective of each task, and its run: text encoders (mean embedding cosine to the full model on
BBC News) and classifiers (KL divergence of the class distribution on Fashion-MNIST, optionally a
fitted temperature)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch

from ...api import apply, embed, remove
from ...api.progress import progress_bar
from ...assets import text as data
from ..bench_text import Config, measure
from .run import Settings, calibrate_sets, calibrated_configs, results
from .search import Candidate


def run_text(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate an encoder on BBC News (objective: mean embedding cosine to the full model) and
    evaluate on held-out documents: (results, config). The held-out set is the bench's, the first
    `holdout` documents of the fixed shuffled order; the calibration sets follow it, disjoint."""
    s = dataclasses.replace(settings, holdout=settings.holdout or 400, batch_size=settings.batch_size or 16)
    s.budget()  # fail on a bad budget before loading anything
    docs = data.bbc_news()
    starts = s.starts(len(docs.texts), "documents")
    model, tokenizer = data.load_text_model(s.model)

    def objective(first: int):
        texts = docs.texts[first : first + s.calib_size]

        def run():
            return embed(model, tokenizer, texts, s.batch_size, s.max_length, progress=False)

        remove(model)
        full = run()

        def score(candidate: Candidate) -> np.ndarray:
            apply(model, candidate.method, **candidate.apply_options())
            return torch.nn.functional.cosine_similarity(run(), full).numpy()

        return score, run

    start = time.monotonic()
    found = calibrate_sets(model, objective, s, starts)
    seconds = time.monotonic() - start
    held = data.Labelled(docs.texts[: s.holdout], docs.labels[: s.holdout], docs.classes)
    configs = calibrated_configs(found, ("truncation",))
    rows, notes = measure(
        model, tokenizer, configs, held, None, s.batch_size, s.max_length, s.eval_repeats, s.progress
    )
    closeness = "mean embedding cosine to the full model"
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
    from .. import bench_vision

    s = dataclasses.replace(settings, model="fmnist-vit", holdout=settings.holdout or 500)
    s.budget()  # fail on a bad budget before loading anything
    subject = bench_vision.classifier(s.holdout + s.calib_size * s.repeats, s.data_path, s.batch_size)
    starts = s.starts(len(subject.labels), "images")
    s.batch_size, model = subject.batch_size, subject.model

    def log_probs(pixels) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate(
                [
                    np.log(subject.forward(model, pixels[i : i + subject.batch_size], False)["probs"] + 1e-12)
                    for i in range(0, len(pixels), subject.batch_size)
                ]
            )

    def objective(first: int):
        pixels = subject.pixels[first : first + s.calib_size]
        remove(model)
        full = log_probs(pixels)

        def score(candidate: Candidate) -> np.ndarray:
            apply(model, candidate.method, **candidate.apply_options())
            reduced = log_probs(pixels)
            return -(np.exp(full) * (full - reduced)).sum(1)

        return score, lambda: log_probs(pixels)

    start = time.monotonic()
    found = calibrate_sets(model, objective, s, starts)
    extra = {}
    if s.fit_temperature:
        first = found[0]
        apply(model, first.best.method, **first.best.apply_options())
        calibration = slice(first.first, first.first + s.calib_size)
        extra["temperature"] = fit_temperature(
            log_probs(subject.pixels[calibration]), subject.labels[calibration]
        )
        remove(model)
    seconds = time.monotonic() - start
    configs = calibrated_configs(found, ("resize",))
    if extra:
        first = found[0]
        options = {**first.best.apply_options(), **extra}
        configs.insert(2, Config(first.best.method, first.keep, options, name="calibrated + temperature"))
    held = dataclasses.replace(
        subject, pixels=subject.pixels[: s.holdout], labels=subject.labels[: s.holdout]
    )
    held.timing = s.holdout
    with progress_bar(s.progress) as bar:
        rows = bench_vision.bench_subject(held, configs, s.eval_repeats, bar)
    for row, config in zip(rows, configs, strict=True):
        row["name"] = config.title
    closeness = "mean KL(full || reduced) of class distributions"
    result, config = results(found, rows, [], s.record("fmnist"), closeness, seconds, "accuracy")
    config.update(extra)
    return result, config
