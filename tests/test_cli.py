"""The command line: the bench's JSON and table, the methods list, errors in one line before any
long work, Ctrl-C."""

import argparse
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
from rich.table import Table

import tokenfuse
from tokenfuse import cli
from tokenfuse.assets import text as data
from tokenfuse.cli.parser import parser
from tokenfuse.cli.tables import methods_table, result_tables
from tokenfuse.eval import bench_text, calibrate, report
from tokenfuse.eval.columns import text
from tokenfuse.methods import available

TEXT_RESULTS = Path(__file__).parent / "data" / "bench_minilm.json"
TEXT_COLUMNS = {  # title -> key, as the text bench's table shows them
    "method": "method",
    "keep": "keep",
    "tokens": "tokens",
    "FLOPs": "flops",
    "speedup": "speedup",
    "scoring": "scoring",
    "overhead": "overhead",
    "cosine": "cosine",
    "BBC acc %": "bbc_knn_acc",
    "LP50 r": "lp50_pearson",
    "LP50 ρ": "lp50_spearman",
}


def printed_table(out: str) -> tuple[list[str], list[list[str]]]:
    """The header and body cells of the one rich table printed to `out`."""
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    body = [line for line in out.splitlines() if line.startswith("│")]
    return [c.strip() for c in header.split("┃")[1:-1]], [
        [c.strip() for c in b.split("│")[1:-1]] for b in body
    ]


def one_line_error(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line, got: {err!r}"
    assert err.startswith("error: ")
    return err


@pytest.mark.integration
@pytest.mark.slow
def test_bench_writes_json_rows_for_every_method_and_baseline(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli.main(
        [
            "bench",
            "--limit",
            "16",
            "--repeats",
            "1",
            "--keep",
            "0.5",
            "--max-length",
            "128",
            "--batch-size",
            "8",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["meta"]) >= {"versions", "machine", "arguments"}
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"full", "tome", "truncation", "random"}
    for row in rows.values():
        assert set(row) >= set(TEXT_COLUMNS.values()) - {"bbc_knn_acc"}
        assert "bbc_knn_acc" not in row
    assert any(n.startswith("bbc_knn_acc left out") for n in results["notes"])  # 16 documents, 5 classes
    assert rows["full"]["tokens"] == 1.0 and rows["full"]["cosine"] > 0.9999
    for name in ("tome", "truncation", "random"):
        assert abs(rows[name]["tokens"] - 0.5) < 0.03 and rows[name]["flops"] < 0.6
        assert rows[name]["cosine"] < 1
    header, body = printed_table(capsys.readouterr().out)  # the table says what the JSON holds
    shown = {title: key for title, key in TEXT_COLUMNS.items() if key != "bbc_knn_acc"}
    assert header == list(shown)
    assert body == [[text(key, row[key]) for key in shown.values()] for row in results["rows"]]


def test_methods_lists_every_method_with_its_paper_and_options(capsys):
    assert cli.main(["methods"]) == 0
    table = methods_table()
    names, papers, _, options = (list(column.cells) for column in table.columns)
    assert names == list(available()) and papers == [cls.paper for cls in available().values()]
    assert all("keep: float = " in o for o in options)
    assert "similarity: 'hidden' | 'keys' = 'hidden'" in options[names.index("tome")]
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)


def test_methods_visual_lists_the_operators_alone(capsys):
    assert cli.main(["methods", "--visual"]) == 0
    printed = capsys.readouterr().out
    assert "visual-token operators" in printed and "tokenfuse methods (" not in printed
    assert all(name in printed for name in available("visual"))


def commands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_option_has_help_that_shows_its_default(command):
    sub = commands()[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        assert action.help, f"tokenfuse {command} {action.option_strings or action.dest} has no help"
        default = action.default
        if not (default is None or default is False or default == [] or default is argparse.SUPPRESS):
            assert f"(default: {default})" in formatter._expand_help(action), action.option_strings


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"tokenfuse {tokenfuse.__version__}\n"


def test_readme_bench_synopsis_names_every_option_and_task():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    synopsis = readme.split("## `tokenfuse bench`")[1].split("```")[1]
    bench = commands()["bench"]
    options = [o for a in bench._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert [o for o in options if o not in synopsis] == []
    (task,) = [a for a in bench._actions if a.dest == "task"]
    assert f"--task {'|'.join(task.choices)}]" in synopsis


def test_one_timing_run_is_not_called_a_median():
    results = json.loads(TEXT_RESULTS.read_text())
    results["meta"]["arguments"]["repeats"] = 1
    (shown,) = result_tables(results)
    assert "speedup: 1 run;" in shown.caption and "median" not in shown.caption
    results["meta"]["arguments"]["repeats"] = 3
    assert "speedup: median of 3 interleaved runs;" in result_tables(results)[0].caption


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--method", "tomee"], "unknown method(s) tomee (did you mean 'tome'?); choose from: all"),
        (["bench", "--method", "ToMe,nope"], "unknown method(s) ToMe (did you mean 'tome'?), nope; choose"),
        (["calibrate", "--keep", "0.5", "--method", "mctff"], "mctff (did you mean 'mctf'?); choose from"),
    ],
)
def test_an_unknown_method_on_the_command_line_suggests_the_close_one(capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_bad_input_gets_a_clear_error(capsys):
    assert cli.main(["bench", "--method", "tome,foo"]) == 2
    assert "unknown method(s) foo" in one_line_error(capsys.readouterr().err)
    assert cli.main(["bench", "--keep", "2"]) == 2
    assert "keep must be" in one_line_error(capsys.readouterr().err)
    assert cli.main(["bench", "--data", "imdb"]) == 2
    assert "unknown data set" in one_line_error(capsys.readouterr().err)


@pytest.fixture
def no_long_work(monkeypatch):
    """The long jobs of each command fail the test if they start."""

    def started(*args, **kwargs):
        raise AssertionError("the run started before its output path was checked")

    monkeypatch.setattr(bench_text, "run", started)
    monkeypatch.setattr(calibrate, "run_text", started)
    monkeypatch.setattr(report, "write_report", started)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "--json", "{missing}/r.json"], "--json {missing}/r.json: folder {missing} does not exist"),
        (["bench", "--json", "{tmp}"], "--json {tmp} is a folder; give a file name in it"),
        (["calibrate", "--keep", "0.5", "--out", "{missing}/c.json"], "--out {missing}/c.json: folder"),
        (["calibrate", "--keep", "0.5", "--json", "{missing}/r.json"], "--json {missing}/r.json: folder"),
        (
            ["report", str(TEXT_RESULTS), "-o", "{missing}/r.html"],
            "-o {missing}/r.html: folder {missing} does",
        ),
    ],
)
def test_an_output_path_that_cannot_be_written_fails_before_the_run(
    tmp_path, capsys, no_long_work, argv, expected
):
    paths = {"missing": tmp_path / "no" / "such", "tmp": tmp_path}
    assert cli.main([a.format(**paths) for a in argv]) == 2
    assert expected.format(**paths) in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["bench", "--no-progress"], (bench_text, "run")),
        (["calibrate", "--keep", "0.5", "--no-progress"], (calibrate, "run_text")),
        (["report", str(TEXT_RESULTS), "-o", "{tmp}/r.html"], (report, "write_report")),
        (["methods"], (Table, "add_row")),
    ],
)
def test_ctrl_c_ends_in_one_line_and_exit_code_130(tmp_path, capsys, monkeypatch, argv, target):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(*target, interrupt)
    try:
        code = cli.main([a.format(tmp=tmp_path) for a in argv])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command line as a traceback")
    assert code == 130
    assert capsys.readouterr().err == "interrupted\n"


