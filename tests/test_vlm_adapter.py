"""The staged VLM adapter seen from outside: every patch meets one protocol, the one dispatcher picks
the adapter, and which visual tokens each image kept is readable after a forward (and is what the
operators chose, at the boundary and in the LLM)."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import tiny_bert, tiny_vit
from test_llava import IMAGE, PER_IMAGE, prompts, rows_to_batch, tiny_llava

import tokenfuse
from tokenfuse import adapters
from tokenfuse.adapters.protocol import MEMBERS
from tokenfuse.methods import make
from tokenfuse.methods.vlm.fastv import FastV
from tokenfuse.methods.vlm.random import RandomVisual


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def run(model, **options) -> dict:
    rows, pixels = prompts(images=(True, False, True))
    batch = rows_to_batch(rows, pixels)
    tokenfuse.apply(model, **options)
    with torch.no_grad():
        model(**batch)
    return batch


def test_every_patch_declares_the_protocol(model):
    patches = [
        adapters.install(tiny_bert(), make("tome")),
        adapters.install(tiny_vit(), make("tome")),
        adapters.install(model, [make("pool", kind="visual")]),
    ]
    try:
        for patch in patches:
            missing = [m for m in MEMBERS if not hasattr(type(patch), m) and m not in vars(patch)]
            assert not missing, f"{type(patch).__name__} lacks {missing}"
    finally:
        for patch in patches:
            patch.remove()


@pytest.mark.parametrize(
    ("make", "expected"),
    [(tiny_bert, "text"), (tiny_vit, "vision"), (tiny_llava, "vlm")],
)
def test_one_dispatcher_names_the_adapter(make, expected):
    assert adapters.target(make()) == expected


def test_without_reduction_every_image_keeps_all_its_tokens(model):
    run(model, method="pool", keep=1.0)
    try:
        kept = tokenfuse.kept(model)
        assert [k.tolist() for k in kept] == [list(range(PER_IMAGE))] * 2
    finally:
        tokenfuse.remove(model)


def test_without_reduction_generate_leaves_every_image_all_its_tokens(model):
    """generate()'s decoding steps continue the prompt's cache: kept() and the layer trace still read
    the prompt, not the last step."""
    rows, pixels = prompts(images=(True, False, True))
    batch = rows_to_batch(rows, pixels)
    tokenfuse.apply(model, "pool", keep=1.0)
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert [k.tolist() for k in tokenfuse.kept(model)] == [list(range(PER_IMAGE))] * 2
        layers = tokenfuse.patch_of(model).layer_tokens()
        assert layers[:, 0].tolist() == [batch["attention_mask"].sum(1).tolist()] * layers.shape[0]
    finally:
        tokenfuse.remove(model)


class RecordingPrune(RandomVisual):
    def decide(self, inp):
        red = super().decide(inp)
        self.chosen = [row.nonzero()[:, 0] for row in red.dest[..., 0] >= 0]
        return red


class RecordingFastV(FastV):
    def decide(self, inp):
        red = super().decide(inp)
        survives = red.dest[..., 0] >= 0
        # each row's visual positions in order are its image's tokens 0..15
        self.chosen = [
            (survives[r][inp.visual[r]]).nonzero()[:, 0] for r in range(len(survives)) if inp.visual[r].any()
        ]
        return red


@pytest.mark.parametrize("operator", [RecordingPrune, RecordingFastV], ids=["boundary", "llm"])
def test_kept_names_the_tokens_the_operator_chose(model, operator):
    method = operator(keep=0.25) if operator is RecordingPrune else operator(keep=0.25, layer=2)
    run(model, method=method)
    try:
        kept = tokenfuse.kept(model)
        assert [k.tolist() for k in kept] == [c.tolist() for c in method.chosen]
        assert [len(k) for k in kept] == [4, 4]
    finally:
        tokenfuse.remove(model)


def test_kept_after_both_stages_is_a_subset_of_the_boundarys_choice(model):
    boundary = RecordingPrune(keep=0.5)
    run(model, method=[boundary, FastV(keep=0.25, layer=2)])
    try:
        for k, chosen in zip(tokenfuse.kept(model), boundary.chosen, strict=True):
            # the boundary keeps 8 of 16, FastV a quarter of the 8 entering the LLM
            assert len(k) == 2 and set(k.tolist()) <= set(chosen.tolist())
    finally:
        tokenfuse.remove(model)


def test_kept_survives_generate_and_reads_the_prompt(model):
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    tokenfuse.apply(model, "pool", keep=0.25)
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert [len(k) for k in tokenfuse.kept(model)] == [4, 4, 4]
        layers = tokenfuse.patch_of(model).layer_tokens()
        assert layers.shape == (4, 2, 3)
        assert layers[0, 0].tolist() == (batch["attention_mask"].sum(1) - (PER_IMAGE - 4)).tolist()
    finally:
        tokenfuse.remove(model)


def test_token_sizes_of_a_vlm_is_refused_with_what_to_read(model):
    run(model, method="pool", keep=0.25)
    try:
        with pytest.raises(TypeError, match=r"no token sizes.*tokenfuse\.kept\(model\)"):
            tokenfuse.token_sizes(model)
    finally:
        tokenfuse.remove(model)


def test_kept_on_a_token_method_is_refused_with_what_to_read():
    model = tokenfuse.apply(tiny_bert(), "tome", keep=0.5)
    with torch.no_grad():
        model(input_ids=torch.randint(5, 90, (2, 12)))
    with pytest.raises(TypeError, match=r"merges tokens.*token_sizes"):
        tokenfuse.kept(model)


def test_kept_with_a_tower_method_is_refused_with_the_reason(model):
    run(model, method=None, vision="tome", vision_keep=0.5)
    try:
        with pytest.raises(TypeError, match="merged the images' tokens"):
            tokenfuse.kept(model)
    finally:
        tokenfuse.remove(model)


def test_kept_counts_images_in_prompt_order():
    """Two images in one row: each gets its own list, in the order of its placeholders."""
    model = tiny_llava()
    gen = torch.Generator().manual_seed(3)
    row = [1, *[IMAGE] * PER_IMAGE, 5, *[IMAGE] * PER_IMAGE, 7, 8]
    batch = rows_to_batch([row], torch.randn(2, 3, 28, 28, generator=gen))
    tokenfuse.apply(model, "pool", keep=0.25)
    with torch.no_grad():
        model(**batch)
    assert [len(k) for k in tokenfuse.kept(model)] == [4, 4]


def test_the_towers_own_time_at_the_boundary_is_not_counted_as_overhead():
    """The boundary runs the host's tower and projector from inside its hook: their time is the
    host's. A tower slowed by 0.3 s (a hook of the test's, not tokenfuse's) leaves the overhead
    below it; counted as tokenfuse's, it would exceed it."""
    model = tiny_llava()
    sleep = model.model.vision_tower.register_forward_pre_hook(lambda *_: time.sleep(0.3))
    try:
        run(model, method="random", keep=0.25)
    finally:
        sleep.remove()
    patch = tokenfuse.patch_of(model)
    assert 0 < patch.overhead_seconds < 0.3
