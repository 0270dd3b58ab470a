"""Where the overhead of a token method goes: the profile behind the bench's overhead column.

    .venv/bin/python scripts/overhead_profile.py [--documents 64] [--keep 0.5] [--long LENGTH]
                                                 [--json results/overhead_profile.json]

The default bench's setup (the packaged MiniLM, BBC News documents, max length 512, batch 16, the
machine's threads), ToMe at `keep`: a warm-up, then one pass under torch's profiler with each step of
tokenfuse's hooks labelled, each step's time given as a share of the pass's wall time:
  - score: ToMe's cosine similarities between the alternating halves and each token's best partner
    (`core.matching.cosine_partners`; the product of the halves is most of it);
  - pick: ranking the best scores and laying out the merges (`core.matching.merge_best`);
  - apply: the reduction applied to the features and the token state (`core.reduce`);
  - mask: the attention mask each reduced layer is handed (`core.attention_bias`);
  - window, rotary: ModernBERT's local layers' masks and its rotary angles at the tokens' original
    positions (`--long`);
  - rest: everything else in the hooks (reading the padding, budgets, bookkeeping, Python).
`--long LENGTH`: instead, `bench --task long`'s model (ModernBERT-base's shapes, random weights) on
its batch of random sequences of that length. The profiler's own cost inflates small operations;
the bench's overhead column, timed without it, is the figure to quote, and this the split of it.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

import torch
from torch.profiler import profile, record_function
from transformers import ModernBertModel

import tokenfuse
from tokenfuse.adapters import engine, hf_text, hooks
from tokenfuse.api.pipeline import pooling_of
from tokenfuse.api.text import encode_padded, padded_batches
from tokenfuse.assets.text import bbc_news, load_text_model
from tokenfuse.eval import bench_long, runtime
from tokenfuse.methods import tome

STEPS = {
    "score": (tome, "cosine_partners"),
    "pick": (tome, "merge_best"),
    "apply": (engine, "reduce"),
    "mask": (engine, "attention_bias"),
    "window": (hf_text.TextPatch, "local_mask"),
    "rotary": (hf_text.TextPatch, "rotary"),
}


def labelled(label: str, fn):
    @wraps(fn)
    def call(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return call


@contextmanager
def steps_labelled():
    """Each step (and every hook, as "hooks") under a profiler label while the block runs."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in STEPS.values()]
    saved.append((hooks.Hooks, "_clocked", hooks.Hooks._clocked))
    for label, (owner, name) in STEPS.items():
        setattr(owner, name, labelled(label, getattr(owner, name)))
    hooks.Hooks._clocked = labelled("hooks", hooks.Hooks._clocked)
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--long", type=int, help="ModernBERT-base's shapes at this length instead")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.long:
        config = bench_long.modernbert_base()
        model, pooling = runtime.random_model(ModernBertModel, config, "float32"), "mean"
        ids = bench_long.random_tokens(config, bench_long.default_batch(args.long), args.long)
        batches = [(list(range(len(ids))), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})]
    else:
        model, tokenizer = load_text_model("minilm")
        batches = padded_batches(model, tokenizer, bbc_news(args.documents).texts, 16, 512, 1.0)
        pooling = pooling_of(model)
    tokenfuse.apply(model, "tome", keep=args.keep)

    def run() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                encode_padded(model, *batch, pooling)
        return time.perf_counter() - start

    run()  # warm-up
    with steps_labelled(), profile() as prof:
        seconds = run()
    totals = {label: 0.0 for label in ("hooks", *STEPS)}
    for event in prof.key_averages():
        if event.key in totals:
            totals[event.key] = event.cpu_time_total / 1e6
    totals["rest"] = totals["hooks"] - sum(totals[label] for label in STEPS)
    shares = {label: value / seconds for label, value in totals.items()}
    inputs = (
        f"{len(batches[0][0])} x {args.long} random tokens"
        if args.long
        else f"{args.documents} BBC documents"
    )
    print(f"ToMe at keep {args.keep}, {inputs}, {torch.get_num_threads()} threads:")
    print(f"  pass {seconds:.2f} s under the profiler, tokenfuse's hooks {shares['hooks']:.1%} of it")
    for label in (*STEPS, "rest"):
        print(f"  {label:6s} {shares[label]:6.1%}")
    if args.json:
        record = {"keep": args.keep, "inputs": inputs, "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({**record, "seconds": seconds, "shares": shares}, indent=2) + "\n")


if __name__ == "__main__":
    main()
