"""Quality and cost measures used by the bench: plain numpy, no extra dependencies."""

from __future__ import annotations

import numpy as np


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def knn_problem(labels: np.ndarray, k: int) -> str | None:
    """Why leave-one-out k-NN accuracy would mean nothing on these labels, or None. Features that
    separate the classes perfectly score 100% only if every input has k neighbours of its own class,
    i.e. k below the smallest class's count; past it the vote counts class sizes, whatever the
    features (10-NN on 8 documents of 5 classes gave the full model 0%)."""
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if len(counts) < 2:
        return f"{k}-NN accuracy needs at least two classes, the labels have {len(counts)}"
    if k >= counts.min():
        return (
            f"leave-one-out {k}-NN accuracy needs more than {k} inputs of every class, "
            f"the smallest class has {counts.min()} of the {len(labels)} inputs"
        )
    return None


def knn_accuracy(emb: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Leave-one-out k-NN accuracy (%) under cosine similarity; majority vote, ties broken by the
    summed similarity of each class's neighbours. Fails where it would mean nothing (knn_problem)."""
    problem = knn_problem(labels, k)
    if problem is not None:
        raise ValueError(problem)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    votes = np.zeros((len(x), labels.max() + 1))
    rows = np.arange(len(x))[:, None]
    np.add.at(votes, (np.broadcast_to(rows, nn.shape), labels[nn]), 1 + 1e-6 * sim[rows, nn])
    return float((votes.argmax(1) == labels).mean() * 100)


def row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of matching rows (any trailing shape is flattened)."""
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1)).clip(1e-12)


def top_iou(a: np.ndarray, b: np.ndarray, share: float = 0.1) -> np.ndarray:
    """Intersection over union of each pair of matching rows' top `share` of values (any trailing
    shape is flattened; values tied with the last one counted are in): whether two maps call the
    same region most salient, whatever their values elsewhere."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    k = max(1, round(share * a.shape[1]))
    top_a = a >= np.partition(a, -k, axis=1)[:, -k, None]
    top_b = b >= np.partition(b, -k, axis=1)[:, -k, None]
    return (top_a & top_b).sum(1) / (top_a | top_b).sum(1)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (nats)."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error (%), equal-width confidence bins: the gap between confidence
    and accuracy, averaged over bins weighted by how many predictions fall in each."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(gap * 100)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's correlation needs)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    r = np.empty(len(x))
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            r[order[start:end]] = (start + end - 1) / 2
            start = end
    return r


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(ranks(a), ranks(b))


def mlp_width(config) -> int:
    """The MLP's inner width: `intermediate_size` in most configs, `hidden_dim` in DistilBERT's,
    `mlp_ratio` times the width in DINOv2's."""
    width = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None)
    return width or int(config.hidden_size * config.mlp_ratio)


#: encoder families whose MLP is gated (value, gate and output): ModernBERT's Wi is 2 x intermediate wide
GATED_MLP = ("modernbert",)


def mlp_matrices(config) -> int:
    """The MLP's weight matrices, each hidden x intermediate: 3 for a gated MLP, 2 for a plain one."""
    return 3 if getattr(config, "model_type", None) in GATED_MLP else 2


def decoder_flops(tokens: np.ndarray, config) -> float:
    """Multiply-add FLOPs of a decoder LLM's prefill for per-layer token counts: the q/o and the
    grouped k/v projections, the causal attention products (half the square), the gated MLP."""
    n = tokens.astype(float)
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    projections = 2 * n * (2 * hidden * hidden + 2 * hidden * kv)
    products = 2 * n**2 * hidden  # QK^T and AV over the causal half
    return float((projections + products + 2 * 3 * n * hidden * inter).sum())


def encoder_flops(
    attn_tokens: np.ndarray, mlp_tokens: np.ndarray, hidden: int, intermediate: int, mlp_matrices: int = 2
) -> float:
    """Multiply-add FLOPs of a transformer encoder's layers for per-layer token counts: attention
    projections and the two attention products on the tokens entering attention, the MLP on the
    tokens entering it (embeddings and pooling are negligible and left out). mlp_matrices: 2 for a
    plain MLP, 3 for a gated one (value, gate and output, each hidden x intermediate)."""
    n, m = attn_tokens.astype(float), mlp_tokens.astype(float)
    attention = 2 * 4 * n * hidden**2 + 2 * 2 * n**2 * hidden
    mlp = 2 * mlp_matrices * m * hidden * intermediate
    return float((attention + mlp).sum())
