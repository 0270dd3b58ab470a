import numpy as np
import pytest

from tokenfuse.eval import metrics


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


def test_knn_accuracy_refuses_too_few_inputs_of_a_class():
    """10-NN on 8 documents of 5 classes scored the full model 0%: every input's neighbours were
    all the others, and the vote counted class sizes, whatever the features."""
    labels = np.array([0, 0, 1, 2, 2, 3, 3, 4])
    perfect = np.eye(5)[labels]  # features that separate the classes exactly
    assert "smallest class has 1" in metrics.knn_problem(labels, 10)
    with pytest.raises(ValueError, match="more than 10 inputs of every class"):
        metrics.knn_accuracy(perfect, labels, k=10)
    assert "at least two classes" in metrics.knn_problem(np.zeros(30, dtype=int), 5)
    labels = np.repeat(np.arange(3), 4)  # 4 of each: k = 3 is the largest that means something
    assert metrics.knn_problem(labels, 3) is None and metrics.knn_problem(labels, 4) is not None
    assert metrics.knn_accuracy(np.eye(3)[labels], labels, k=3) == 100.0


def test_flops_count_attention_quadratically():
    one = metrics.encoder_flops(np.array([10]), np.array([10]), 8, 32)
    two = metrics.encoder_flops(np.array([20]), np.array([20]), 8, 32)
    assert 2 * one < two < 4 * one


def test_mlp_width_reads_bert_and_distilbert_configs():
    from transformers import BertConfig, DistilBertConfig

    assert metrics.mlp_width(BertConfig(intermediate_size=48)) == 48
    assert metrics.mlp_width(DistilBertConfig(hidden_dim=64)) == 64


def test_a_gated_mlp_counts_three_matrices():
    """ModernBERT's MLP is gated (its Wi is value and gate, 2 x intermediate wide, then Wo)."""
    from transformers import BertConfig, ModernBertConfig

    assert metrics.mlp_matrices(ModernBertConfig()) == 3 and metrics.mlp_matrices(BertConfig()) == 2
    plain = metrics.encoder_flops(np.array([10]), np.array([10]), 8, 32)
    gated = metrics.encoder_flops(np.array([10]), np.array([10]), 8, 32, mlp_matrices=3)
    assert gated - plain == 2 * 10 * 8 * 32


def test_ece_is_zero_when_confidence_matches_accuracy_and_measures_overconfidence():
    labels = np.array([0] * 8 + [1] * 2)
    # every prediction says class 0 with confidence 0.8, and 8 of 10 are right: calibrated
    calibrated = np.tile([0.8, 0.2], (10, 1))
    assert metrics.ece(calibrated, labels) == pytest.approx(0.0, abs=1e-9)
    # the same predictions at confidence 0.99 are overconfident by 19 points
    assert metrics.ece(np.tile([0.99, 0.01], (10, 1)), labels) == pytest.approx(19.0)
    # two bins: 0.95 (5 right of 5) and 0.65 (2 right of 5): gaps 5 and 25, weights 1/2
    probs = np.array([[0.95, 0.05]] * 5 + [[0.65, 0.35]] * 5)
    assert metrics.ece(probs, np.array([0] * 5 + [0, 0, 1, 1, 1])) == pytest.approx(15.0)


def test_nll_of_the_true_class():
    probs = np.array([[0.5, 0.5], [0.25, 0.75]])
    assert metrics.nll(probs, np.array([0, 1])) == pytest.approx(-(np.log(0.5) + np.log(0.75)) / 2)
