"""The columns of result rows: one definition of their titles and number formats, shared by the
command line's tables and the HTML report, so that a run reads the same in a terminal and on a page."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Column:
    key: str  # in a result row
    title: str
    format: str  # for numbers


COLUMNS = (  # in the order tables show them
    Column("length", "length", "{}"),  # bench --task long: tokens per sequence
    Column("batch", "batch", "{}"),  # bench --task long: sequences per batch
    Column("runs", "runs", "{}"),  # bench --task long: timing rounds at that length
    Column("name", "name", "{}"),
    Column("method", "method", "{}"),
    Column("runtime", "runtime", "{}"),
    Column("target", "at speed of", "{}"),  # bench --at-speed: the baseline matched
    Column("keep", "keep", "{:.3g}"),
    Column("side", "px", "{}"),  # bench --task dense: the image side the backbone sees
    Column("tokens", "tokens", "{:.3f}"),
    Column("flops", "FLOPs", "{:.3f}"),
    Column("visual", "visual", "{:.3f}"),
    Column("target_speedup", "its speedup", "{:.2f}x"),  # that baseline's, in the same run
    Column("speedup", "speedup", "{:.2f}x"),
    Column("generation_speedup", "generate", "{:.2f}x"),
    Column("encode_speedup", "encode", "{:.2f}x"),
    Column("encode_ratio", "vs embed", "{:.3f}"),
    Column("scoring", "scoring", "{:.1%}"),
    Column("overhead", "overhead", "{:.1%}"),
    Column("cosine", "cosine", "{:.3f}"),
    Column("encode_max_diff", "max |diff|", "{:.1e}"),
    Column("encode_min_cosine", "min cosine", "{:.6f}"),
    Column("bbc_knn_acc", "BBC acc %", "{:.1f}"),
    Column("lp50_pearson", "LP50 r", "{:.3f}"),
    Column("lp50_spearman", "LP50 ρ", "{:.3f}"),
    Column("accuracy", "top-1 %", "{:.1f}"),
    Column("ece", "ECE %", "{:.2f}"),
    Column("nll", "NLL", "{:.3f}"),
    Column("agreement", "agree %", "{:.1f}"),
    Column("cls_cosine", "CLS cosine", "{:.3f}"),
    Column("knn20_acc", "20-NN %", "{:.1f}"),
    Column("saliency_corr", "saliency r", "{:.3f}"),
    Column("saliency_iou", "top-10% IoU", "{:.3f}"),
    Column("answer_acc", "answer %", "{:.1f}"),
    Column("kl", "KL", "{:.4f}"),
    Column("docs_per_second", "docs/s", "{:.1f}"),
    Column("throughput", "vs local", "{:.2f}x"),
    Column("max_abs_diff", "max |Δ| vs local", "{:.1e}"),
)
BY_KEY = {c.key: c for c in COLUMNS}


def title(key: str) -> str:
    """A row key's column title; a key of no known column is its own title."""
    return BY_KEY[key].title if key in BY_KEY else key


def text(key: str, value: Any) -> str:
    """A known column's value as its table shows it ("1.23x", "4.5%"): numbers in the column's
    format, anything else as plain text, a missing value as empty."""
    if value is None:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return BY_KEY[key].format.format(value)
    return str(value)
