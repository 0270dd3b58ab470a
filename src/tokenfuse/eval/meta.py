"""What every bench's results record beside their rows (the "meta" of its JSON): versions, machine
and arguments."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any

import torch

from .. import __version__


def environment() -> dict[str, Any]:
    """Versions and machine, recorded with every result."""
    import transformers

    return {
        "versions": {
            "tokenfuse": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(),
        },
    }


def arguments(
    task: str,
    methods: str,
    keeps: Sequence[float],
    limit: int | None,
    batch_size: int | None,
    repeats: int,
    options: dict[str, Any] | None,
    **more: Any,
) -> dict[str, Any]:
    """The arguments a comparison bench ran with, as its results record them (`more`: the task's own)."""
    return {
        "task": task,
        "methods": methods,
        "keeps": list(keeps),
        "limit": limit,
        "batch_size": batch_size,
        "repeats": repeats,
        "options": options or {},
        **more,
    }


def results(rows: list[dict[str, Any]], notes, arguments: dict[str, Any], **record: Any) -> dict[str, Any]:
    """What every bench returns and writes as JSON: {"meta": versions, machine, the arguments it ran
    with and any other `record`; "rows"; "notes"}, the shape `tokenfuse report` and the tables read."""
    return {"meta": {**environment(), "arguments": arguments, **record}, "rows": rows, "notes": list(notes)}
