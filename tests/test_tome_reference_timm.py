"""ToMe with order="reference" computes what facebookresearch/ToMe's own timm patch computes.

tests/data/tome_reference_deit_s.pt holds the logits of a seeded random DeiT-S (timm
`VisionTransformer`, no pretrained weights here) on a seeded batch: unpatched ("full") and patched by
the reference code with r = 8 merges per layer ("tome"); the JSON beside it gives the seeds, the
settings, and the reference commit and library versions it was made with. The reference code is not
part of this repository (its license is non-commercial): a throwaway script outside it ran it once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tokenfuse

pytest.importorskip("timm", reason="timm is an optional extra (pip install 'tokenfuse[timm]')")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

DATA = Path(__file__).parent / "data" / "tome_reference_deit_s"
SETTINGS = json.loads(DATA.with_suffix(".json").read_text())
TOLERANCE = 1e-4


def constant_count(n: int, r: int, num_layers: int) -> list[float]:
    """A schedule that removes exactly r of n tokens at each attention point (ToMe's constant r) and
    none at the embeddings: the fractions sit half a token under each count, which the adapter's
    ceil(n * fraction) turns back into that count whatever the rounding of the division."""
    return [1.0] + [(n - r * point - 0.5) / n for point in range(1, num_layers + 1)]


@pytest.fixture(scope="module")
def run():
    """(stored logits, the rebuilt model, the batch, logits of the rebuilt model)."""
    want = torch.load(DATA.with_suffix(".pt"), weights_only=True)
    torch.manual_seed(SETTINGS["model_seed"])
    model = VisionTransformer(**SETTINGS["model_args"]).eval()
    generator = torch.Generator().manual_seed(SETTINGS["input_seed"])
    pixels = torch.randn(SETTINGS["batch"], 3, 224, 224, generator=generator)
    with torch.no_grad():
        full = model(pixels)
    return want, model, pixels, full


def tome_logits(model, pixels, order: str) -> torch.Tensor:
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    schedule = constant_count(n, SETTINGS["r"], len(model.blocks))
    try:
        tokenfuse.apply(model, "tome", similarity="keys", order=order, schedule=schedule)
        with torch.no_grad():
            logits = model(pixels)
        assert tokenfuse.last_tokens(model).size.shape[1] == SETTINGS["tokens_after_last_layer"]
    finally:
        tokenfuse.remove(model)
    return logits


def test_timm_rebuild_matches_the_stored_model(run):
    want, _, _, full = run
    assert full.shape == want["full"].shape == (SETTINGS["batch"], 1000)
    diff = (full - want["full"]).abs().max().item()
    assert diff <= TOLERANCE, f"the seeded DeiT-S differs from the one the reference ran: {diff:.3g}"


def test_timm_reference_order_reproduces_the_reference_code(run):
    want, model, pixels, full = run
    assert (want["tome"] - full).abs().max() > 100 * TOLERANCE  # the merges change the logits
    diff = (tome_logits(model, pixels, "reference") - want["tome"]).abs().max().item()
    assert diff <= TOLERANCE, f"max abs difference {diff:.3g}"  # measured 1.5e-6


def test_timm_original_order_pairs_other_tokens(run):
    """tokenfuse's order-preserving layout splits different pairs from layer 2 on: 0.047 here."""
    want, model, pixels, _ = run
    diff = (tome_logits(model, pixels, "original") - want["tome"]).abs().max().item()
    assert diff > 100 * TOLERANCE, f"max abs difference {diff:.3g}"
