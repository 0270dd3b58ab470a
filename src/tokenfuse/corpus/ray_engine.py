"""The embed job as a Ray Data pipeline: the pending shards flow through `map_batches` on an actor
pool, each actor loading the model once and, per shard, reading its rows from the input, embedding
them and writing the Parquet shard (atomically, as the local engine does: the same shards, the same
resume rule). On a cluster the input and the output folder must be paths every node sees (a shared
file system); nothing else changes but `address`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .job import Embedder, Plan, Settings

THREADS = 4  # torch threads per actor, unless given: past a few, one more actor gains more


class ShardWriter:
    """A Ray actor: loads the model once, then embeds and writes the shards it is handed."""

    def __init__(self, plan: Plan, out: Path, settings: Settings, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.plan = plan
        self.embedder = Embedder(settings, out)

    def __call__(self, batch: dict) -> dict:
        done = [self.embedder.write(int(k), self.plan.rows_of(int(k))) for k in batch["shard"]]
        return {"shard": batch["shard"], "rows": [d[0] for d in done], "truncated": [d[1] for d in done]}


def run_ray(
    plan: Plan,
    out: Path,
    settings: Settings,
    address: str | None,
    actors: int | None,
    threads: int | None,
    finished: Callable[[int, int], None],
) -> None:
    """Run the pending shards of `plan` on Ray (a local one unless `address` names a cluster); call
    `finished(rows, truncated)` as each shard is written."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'tokenfuse[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        if not plan.pending:
            return
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if threads is None:
            threads = max(1, cpus // actors) if actors else min(THREADS, cpus)
        if actors is None:
            actors = max(1, cpus // threads)
        if threads * actors > cpus:
            raise ValueError(
                f"{actors} actors of {threads} threads need {actors * threads} CPUs and the cluster has "
                f"{cpus}; lower --actors or --threads"
            )
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts documents
        shards = ray.data.from_items(
            [{"shard": k} for k in plan.pending], override_num_blocks=len(plan.pending)
        )
        written = shards.map_batches(
            ShardWriter,
            fn_constructor_kwargs={"plan": plan, "out": out, "settings": settings, "threads": threads},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(plan.pending))),
            num_cpus=threads,
        )
        for row in written.iter_rows():
            finished(int(row["rows"]), int(row["truncated"]))
    finally:
        if started:
            ray.shutdown()
