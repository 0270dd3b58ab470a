"""`tokenfuse embed`: a corpus through a reduced encoder into Parquet shards, resumable.

The corpus is cut into shards of `shard_size` input rows (shard k: rows k*size .. (k+1)*size - 1,
bad rows skipped), each embedded on its own and written atomically (`shards`). Killed at any moment,
the same command continues with the shards not yet written; since a shard's content depends only on
its rows and the job's settings, the final output equals an uninterrupted run's. Every check that can
fail (input, fields, model, method, budget, bad rows, output folder) runs before the first shard.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .. import __version__
from ..api import apply, embed, patch_of
from ..api.pipeline import pipeline_of
from ..api.progress import progress_bar
from ..api.text import TruncationWarning
from ..assets.text import load_text_model
from ..core.messages import plural
from . import shards
from .sources import Row, Scan, Source

Engine = Literal["local", "ray"]
OnError = Literal["skip", "stop"]
SKIPPED = "_skipped.json"


@dataclass(frozen=True)
class Settings:
    """What defines the embeddings: the model, the reduction, the tokens and batches, and whether
    they are normalised (None: as the model's own pipeline does, `pipeline_of`; False: never). Two
    runs with equal settings on the same rows write equal shards."""

    model: str = "minilm"
    method: str | None = "tome"  # "full": the model unreduced; None with a config
    keep: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # a calibrated configuration (`tokenfuse calibrate`)
    max_length: int | None = None
    batch_size: int = 32
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive int, got {self.batch_size!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max length must be a positive number of tokens, got {self.max_length}")
        if self.config is not None and (self.method is not None or self.keep is not None or self.options):
            raise ValueError(
                "a config sets the method and its budget: give --config alone, without --method/--keep"
            )
        if self.method == "full" and (self.keep is not None or self.options):
            raise ValueError("method full embeds with the unreduced model: drop --keep and the options")

    def load(self):
        """(model, tokenizer): the model loaded and the reduction applied."""
        model, tokenizer = load_text_model(self.model)
        if self.config is not None:
            apply(model, config=self.config)
        elif self.method != "full":
            apply(model, self.method, self.keep, **self.options)
        return model, tokenizer

    def describe(self, model) -> dict[str, Any]:
        """The settings as recorded in the manifest and each shard's metadata (the budget resolved)."""
        patch = patch_of(model)
        method = patch.method if patch is not None else None
        return {
            **asdict(self),
            "method": self.config["method"] if self.config else self.method,
            "keep": None if method is None else round(float(method.keep), 6),
        }


@dataclass
class Embedder:
    """A loaded (reduced) model that turns a shard's rows into a written Parquet shard."""

    settings: Settings
    out: Path

    def __post_init__(self) -> None:
        self.model, self.tokenizer = self.settings.load()
        self.pipeline = pipeline_of(self.model, normalize=self.settings.normalize)  # read once, resolved
        self.metadata = {
            **self.settings.describe(self.model),
            **asdict(self.pipeline),
            "tokenfuse": __version__,
        }

    def write(self, shard: int, rows: list[Row]) -> tuple[int, int]:
        """Embed the shard's good rows and write it; (rows written, texts truncated to max length)."""
        good = [r for r in rows if not r.problem]
        truncated = 0
        if good:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", TruncationWarning)
                vectors = embed(
                    self.model,
                    self.tokenizer,
                    [r.text for r in good],
                    batch_size=self.settings.batch_size,
                    max_length=self.settings.max_length,
                    pooling=self.pipeline.pooling,
                    normalize=self.pipeline.normalize,
                    progress=False,
                ).numpy()
            truncated = sum(w.message.count for w in caught if isinstance(w.message, TruncationWarning))
            for w in caught:
                if not isinstance(w.message, TruncationWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        else:
            vectors = np.zeros((0, self.model.config.hidden_size), np.float32)
        shards.write_shard(self.out, shard, [r.id for r in good], vectors, {**self.metadata, "shard": shard})
        return len(good), truncated


@dataclass(frozen=True)
class Plan:
    """The shards of a job: where each starts in the source, and which are still to write."""

    source: Source
    scan: Scan
    shard_size: int
    pending: list[int]

    def rows_of(self, shard: int) -> list[Row]:
        first = shard * self.shard_size
        return self.source.read(self.scan.starts[shard], first, min(self.shard_size, self.scan.rows - first))


def embed_corpus(
    source: Source,
    out: Path,
    settings: Settings,
    shard_size: int = 1000,
    on_error: OnError = "skip",
    engine: Engine = "local",
    address: str | None = None,
    actors: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Embed every good row of `source` into Parquet shards under `out`, continuing a killed run of
    the same job. Returns a summary (rows, embedded, skipped, shards, seconds, docs per second)."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard size must be a positive int, got {shard_size!r}")
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be skip or stop, got {on_error!r}")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be local or ray, got {engine!r}")
    if engine == "local" and address is not None:
        raise ValueError("--address names a Ray cluster: use it with --engine ray")
    for name, value in (("actors", actors), ("threads", threads)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if engine == "local" and actors is not None:
        raise ValueError("--actors sets Ray's actor pool: use it with --engine ray")
    if not out.parent.is_dir():
        raise ValueError(
            f"output {out}: its parent folder {out.parent} does not exist; create it or write elsewhere "
            "(the output folder itself is created, not its parents)"
        )
    source, out = replace(source, path=source.path.resolve()), out.resolve()  # as a Ray worker sees them
    source.check()
    embedder = Embedder(settings, out)  # an unknown model or method, a budget out of range: now
    scan = source.scan(shard_size)
    listed = ", ".join(f"{r.id!r} ({r.problem})" for r in scan.bad[:10])
    listed += f" and {len(scan.bad) - 10} more" if len(scan.bad) > 10 else ""
    if scan.bad and on_error == "stop":
        raise ValueError(
            f"{plural(len(scan.bad), 'bad row')} in {source.path}: {listed}; fix them, or skip them "
            "with --on-error skip"
        )
    job = {
        "input": str(source.path.resolve()),
        "fingerprint": source.fingerprint(),
        "text_field": source.text_field,
        "id_field": source.id_field,
        "rows": scan.rows,
        "shard_size": shard_size,
        **asdict(settings),
        **asdict(embedder.pipeline),  # as resolved: unnormalised shards are never continued normalised
    }
    shards.prepare(out, job)
    bad = [{"id": r.id, "problem": r.problem} for r in scan.bad]
    shards.write_atomic(out / SKIPPED, lambda tmp: tmp.write_text(json.dumps(bad, indent=1)))
    if scan.bad:  # said once the list is written: a refused run writes none
        report(f"skipping {plural(len(scan.bad), 'bad row')}: {listed} (all listed in {out / SKIPPED})")
    count = len(scan.starts)
    done = shards.done_shards(out)
    pending = [k for k in range(count) if k not in done]
    embedded_before = _rows_in(out, done)
    started = time.perf_counter()
    written, truncated = 0, 0
    with progress_bar(progress, unit="docs") as bar:
        task = bar.add_task("embedding", total=scan.rows - len(scan.bad), completed=embedded_before)

        def finished(rows: int, cut: int) -> None:
            nonlocal written, truncated
            written, truncated = written + rows, truncated + cut
            bar.advance(task, rows)

        plan = Plan(source, scan, shard_size, pending)
        if engine == "local":
            with torch_threads(threads):
                for k in plan.pending:
                    finished(*embedder.write(k, plan.rows_of(k)))
        else:
            from .ray_engine import run_ray

            run_ray(plan, out, settings, address, actors, threads, finished)
    seconds = time.perf_counter() - started
    if truncated:
        report(f"truncated to the max length: {plural(truncated, 'text')} longer than it")
    return {
        "rows": scan.rows,
        "embedded": embedded_before + written,
        "skipped": len(scan.bad),
        "shards": count,
        "resumed_from": len(done),
        "seconds": seconds,
        "docs_per_second": written / seconds if seconds > 0 else float("nan"),
        "truncated": truncated,
        "output": str(out),
        "tokenfuse": __version__,
    }


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's thread count set for the job and restored after it (it is the process's)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rows_in(out: Path, done: set[int]) -> int:
    if not done:
        return 0
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(out / shards.shard_name(k)).metadata.num_rows for k in done)
