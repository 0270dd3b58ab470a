"""Where token reduction stops paying on a text encoder, and what the length floor buys.

    .venv/bin/python scripts/length_floor.py [--model minilm] [--keep 0.5] [--repeats 5]
                                             [--articles 200] [--json results/length_floor.json]

Two measurements on the packaged MiniLM (or any supported text encoder):

1. Speed by length: batches of 16 texts of exactly L tokens (cut from BBC News articles), the full
   model against the method at `keep` with no floor (min_tokens=0), interleaved rounds, median time
   per configuration; the speedup at each L shows below which length reduction costs more than it
   saves (the hooks cost about the same at any length, the attention saved shrinks with it).
2. Quality by length: BBC News paragraphs (the corpus `tokenfuse embed` is described for), each
   embedding's cosine to the full model's, by length bucket, with no floor and with the default
   floor (`adapters.hf_text.MIN_TOKENS`).

The floor the text adapter uses by default is chosen from 1.; README shows 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import tokenfuse
from tokenfuse.adapters.hf_text import MIN_TOKENS
from tokenfuse.assets.text import bbc_news, bbc_paragraphs, load_text_model

LENGTHS = (8, 16, 24, 32, 48, 64, 96, 128, 256, 512)
BUCKETS = ((0, 16), (16, 32), (32, 64), (64, 128), (128, 10_000))


def speed_by_length(model, tokenizer, method: str, keep: float, repeats: int, batch: int = 16) -> list[dict]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in bbc_news(64).texts]
    ids = [x for x in ids if len(x) >= max(LENGTHS)][:batch]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = []
    for length in LENGTHS:
        input_ids = torch.tensor([[cls, *x[: length - 2], sep] for x in ids])
        mask = torch.ones_like(input_ids)
        times: dict[str, list[float]] = {"full": [], method: []}
        for r in range(repeats + 1):  # the first round warms up, uncounted
            for name in times:
                if name == "full":
                    tokenfuse.remove(model)
                else:
                    tokenfuse.apply(model, method, keep=keep, min_tokens=0)
                start = time.perf_counter()
                with torch.inference_mode():
                    for _ in range(max(1, 256 // length)):
                        model(input_ids=input_ids, attention_mask=mask)
                if r:
                    times[name].append(time.perf_counter() - start)
        tokenfuse.remove(model)
        full, reduced = statistics.median(times["full"]), statistics.median(times[method])
        rows.append({"length": length, "speedup": full / reduced})
        print(f"length {length:4d}: {method} at keep {keep} without a floor: {full / reduced:.2f}x")
    return rows


def quality_by_length(model, tokenizer, method: str, keep: float, articles: int) -> list[dict]:
    texts = [p["text"] for p in bbc_paragraphs(articles)]
    lengths = torch.tensor([len(tokenizer(t)["input_ids"]) for t in texts])
    tokenfuse.remove(model)
    full = tokenfuse.embed(model, tokenizer, texts, batch_size=32, progress=False)
    cosines = {}
    for floor in (0, None):
        tokenfuse.apply(model, method, keep=keep, min_tokens=floor)
        reduced = tokenfuse.embed(model, tokenizer, texts, batch_size=32, progress=False)
        cosines[floor] = torch.nn.functional.cosine_similarity(reduced, full, dim=-1)
    tokenfuse.remove(model)
    rows = []
    for lo, hi in BUCKETS:
        chosen = (lengths >= lo) & (lengths < hi)
        if not chosen.any():
            continue
        row = {"tokens": f"{lo}-{hi - 1}" if hi < 10_000 else f"{lo}+", "texts": int(chosen.sum())}
        for floor, name in ((0, "no_floor"), (None, f"floor_{MIN_TOKENS}")):
            row[f"{name}_mean"] = float(cosines[floor][chosen].mean())
            row[f"{name}_min"] = float(cosines[floor][chosen].min())
        rows.append(row)
        print(
            f"{row['tokens']:>8} tokens, {row['texts']:4d} paragraphs: cosine without a floor "
            f"{row['no_floor_mean']:.3f} (min {row['no_floor_min']:.3f}), with the default floor of "
            f"{MIN_TOKENS} {row[f'floor_{MIN_TOKENS}_mean']:.3f} (min {row[f'floor_{MIN_TOKENS}_min']:.3f})"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--method", default="tome")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--articles", type=int, default=200)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_text_model(args.model)
    out = {"model": args.model, "method": args.method, "keep": args.keep, "default_floor": MIN_TOKENS}
    if not args.skip_speed:
        out["speed"] = speed_by_length(model, tokenizer, args.method, args.keep, args.repeats)
    out["quality"] = quality_by_length(model, tokenizer, args.method, args.keep, args.articles)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
