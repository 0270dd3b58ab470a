"""The command line: the bench's JSON and table, the methods list, errors."""

import json

import pytest

from tokenfuse import cli


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
        assert set(row) >= {
            "method",
            "keep",
            "tokens",
            "flops",
            "speedup",
            "cosine",
            "lp50_pearson",
            "lp50_spearman",
        }
    assert any(n.startswith("bbc_knn_acc left out") for n in results["notes"])  # 16 documents, 5 classes
    assert rows["full"]["tokens"] == 1.0 and rows["full"]["cosine"] > 0.9999
    for name in ("tome", "truncation", "random"):
        assert abs(rows[name]["tokens"] - 0.5) < 0.03 and rows[name]["flops"] < 0.6
        assert rows[name]["cosine"] < 1
    table = capsys.readouterr().out
    assert "tokenfuse bench" in table and "truncation" in table and "LP50" in table


def test_methods_lists_papers(capsys):
    assert cli.main(["methods"]) == 0
    assert "Token Merging" in capsys.readouterr().out


def test_bad_input_gets_a_clear_error(capsys):
    assert cli.main(["bench", "--method", "tome,foo"]) == 2
    assert "unknown method(s) foo" in capsys.readouterr().err
    assert cli.main(["bench", "--keep", "2"]) == 2
    assert "keep must be" in capsys.readouterr().err
    assert cli.main(["bench", "--data", "imdb"]) == 2
    assert "unknown data set" in capsys.readouterr().err
