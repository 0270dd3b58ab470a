"""Pooling: every sentence-transformers mode tokenfuse reproduces, size-aware on a reduced model, and
the model's own mode read from its folder (modules.json, the Pooling folder) or, for a hub id, from
the Hugging Face cache (tested offline with a cache built here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import tiny_bert

import tokenfuse
from tokenfuse.api.pipeline import Pipeline, pipeline_of, pooling_of
from tokenfuse.api.text import tokenize
from tokenfuse.assets import text as data

MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "lasttoken")  # sentence-transformers modes
TEXT = "Markets rallied on Tuesday as investors weighed new figures on inflation, jobs and interest rates."
FLAGS = {  # sentence-transformers' Pooling config for one mode
    mode: {
        "word_embedding_dimension": 384,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": mode == "max",
        "pooling_mode_mean_sqrt_len_tokens": mode == "mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens": mode == "weightedmean",
        "pooling_mode_lasttoken": mode == "lasttoken",
    }
    for mode in (*MODES, "weightedmean")
}


def forward(model, tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) last hidden state of one text and (N,) its token sizes (all 1 when not reduced)."""
    inputs = tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**inputs).last_hidden_state[0]
    patch = tokenfuse.patch_of(model)
    size = tokenfuse.token_sizes(model)[0] if patch else inputs["attention_mask"][0].float()
    return hidden, size


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_each_mode_is_the_size_aware_version_of_sentence_transformers(tokenizer, keep):
    model = tiny_bert() if keep == 1.0 else tokenfuse.apply(tiny_bert(), "tome", keep=keep)
    hidden, size = forward(model, tokenizer, TEXT)
    original = len(tokenize(tokenizer, [TEXT], 64)[0])
    real = size > 0
    if keep < 1:
        assert real.sum() < original, "the reduction must remove tokens for this test to mean anything"
    assert size.sum() == original  # merged tokens stand for every original token

    def pooled(mode: str) -> torch.Tensor:
        return tokenfuse.embed(model, tokenizer, [TEXT], pooling=mode)[0]

    weighted_sum = (hidden * size[:, None]).sum(0)
    assert torch.allclose(pooled("mean"), weighted_sum / original, atol=1e-5)
    assert torch.allclose(pooled("mean_sqrt_len_tokens"), weighted_sum / original**0.5, atol=1e-5)
    assert torch.allclose(pooled("max"), hidden[real].amax(0), atol=1e-6)  # max over merged features
    assert size[0] == 1 and size[real][-1] == 1  # [CLS] and [SEP] are never merged
    assert torch.allclose(pooled("cls"), hidden[0], atol=1e-6)
    assert torch.allclose(pooled("lasttoken"), hidden[real][-1], atol=1e-6)
    assert not torch.allclose(pooled("max"), pooled("mean"), atol=1e-3)


def test_padding_is_never_pooled(tokenizer, texts):
    """A batch of different lengths gives each text what it gets alone: padding takes no part in the
    max, the length or the last token."""
    model = tiny_bert()
    for mode in ("max", "mean_sqrt_len_tokens", "lasttoken", "cls"):
        together = tokenfuse.embed(model, tokenizer, texts, batch_size=len(texts), pooling=mode)
        alone = torch.stack([tokenfuse.embed(model, tokenizer, [t], pooling=mode)[0] for t in texts])
        assert torch.allclose(together, alone, atol=1e-5), mode


def write_pooling(
    folder: Path,
    settings: dict,
    pooling_dir: str = "1_Pooling",
    modules: bool = True,
    after: tuple[str, ...] = ("Normalize",),
) -> Path:
    """A sentence-transformers folder's pooling files (the weights are not needed to read them), its
    modules.json listing the Transformer, the Pooling and the modules `after` it."""
    (folder / pooling_dir).mkdir(parents=True, exist_ok=True)
    (folder / pooling_dir / "config.json").write_text(json.dumps(settings))
    if modules:
        listed = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": pooling_dir, "type": "sentence_transformers.models.Pooling"},
        ] + [
            {"idx": i, "name": str(i), "path": f"{i}_{kind}", "type": f"sentence_transformers.models.{kind}"}
            for i, kind in enumerate(after, start=2)
        ]
        (folder / "modules.json").write_text(json.dumps(listed))
    return folder


def named(folder: Path | str):
    model = tiny_bert()
    model.config._name_or_path = str(folder)
    return model


@pytest.mark.parametrize("mode", MODES)
def test_the_folders_mode_is_read_from_the_folder_modules_json_names(tmp_path, mode):
    folder = write_pooling(tmp_path, FLAGS[mode], pooling_dir="pooling_here")
    assert pooling_of(named(folder)) == mode


def test_a_folder_without_modules_json_uses_1_pooling_and_a_plain_one_is_mean(tmp_path):
    assert pooling_of(named(write_pooling(tmp_path / "a", FLAGS["max"], modules=False))) == "max"
    (tmp_path / "plain").mkdir()
    assert pooling_of(named(tmp_path / "plain")) == "mean"
    assert pooling_of(named(write_pooling(tmp_path / "b", {"pooling_mode": "lasttoken"}))) == "lasttoken"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (FLAGS["weightedmean"], "asks for weightedmean pooling"),
        ({**FLAGS["cls"], "pooling_mode_mean_tokens": True}, "asks for cls \\+ mean pooling"),
        ({**FLAGS["mean"], "pooling_mode_mean_tokens": False}, "asks for no pooling"),
    ],
)
def test_a_mode_embed_cannot_reproduce_is_refused(tmp_path, tokenizer, settings, expected):
    model = named(write_pooling(tmp_path, settings))
    with pytest.raises(ValueError, match=f"{expected}; tokenfuse reproduces one of mean, cls, max"):
        tokenfuse.embed(model, tokenizer, ["fine"])
    tokenfuse.embed(model, tokenizer, ["fine"], pooling="mean")  # the way out the message names


