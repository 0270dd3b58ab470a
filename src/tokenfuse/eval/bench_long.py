"""`tokenfuse bench --task long`: how the speedups of a reduction and of truncation grow with the
input's length, on the shapes of ModernBERT-base (`modernbert_base`: transformers' ModernBertConfig
defaults, which are ModernBERT-base's: 22 layers 768 wide, 12 heads, a gated MLP 1152 wide, global
attention every third layer and a 128-token window in the others, 8,192 positions) with random
weights (seeded, no download), so only speed is measured.

For each length, a batch of random token sequences of exactly that length ([CLS] ... [SEP], no
padding; `BATCH_TOKENS` // length of them, at least 1, so that every length up to 2,048 does the
same token work) is run by the full model, each method at each keep (default ToMe at 0.5, its
default schedule) and truncation (the full model on the first `keep` of each sequence, special tokens
kept), timed as every bench times (`measure.compare`: a warm-up, interleaved rounds, medians), in
the model's own attention implementation (sdpa on a CPU). Past 2,048 tokens a batch holds one
sequence and one pass costs more with every length, so those lengths run fewer rounds (`rounds`).

FLOPs count what the host computes: transformers' sdpa and eager attention run a local layer as
full attention over all n x n pairs under a window mask (only flash and flex attention, which
tokenfuse refuses, skip the pairs outside the window), so every layer's attention products count n².
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import ModernBertConfig, ModernBertModel

from ..api import apply, remove
from ..api.progress import progress_bar
from ..api.text import encode_padded
from . import measure, meta, metrics, runtime
from .measure import Config, Pass

BASELINES = ("full", "truncation")
METHODS = "tome,truncation"
KEEPS = (0.5,)
LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192)
MIN_LENGTH = 64  # the shortest length the sweep takes: shorter texts are the text bench's
BATCH_TOKENS = 2048  # tokens per batch by default: the batch is BATCH_TOKENS // length sequences


def modernbert_base() -> ModernBertConfig:
    """ModernBERT-base's configuration (149 M parameters), in the attention implementation the host
    picks by default (sdpa)."""
    return ModernBertConfig()


def default_batch(length: int) -> int:
    """Sequences per batch: `BATCH_TOKENS` tokens in all, at least one sequence."""
    return max(1, BATCH_TOKENS // length)


def rounds(repeats: int, length: int) -> int:
    """Timing rounds at a length: `repeats` up to `BATCH_TOKENS` tokens, then fewer as one
    sequence's pass grows (repeats x 2048 / length, rounded, at least 1: 3 gives 2 at 4,096 and 1 at
    8,192)."""
    return max(1, min(repeats, round(repeats * BATCH_TOKENS / length)))


def check_lengths(lengths: Sequence[int], config: ModernBertConfig) -> list[int]:
    """The lengths, sorted and unique, each in [MIN_LENGTH, the model's positions]."""
    top = config.max_position_embeddings
    wrong = [n for n in lengths if not MIN_LENGTH <= n <= top]
    if not lengths or wrong:
        raise ValueError(
            f"--lengths {','.join(map(str, lengths)) or '(none)'}: each length must be from {MIN_LENGTH} "
            f"(shorter texts are the text bench's, --task text) to {top} (the model's "
            f"max_position_embeddings); give e.g. --lengths {MIN_LENGTH},{top}"
        )
    return sorted(set(lengths))


def random_tokens(config: ModernBertConfig, batch: int, length: int, seed: int = 0) -> Tensor:
    """(batch, length) token ids: [CLS], ids drawn from the vocabulary less the special tokens, [SEP]."""
    special = [config.cls_token_id, config.sep_token_id, config.pad_token_id]
    allowed = torch.ones(config.vocab_size, dtype=torch.bool)
    allowed[[i for i in special if i is not None]] = False
    pool = allowed.nonzero()[:, 0]
    gen = torch.Generator().manual_seed(seed)
    body = pool[torch.randint(len(pool), (batch, length - 2), generator=gen)]
    ends = torch.tensor([config.cls_token_id, config.sep_token_id]).expand(batch, 2)
    return torch.cat([ends[:, :1], body, ends[:, 1:]], dim=1)


def truncated(ids: Tensor, keep: float) -> Tensor:
    """(B, N) -> (B, round(keep x N)): the first tokens of each sequence, its last ([SEP]) kept, as
    the text bench's truncation keeps the special tokens."""
    n = max(2, round(keep * ids.shape[1]))
    return torch.cat([ids[:, : n - 1], ids[:, -1:]], dim=1)


@dataclass
class LongTask:
    """One length's batch through a randomly initialised ModernBERT (`measure.Task`): speed and work
    only. advance(flops) is called after each pass, for the sweep's progress."""

    model: nn.Module
    ids: Tensor  # (B, N)
    advance: Callable[[float], None] = lambda _: None
    _batches: dict[float, tuple[list[int], dict[str, Tensor]]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return f"{self.ids.shape[1]} tokens"

    def batch(self, config: Config) -> tuple[list[int], dict[str, Tensor]]:
        """The inputs of a configuration: every token, or truncation's prefix."""
        prefix = config.keep if config.method == "truncation" else 1.0
        if prefix not in self._batches:
            ids = self.ids if prefix == 1.0 else truncated(self.ids, prefix)
            self._batches[prefix] = (
                list(range(len(ids))),
                {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            )
        return self._batches[prefix]

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        p = measure.run_pass(
            self.model, config, config.method in BASELINES, [self.batch(config)], self.forward
        )
        self.advance(self.flops(p))
        return p

    def forward(self, batch: tuple[list[int], dict[str, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
        out = encode_padded(self.model, *batch, "mean")  # the text bench's path: model, mean pooling
        return {"embedding": out.embedding}, out.layer_tokens

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        return timed  # random weights: no quality to read

    def flops(self, p: Pass) -> float:
        return layer_flops(p.layer_tokens, self.model.config)

    def head(self, config: Config) -> dict[str, Any]:
        return {"length": int(self.ids.shape[1]), "batch": len(self.ids)}

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict[str, Any]:
        return {}


def layer_flops(layer_tokens: np.ndarray, config: ModernBertConfig) -> float:
    """Multiply-add FLOPs of the layers for a trace (inputs, layers, 2): every layer's attention
    over all pairs of its tokens (what sdpa and eager compute, local layers included), the gated MLP."""
    n = np.asarray(layer_tokens, dtype=float)
    hidden = config.hidden_size
    inter, matrices = config.intermediate_size, metrics.mlp_matrices(config)
    return metrics.encoder_flops(n[..., 0], n[..., 1], hidden, inter, mlp_matrices=matrices)


def estimate(config: ModernBertConfig, configs: Sequence[Config], lengths, batches, repeats) -> list[float]:
    """Per length, the FLOPs the sweep will run there (the warm-up, then every configuration each
    round), a reduction counted as truncation at its keep: the progress bar's units, so that its
    time left follows the work, not the count of passes."""

    def work(n: int, keep: float) -> float:
        return layer_flops(np.full((batches[n], config.num_hidden_layers, 2), round(keep * n)), config)

    return [work(n, 1.0) + rounds(repeats, n) * sum(work(n, c.keep) for c in configs) for n in lengths]


def run(
    methods: str = METHODS,
    keeps: tuple[float, ...] = KEEPS,
    lengths: Sequence[int] = LENGTHS,
    batch_size: int | None = None,
    repeats: int = 3,
    dtype: str = "float32",
    config: ModernBertConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the length sweep; results as a JSON-ready dict ({"meta", "rows", "notes"}). batch_size:
    sequences per batch at every length (default `default_batch`); `config`: another ModernBERT
    configuration than ModernBERT-base's (tests run a tiny one)."""
    measure.check_positive(batch_size=batch_size, repeats=repeats)
    runtime.check_dtype(dtype)
    config = modernbert_base() if config is None else config
    lengths = check_lengths(lengths, config)
    names = measure.method_names(methods, BASELINES)
    configs = measure.configs_for(names, list(keeps), {}, BASELINES)
    model = runtime.random_model(ModernBertModel, config, dtype)
    for c in configs[1:]:  # a method this model refuses fails now, not after the first length
        if c.method not in BASELINES:
            apply(model, c.method, keep=c.keep)
            remove(model)
    batches = {n: batch_size or default_batch(n) for n in lengths}
    work = estimate(config, configs, lengths, batches, repeats)
    rows, notes = [], []
    with progress_bar(progress) as bar:
        sweep = bar.add_task(f"sweep: {len(lengths)} lengths, {sum(work) / 1e9:.0f} GFLOP", total=sum(work))
        for n, done in zip(lengths, np.cumsum(work), strict=True):
            task = LongTask(model, random_tokens(config, batches[n], n), lambda f: bar.advance(sweep, f))
            found, said = measure.compare(task, configs, rounds(repeats, n), bar)
            rows += [{**row, "runs": rounds(repeats, n)} for row in found]
            notes += [note for note in said if note not in notes]
            bar.update(sweep, completed=done)  # the estimate's error stays within its length
    shape = dict(lengths=lengths, batches=[batches[n] for n in lengths], dtype=dtype)
    shape |= dict(attention=model.config._attn_implementation, layers=config.num_hidden_layers)
    shape |= dict(window=config.local_attention, global_layers=config.layer_types.count("full_attention"))
    arguments = meta.arguments(
        "long",
        methods,
        keeps,
        None,
        batch_size,
        repeats,
        None,
        model="modernbert-base",
        weights="random",
        **shape,
    )
    return meta.results(rows, notes, arguments)
