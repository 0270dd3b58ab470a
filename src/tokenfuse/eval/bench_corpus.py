"""`tokenfuse bench --task embed`: the embed job's throughput on one process against Ray Data.

The same job (BBC News articles cut into paragraphs, the packaged MiniLM, a reduction) runs whole,
`embed_corpus` from its checks to its last shard, on the local engine and on a Ray cluster started
once before the rounds (as a user's cluster is up before a job; its start is reported apart). Rounds
are interleaved and the median kept, as in every bench; each run writes into a fresh folder, and the
two engines' embeddings are compared.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..api.progress import progress_bar
from ..assets.text import bbc_paragraphs
from ..corpus import Settings, Source, embed_corpus
from . import measure, meta

ENGINES = ("local", "ray")


def run(
    method: str = "tome",
    keep: float | None = 0.5,
    limit: int | None = 1000,
    max_length: int = 512,
    batch_size: int = 32,
    shard_size: int = 500,
    repeats: int = 3,
    cpus: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Results as {"meta", "rows", "notes"}: a row per engine with its median docs per second and
    its ratio to the local engine's. limit: BBC articles (None: all 2225); cpus: the local Ray
    cluster's CPUs (default: the machine's)."""
    measure.check_positive(max_length=max_length, limit=limit, batch_size=batch_size, repeats=repeats)
    import ray

    settings = Settings(
        method=method, keep=None if method == "full" else keep, max_length=max_length, batch_size=batch_size
    )
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "bbc_paragraphs.jsonl")
        records = bbc_paragraphs(limit)
        corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
        source = Source(corpus, "text", "id")
        started = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        ray_start = time.perf_counter() - started
        seconds: dict[str, list[float]] = {e: [] for e in ENGINES}
        outputs: dict[str, Path] = {}
        try:
            with progress_bar(progress) as bar:
                task = bar.add_task("embed bench", total=repeats * len(ENGINES))
                for r in range(repeats):
                    for engine in ENGINES:
                        bar.update(task, description=f"embed bench: {engine}, round {r + 1}")
                        out = Path(tmp, f"{engine}-{r}")
                        began = time.perf_counter()
                        embed_corpus(
                            source,
                            out,
                            settings,
                            shard_size=shard_size,
                            engine=engine,
                            progress=False,
                            report=lambda line: None,
                        )
                        seconds[engine].append(time.perf_counter() - began)
                        outputs[engine] = out
                        bar.advance(task)
        finally:
            ray.shutdown()
        vectors = {e: _embeddings(outputs[e]) for e in ENGINES}
    local = statistics.median(seconds["local"])
    rows = []
    for engine in ENGINES:
        median = statistics.median(seconds[engine])
        rows.append(
            {
                "name": engine,
                "method": method,
                "keep": keep if method != "full" else 1.0,
                "documents": len(records),
                "seconds": median,
                "docs_per_second": len(records) / median,
                "throughput": local / median,
                "max_abs_diff": float(np.abs(vectors[engine] - vectors["local"]).max()),
            }
        )
    arguments = {
        "task": "embed",
        "model": "minilm",
        "method": method,
        "keep": keep,
        "limit": limit,
        "documents": len(records),
        "max_length": max_length,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "repeats": repeats,
        "cpus": cpus,
    }
    notes = [f"starting the local Ray cluster took {ray_start:.1f} s, before the rounds (not in any row)"]
    return meta.results(rows, notes, arguments, ray_start_seconds=ray_start)


def _embeddings(folder: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    return np.stack(pq.read_table(folder)["embedding"].to_numpy(zero_copy_only=False))
