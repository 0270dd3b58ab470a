"""A short integration run on the packaged all-MiniLM-L6-v2 with BBC News documents."""

import importlib.util

import pytest
import torch

import tokenfuse
from tokenfuse.assets import text as data
from tokenfuse.eval import metrics

pytestmark = pytest.mark.integration  # the packaged all-MiniLM-L6-v2 and BBC News
DOCS = 32


@pytest.fixture(scope="module")
def docs():
    return data.bbc_news(DOCS)


@pytest.fixture(scope="module")
def full(minilm, docs):
    model, tokenizer = minilm
    tokenfuse.remove(model)
    return tokenfuse.embed(model, tokenizer, docs.texts, batch_size=8, max_length=256)


@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None, reason="needs sentence-transformers"
)
def test_full_embedding_matches_sentence_transformers(minilm, docs, full):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(data.minilm_path()), device="cpu", local_files_only=True)
    st.max_seq_length = 256
    reference = torch.as_tensor(st.encode(docs.texts[:8], normalize_embeddings=True))
    ours = torch.nn.functional.normalize(full[:8], dim=-1)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_keep_one_is_identical_on_the_real_model(minilm, docs, full):
    model, tokenizer = minilm
    tokenfuse.apply(model, "tome", keep=1.0)
    try:
        assert torch.equal(tokenfuse.embed(model, tokenizer, docs.texts, batch_size=8, max_length=256), full)
    finally:
        tokenfuse.remove(model)


def test_tome_stays_close_to_the_full_model_and_beats_random(minilm, docs, full):
    model, tokenizer = minilm
    cos = {}
    for method in ("tome", "random"):
        tokenfuse.apply(model, method, keep=0.5)
        emb = tokenfuse.embed(model, tokenizer, docs.texts, batch_size=8, max_length=256)
        cos[method] = float(torch.nn.functional.cosine_similarity(emb, full).mean())
    tokenfuse.remove(model)
    assert cos["tome"] > 0.9, cos
    assert cos["tome"] > cos["random"] + 0.1, cos


def test_knn_accuracy_of_the_full_model_is_high(docs, full):
    acc = metrics.knn_accuracy(full.numpy(), docs.labels, k=4)
    assert acc > 75  # 32 documents, 5 classes (the smallest has 5): far above the 20% of chance