def model_without_tokenizer(folder: Path) -> Path:
    """MiniLM's config and weights, and nothing else."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(data.minilm_path() / name, folder / name)
    return folder


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            "/nonexistent",
            "model '/nonexistent': no such folder, and not a packaged model (minilm) or a hub id",
        ),
        ("{tmp}/r.json", "model '{tmp}/r.json' is a file; give its folder"),
        ("{tmp}", "model folder {tmp} has no config.json"),
        ("{bare}", "model folder {bare} has no tokenizer files (none of tokenizer.json, vocab.txt"),
        (
            "tokenfuse-test/absent",
            "could not load model 'tokenfuse-test/absent' from the Hugging Face hub (and it is no local "
            "folder): We couldn't connect to 'https://huggingface.co' to load the files",
        ),
    ],
)
def test_a_model_that_cannot_be_loaded_is_one_clear_line(tmp_path, capsys, monkeypatch, model, expected):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "r.json").write_text("{}")
    paths = {"tmp": tmp_path, "bare": model_without_tokenizer(tmp_path / "bare")}
    assert cli.main(["bench", "--model", model.format(**paths), "--no-progress"]) == 2
    assert expected.format(**paths) in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "st", "--model", "x"], "the st bench runs the packaged MiniLM on BBC News: drop --model"),
        (["--task", "embed", "--set", "a=1"], "drop --set"),
        (["--task", "vlm", "--data-path", "x", "--config", "c.json"], "drop --data-path, --config"),
    ],
)
def test_packaged_benches_refuse_other_assets(capsys, argv, message):
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
