"""The output folder of `tokenfuse embed`: Parquet shards, written so that a crash never leaves one
that looks complete.

A shard is written to a hidden temporary file, flushed to disk, then renamed to its final name
(`part-00012.parquet`) in one atomic step: a shard with its final name is complete; anything else is
a leftover of a killed run and is deleted when the job starts again. The job's manifest
(`_tokenfuse_embed.json`, written the same way) records what defines the embeddings and the input's
fingerprint, so a rerun continues only the same job on the same input. Parquet readers skip files
whose names start with "_" or ".", so the folder reads as one table: `pyarrow.parquet.read_table(out)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "_tokenfuse_embed.json"
METADATA_KEY = b"tokenfuse"


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file under a hidden temporary name, flush it to disk, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def write_shard(folder: Path, shard: int, ids: list[Any], embeddings, metadata: dict[str, Any]) -> None:
    """(n,) ids and (n, C) float32 embeddings as one Parquet shard: columns `id` and `embedding` (a
    fixed-size list), the job's description in the file's metadata under "tokenfuse"."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = np.ascontiguousarray(embeddings, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    table = pa.table({"id": pa.array(ids), "embedding": column})
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    write_atomic(folder / shard_name(shard), lambda tmp: pq.write_table(table, tmp))


def done_shards(folder: Path) -> set[int]:
    """Shards with their final name: complete by construction."""
    return {int(f.name[5:10]) for f in folder.glob("part-[0-9][0-9][0-9][0-9][0-9].parquet")}


def prepare(folder: Path, job: dict[str, Any]) -> None:
    """Make `folder` (whose parent `embed_corpus` checked) the output of `job`: create it, or check
    that it holds this same job (else an error naming what differs). Leftovers of a killed run are
    deleted."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output {folder} is a file; give a folder for the shards")
    manifest = folder / MANIFEST
    job = json.loads(json.dumps(job))  # as it reads back: tuples are lists
    if folder.is_dir() and manifest.is_file():
        held = json.loads(manifest.read_text())
        differs = [f"{k}={held.get(k)!r} there, {v!r} here" for k, v in job.items() if held.get(k) != v]
        if differs:
            raise ValueError(
                f"output {folder} holds another job ({'; '.join(differs)}): rerun that command to resume "
                "it, or write to a new folder"
            )
    elif folder.is_dir() and any(not f.name.startswith(".") for f in folder.iterdir()):
        raise ValueError(f"output {folder} is not empty and holds no tokenfuse embed job; give a new folder")
    else:
        folder.mkdir(exist_ok=True)
        write_atomic(manifest, lambda tmp: tmp.write_text(json.dumps(job, indent=2)))
    for leftover in folder.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
