"""Why the benches interleave configurations a batch at a time: the same timings with configurations
taking turns a batch at a time (as `measure.timings` does) and a whole pass at a time (as it did),
alternately, on the default bench's setup (README, `tokenfuse bench`).

    .venv/bin/python scripts/timing_turns.py [--runs 2] [--repeats 3] [--limit 400] [--json FILE]

Each run times the full model, truncation at 0.5 and ToMe at 0.5 over the first `--limit` BBC News
documents (max length 512, batch 16) both ways, `--repeats` rounds each, and prints every round's
seconds and the speedups from the medians: how far two timings of the same thing land apart.
"""

from __future__ import annotations

import argparse
import json
import statistics

from tokenfuse.assets import text as data
from tokenfuse.eval import bench_text
from tokenfuse.eval.measure import FULL, Config, Pass, timings

CONFIGS = [FULL, Config("truncation", 0.5), Config("tome", 0.5)]


class WholePasses:
    """A task without `parts`: `timings` runs each configuration over all its inputs in turn."""

    def __init__(self, task: bench_text.TextTask):
        self.task, self.name = task, task.name

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        return self.task.run(config, warm_up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--json", help="write every round's seconds here")
    args = parser.parse_args()
    model, tokenizer = data.load_text_model("minilm")
    texts = data.bbc_news().texts[: args.limit]
    task = bench_text.TextTask("minilm", model, tokenizer, texts, 16, 512)
    out = []
    for run in range(args.runs):
        for turns, timed in (("batch", task), ("whole pass", WholePasses(task))):
            seconds = [[p.seconds for p in passes] for passes in timings(timed, CONFIGS, args.repeats)]
            medians = [statistics.median(s) for s in seconds]
            speedups = {c.label: medians[0] / m for c, m in zip(CONFIGS[1:], medians[1:], strict=True)}
            out.append({"run": run + 1, "turns": turns, "seconds": seconds, "speedups": speedups})
            pairs = zip(CONFIGS, seconds, strict=True)
            rounds = ", ".join(f"{c.label} {[round(x, 2) for x in s]}" for c, s in pairs)
            ratios = ", ".join(f"{k} {v:.3f}x" for k, v in speedups.items())
            print(f"run {run + 1}, a {turns} at a time: {ratios}; seconds: {rounds}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
