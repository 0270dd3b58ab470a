import numpy as np
import pytest

from tokenfuse import metrics


def test_spearman_handles_ties_like_the_textbook():
    a = np.array([1.0, 2.0, 2.0, 3.0])
    assert metrics.ranks(a).tolist() == [0.0, 1.5, 1.5, 3.0]
    assert metrics.spearman(a, a**3) == pytest.approx(1.0)
    assert metrics.spearman(a, -a) == pytest.approx(-1.0)


def test_knn_accuracy_on_separable_clusters():
    rng = np.random.default_rng(0)
    centers = np.eye(3) * 10
    labels = np.repeat(np.arange(3), 10)
    emb = centers[labels] + rng.normal(size=(30, 3))
    assert metrics.knn_accuracy(emb, labels, k=5) == 100.0


def test_flops_count_attention_quadratically():
    one = metrics.encoder_flops(np.array([10]), np.array([10]), 8, 32)
    two = metrics.encoder_flops(np.array([20]), np.array([20]), 8, 32)
    assert 2 * one < two < 4 * one


def test_mlp_width_reads_bert_and_distilbert_configs():
    from transformers import BertConfig, DistilBertConfig

    assert metrics.mlp_width(BertConfig(intermediate_size=48)) == 48
    assert metrics.mlp_width(DistilBertConfig(hidden_dim=64)) == 64
