"""What torch.compile costs and gives on a reduced text encoder: compile time and time per call.

    .venv/bin/python scripts/compile_time.py [--model minilm] [--keep 0.5] [--docs 16] [--max-length 512]
                                             [--calls 3] [--json results/compile_time.json]

The packaged MiniLM unreduced, with ToMe in the default mode and with ToMe in static mode, each
compiled by `torch.compile(model, dynamic=True)` (as README shows) in a fresh process with an
empty inductor cache, so that each compiles from nothing. On one batch of `--docs` BBC News
articles cut at `--max-length` tokens: the first call (compilation included), the median of
`--calls` compiled calls after one more, and the median of as many eager calls after one; graphs
compiled, graph breaks and recompile-limit hits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"full": {}, "tome": {}, "tome static": {"static": True}}


def measure(config: str, model_name: str, keep: float, docs: int, max_length: int, calls: int) -> dict:
    """One configuration, in this process (which must be fresh)."""
    import torch
    from torch._dynamo.utils import counters

    import tokenfuse
    from tokenfuse.assets.text import bbc_news, load_text_model

    model, tokenizer = load_text_model(model_name)
    if config != "full":
        tokenfuse.apply(model, "tome", keep=keep, **CONFIGS[config])
    batch = tokenizer(
        bbc_news(docs).texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )

    def seconds(fn) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            fn(**batch)
        return time.perf_counter() - start

    seconds(model)  # warm-up, uncounted (the compiled model's second call still loads kernels)
    eager = statistics.median(seconds(model) for _ in range(calls))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=True)
    first = seconds(compiled)
    seconds(compiled)
    steady = statistics.median(seconds(compiled) for _ in range(calls))
    limited = [n for k, n in counters["unimplemented"].items() if k.startswith("Dynamo recompile limit")]
    return {
        "config": config,
        "tokens": list(batch["input_ids"].shape),
        "first_call_s": first,
        "compiled_call_s": steady,
        "eager_call_s": eager,
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "limit_hits": sum(limited),
    }


def in_fresh_process(config: str, args: argparse.Namespace) -> dict:
    """`measure` in a new interpreter with an empty inductor cache (cold: nothing compiled before)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
        command = [sys.executable, __file__, "--one", config, "--model", args.model]
        command += ["--keep", str(args.keep), "--docs", str(args.docs), "--max-length", str(args.max_length)]
        command += ["--calls", str(args.calls)]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.keep, args.docs, args.max_length, args.calls)))
        return
    rows = [in_fresh_process(config, args) for config in CONFIGS]
    docs, tokens = rows[0]["tokens"]
    print(f"{args.model}, one batch of {docs} BBC News articles x {tokens} tokens, ToMe at keep {args.keep},")
    print("torch.compile(dynamic=True) from a cold cache; seconds")
    head = f"{'first call':>10} {'compiled':>9} {'eager':>7} {'graphs':>7} {'breaks':>7} {'limit hits':>10}"
    print(f"{'':12} {head}")
    for r in rows:
        times = f"{r['first_call_s']:10.1f} {r['compiled_call_s']:9.2f} {r['eager_call_s']:7.2f}"
        print(f"{r['config']:12} {times} {r['graphs']:7d} {r['graph_breaks']:7d} {r['limit_hits']:10d}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