def test_normalize_follows_the_modules_after_the_pooling_and_the_switch_forces_it(tmp_path, tokenizer, texts):
    normalized = named(write_pooling(tmp_path / "n", FLAGS["max"]))
    plain = named(write_pooling(tmp_path / "p", FLAGS["max"], after=()))
    assert pipeline_of(normalized) == Pipeline("max", normalize=True)
    assert pipeline_of(plain) == Pipeline("max", normalize=False)
    assert pipeline_of(named(write_pooling(tmp_path / "a", FLAGS["cls"], modules=False))) == Pipeline("cls")
    assert pipeline_of(tiny_bert()) == Pipeline("mean", normalize=False)  # built from a config: no folder
    raw = tokenfuse.embed(plain, tokenizer, texts, batch_size=2)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(texts)), atol=1e-2)
    unit = torch.nn.functional.normalize(raw, dim=-1)
    torch.testing.assert_close(
        tokenfuse.embed(normalized, tokenizer, texts, batch_size=2), unit, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        tokenfuse.embed(normalized, tokenizer, texts, batch_size=2, normalize=False), raw
    )
    torch.testing.assert_close(tokenfuse.embed(plain, tokenizer, texts, batch_size=2, normalize=True), unit)
    with pytest.raises(TypeError, match="normalize must be True, False or None .the model's own., got 'yes'"):
        tokenfuse.embed(plain, tokenizer, texts, normalize="yes")


def test_a_module_after_the_pooling_that_embed_cannot_reproduce_is_refused(tmp_path, tokenizer):
    """A Dense layer after the Pooling maps the pooled vector to another space: embed refuses it,
    naming the module, the way through sentence-transformers, and the explicit choice."""
    tiny_bert().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = named(write_pooling(tmp_path, FLAGS["mean"], after=("Dense", "Normalize")))
    for forced in ({}, {"pooling": "mean"}, {"normalize": False}):
        with pytest.raises(ValueError) as refused:
            tokenfuse.embed(model, tokenizer, ["fine"], **forced)
        message = str(refused.value)
        assert "modules.json runs Dense (2_Dense) after its Pooling" in message
        assert "does not reproduce (it follows Pooling and Normalize)" in message
        assert "tokenfuse.apply(SentenceTransformer(path), ...)" in message
        assert "pass pooling= and normalize=" in message
    with pytest.raises(ValueError, match="runs Dense"):
        data.load_text_model(str(tmp_path))  # what `tokenfuse embed` loads: refused before any work
    out = tokenfuse.embed(model, tokenizer, ["fine"], pooling="mean", normalize=True)  # the way out
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1))


def test_modules_json_without_a_pooling_module_is_refused(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "", "type": "x.Transformer"}]))
    with pytest.raises(ValueError, match="lists no Pooling module"):
        pooling_of(named(tmp_path))


def minilm_copy(folder: Path, mode: str) -> Path:
    """The packaged MiniLM folder with its pooling switched to `mode` (large files linked)."""
    source = data.minilm_path()
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name != "modules.json":  # written below: never through a link
            os.symlink(item, folder / item.name)
    return write_pooling(folder, FLAGS[mode])


def test_a_minilm_folder_switched_to_cls_and_max_embeds_with_them(tmp_path, tokenizer, texts):
    """Then normalised, as its modules.json ends in Normalize."""
    for mode in ("cls", "max"):
        model, tok = data.load_text_model(str(minilm_copy(tmp_path / mode, mode)))
        inputs = tok(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].bool()[..., None]
        expected = hidden[:, 0] if mode == "cls" else hidden.masked_fill(~mask, -torch.inf).amax(1)
        assert torch.allclose(tokenfuse.embed(model, tok, texts, normalize=False), expected, atol=1e-5), mode
        unit = torch.nn.functional.normalize(expected, dim=-1)
        assert torch.allclose(tokenfuse.embed(model, tok, texts), unit, atol=1e-6), mode


REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache with the hub unreachable."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def cached_repo(cache: Path, repo: str) -> Path:
    """A model's snapshot folder in a Hugging Face cache, as a download leaves it."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    return snapshot


def test_a_hub_model_gets_its_pooling_from_the_cache(offline_cache, tokenizer, texts):
    repo = "tokenfuse-test/minilm-cls"
    minilm_copy(cached_repo(offline_cache, repo), "cls")
    model, tok = data.load_text_model(repo)
    assert model.config._name_or_path == repo and not Path(repo).exists()
    assert pipeline_of(model) == Pipeline("cls", normalize=True)
    inputs = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        cls = model(**inputs).last_hidden_state[:, 0]
    assert torch.allclose(tokenfuse.embed(model, tok, texts, normalize=False), cls, atol=1e-5)
    assert torch.allclose(tokenfuse.embed(model, tok, texts), torch.nn.functional.normalize(cls, dim=-1))


def test_a_hub_model_whose_pooling_is_not_cached_says_so(offline_cache):
    model = named("tokenfuse-test/not-cached")
    with pytest.warns(
        UserWarning, match="could not read its pooling configuration .*modules.json is not cached"
    ):
        assert pooling_of(model) == "mean"
