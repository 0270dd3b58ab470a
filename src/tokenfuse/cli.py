"""The `tokenfuse` command line: `bench` (the main job) and `methods`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .data import MissingAsset


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenfuse", description="Training-free token reduction, measured.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="speed and quality of methods against the full model and baselines")
    b.add_argument("--model", default="minilm", help="'minilm' (packaged), a local folder or a hub id")
    b.add_argument("--data", default="bbc,lp50", help="comma list of: bbc (BBC News), lp50 (Lee LP50)")
    b.add_argument("--method", default="tome,truncation,random", help="comma list, or 'all'")
    b.add_argument("--keep", type=_floats, default=(0.5,), help="comma list of work fractions in (0, 1]")
    b.add_argument("--max-length", type=int, default=512, help="tokens per text (longer texts are truncated)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--limit", type=int, default=400, help="first N BBC documents of a fixed shuffled order")
    b.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median is reported)")
    b.add_argument(
        "--set",
        dest="options",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. --set similarity=keys (repeatable)",
    )
    b.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")

    sub.add_parser("methods", help="list the methods with their paper and options")
    return p


def bench_table(results: dict[str, Any]) -> Table:
    args = results["meta"]["arguments"]
    table = Table(
        title=f"tokenfuse bench: {args['model']}, {args['documents']} documents, "
        f"max length {args['max_length']}, batch {args['batch_size']}",
        caption="tokens, FLOPs: per layer, relative to full; speedup: median of "
        f"{args['repeats']} interleaved runs; scoring: share of run time spent choosing tokens; "
        "cosine: embeddings vs full",
    )
    columns = [
        ("method", "method"),
        ("keep", "keep"),
        ("tokens", "tokens"),
        ("FLOPs", "flops"),
        ("speedup", "speedup"),
        ("scoring", "scoring"),
        ("cosine", "cosine"),
        ("BBC acc %", "bbc_knn_acc"),
        ("LP50 r", "lp50_pearson"),
        ("LP50 ρ", "lp50_spearman"),
    ]
    columns = [(title, key) for title, key in columns if key in results["rows"][0]]
    for title, _ in columns:
        table.add_column(title, justify="left" if title == "method" else "right")
    for row in results["rows"]:
        cells = []
        for _, key in columns:
            value = row[key]
            if key == "method":
                cells.append(value)
            elif key == "keep":
                cells.append(f"{value:g}")
            elif key == "speedup":
                cells.append(f"{value:.2f}x")
            elif key == "scoring":
                cells.append(f"{100 * value:.1f}%")
            elif key == "bbc_knn_acc":
                cells.append(f"{value:.1f}")
            else:
                cells.append(f"{value:.3f}")
        table.add_row(*cells)
    return table


def methods_table() -> Table:
    import inspect

    from .methods import available

    table = Table(title="tokenfuse methods (baselines: full, truncation)")
    for title in ("name", "paper", "needs", "options"):
        table.add_column(title)
    for name, cls in available().items():
        params = [
            f"{p.name}={p.default!r}"
            for klass in cls.__mro__[:-1]
            if "__init__" in vars(klass)
            for p in inspect.signature(klass.__init__).parameters.values()
            if p.default is not inspect.Parameter.empty
        ]
        needs = ", ".join(sorted(cls().needs)) or "-"
        table.add_row(name, cls.paper, needs, ", ".join(params))
    return table


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:
        out = Console(width=120)  # tables piped to a file or README keep their columns
    try:
        if args.command == "methods":
            out.print(methods_table())
            return 0
        from . import bench

        results = bench.run(
            model_name=args.model,
            datasets=tuple(d.strip() for d in args.data.split(",") if d.strip()),
            methods=args.method,
            keeps=args.keep,
            max_length=args.max_length,
            batch_size=args.batch_size,
            limit=args.limit,
            repeats=args.repeats,
            options=dict(args.options),
            progress=not args.no_progress,
        )
    except (ValueError, TypeError, MissingAsset) as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    out.print(bench_table(results))
    for note in results["notes"]:
        err.print(f"note: {note}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        err.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
