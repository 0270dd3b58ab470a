"""Fixtures for Expedite: the authors' own token clustering and reconstruction run on seeded inputs,
the inputs and outputs saved to tests/data/fixtures/expedite.pt with the repository and commit they
came from. tests/test_method_expedite.py compares tokenfuse's clustering and reconstruction with them.

Nothing of the authors' code is committed; the two files run here import torch alone, so the
project's environment runs them:

    git clone https://github.com/Expedit-LargeScale-Vision-Transformer/Expedit-Segmenter \
        /tmp/expedit-segmenter
    git -C /tmp/expedit-segmenter checkout 63f40661068c0a6bfb1f0ad38e105626a74c403d
    .venv/bin/python scripts/fixtures_expedite.py --repo /tmp/expedit-segmenter

What runs, each file executed unmodified from mmseg/ops/:
- cluster.py: `TokenClusteringBlock(num_spixels=(gh, gw), n_iters, temperture, window_size)` on the
  token grid (B, C, h, w), as HourglassVisionTransformer.cluster calls it; returns the centres.
- reconstruction.py: `TokenReconstructionBlock(cfg={"k", "temperture"})` with feat_before_pooling =
  the tokens, feat_after_pooling = the centres, applied to seeded final cluster features. It moves a
  zero tensor to the GPU (`.cuda()`); on a machine without one, that call returns the tensor as is.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "fixtures" / "expedite.pt"
REPOSITORY = "https://github.com/Expedit-LargeScale-Vision-Transformer/Expedit-Segmenter"

# (grid, cells, iterations, temperature, window, k, rebuild temperature, channels): the code's defaults
# (5 rounds, window 5, 0.02, k 20 at 0.02) on features whose distances make them soft, sharper ones,
# and cluster grids that divide the token grid unevenly
CASES = [
    ((8, 8), (5, 5), 5, 0.02, 5, 20, 0.02, 16),
    ((7, 9), (4, 6), 5, 0.02, 5, 20, 0.02, 16),
    ((10, 6), (7, 4), 3, 0.5, 3, 5, 0.3, 8),
    ((6, 6), (6, 6), 1, 1.0, 5, 3, 0.1, 8),
]


def load(repo: Path, name: str):
    path = repo / "mmseg" / "ops" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"expedit_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commit(repo: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def run_case(cluster, reconstruction, case, seed: int) -> dict:
    grid, cells, iterations, temperature, window, k, rebuild_temperature, channels = case
    generator = torch.Generator().manual_seed(seed)
    B, (h, w), G = 2, grid, cells[0] * cells[1]
    x = torch.randn(B, h * w, channels, generator=generator)
    final = torch.randn(B, G, 12, generator=generator)
    block = cluster.TokenClusteringBlock(
        num_spixels=cells, n_iters=iterations, temperture=temperature, window_size=window
    )
    with torch.no_grad():
        centres, _ = block(x.transpose(1, 2).reshape(B, channels, h, w))
        rebuild = reconstruction.TokenReconstructionBlock(cfg={"k": k, "temperture": rebuild_temperature})
        state = rebuild.derive_unpooler()
        state.update_state(feat_before_pooling=x, feat_after_pooling=centres)
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *args, **kwargs: (
            self if not torch.cuda.is_available() else cuda(self)
        )
        try:
            rebuilt, _ = state.call(final)
        finally:
            torch.Tensor.cuda = cuda
    return {
        "grid": grid,
        "cells": cells,
        "iterations": iterations,
        "temperature": temperature,
        "window": window,
        "k": k,
        "rebuild_temperature": rebuild_temperature,
        "x": x,
        "final": final,
        "centres": centres,
        "rebuilt": rebuilt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of Expedit-Segmenter")
    args = parser.parse_args()
    cluster, reconstruction = load(args.repo, "cluster"), load(args.repo, "reconstruction")
    cases = [run_case(cluster, reconstruction, case, seed) for seed, case in enumerate(CASES)]
    record = {
        "repository": REPOSITORY,
        "commit": commit(args.repo),
        "files": ["mmseg/ops/cluster.py", "mmseg/ops/reconstruction.py"],
        "torch": str(torch.__version__),
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, OUT)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
