"""`tokenfuse embed`: sources read the same rows in every format and shard by shard; the job writes
each good row once, equal to `tokenfuse.embed`, skips or stops on bad rows, and resumes a killed run
to the output of an uninterrupted one (SIGKILL included), on one process or on Ray."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_bert

import tokenfuse
from tokenfuse import cli
from tokenfuse.corpus import Settings, Source, embed_corpus
from tokenfuse.corpus import shards as shard_files

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Short one.",
    'A line with "quotes", commas, and\na newline inside.',
    "Markets rallied on Tuesday as investors weighed new figures on inflation and jobs.",
    "A film about a film about a film.",
    "Tokens that look alike can be merged; tokens that stand alone should be kept apart.",
    "Another document, of middling length, about nothing in particular at all.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random BERT saved as a model folder, loaded by name as a user's model would be."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_bert().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def rows(n: int = 23) -> list[dict]:
    return [{"id": f"doc-{i}", "text": f"{TEXTS[i % len(TEXTS)]} (copy {i})"} for i in range(n)]


def write(path: Path, records: list[dict]) -> Path:
    """The records as a JSON Lines, CSV or Parquet file, by the path's suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=["id", "text"])
            out.writeheader()
            out.writerows(records)
    else:
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=5)
    return path


def read_output(folder: Path) -> tuple[list, np.ndarray]:
    table = pq.read_table(folder)
    return table["id"].to_pylist(), np.stack(table["embedding"].to_numpy(zero_copy_only=False))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_every_format_reads_the_same_rows_shard_by_shard(tmp_path, suffix):
    records = rows()
    source = Source(write(tmp_path / f"in{suffix}", records), "text", "id")
    scan = source.scan(shard_size=4)
    assert scan.rows == len(records) and len(scan.starts) == 6 and not scan.bad
    read = []
    for k, start in enumerate(scan.starts):  # each shard read alone, from its recorded start
        read += source.read(start, 4 * k, min(4, len(records) - 4 * k))
    assert [(r.id, r.text) for r in read] == [(r["id"], r["text"]) for r in records]


def test_a_folder_of_text_files_is_read_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    for name, text in [("b/2.txt", "two"), ("a.txt", "one"), ("b/1.txt", "three"), (".hidden", "x")]:
        (tmp_path / name).write_text(text)
    source = Source(tmp_path)
    scan = source.scan(shard_size=2)
    got = source.read(scan.starts[1], 2, 1)
    assert [(r.id, r.text) for r in source.read(0, 0, 3)] == [
        ("a.txt", "one"),
        ("b/1.txt", "three"),
        ("b/2.txt", "two"),
    ]
    assert [r.id for r in got] == ["b/2.txt"]


def test_bad_rows_are_found_with_their_ids(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"id": "a", "text": "fine"}\n'
        '{"id": "b", "text": "  "}\n'
        "\n"  # a blank line is no row
        '{"id": "c"}\n'
        '{"id": "d", "text": 5}\n'
        "{not json\n"
        '{"text": "no id"}\n'
    )
    scan = Source(path, "text", "id").scan(shard_size=10)
    assert scan.rows == 6
    assert [(r.id, r.problem.split(" (")[0]) for r in scan.bad] == [
        ("b", "empty text"),
        ("c", "no text in field 'text'"),
        ("d", "field 'text' holds a int, not text"),
        (4, "line is not valid JSON"),
        ("row 5", "no id in field 'id'"),
    ]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: write(d / "in.csv", rows()), "no 'body' in its CSV header"),
        (lambda d: write(d / "in.parquet", rows()), "no 'body' in its Parquet columns"),
        (lambda d: write(d / "in.jsonl", rows()), "no row has a text in field 'body'"),
        (lambda d: d / "missing.jsonl", "does not exist"),
        (lambda d: (d / "in.txt").write_text("x") and d / "in.txt", "unknown format .txt"),
    ],
)
def test_a_wrong_field_or_input_is_an_error_before_any_work(tmp_path, make, message):
    source = Source(make(tmp_path), "body", None)
    with pytest.raises(ValueError, match=message):
        source.check()
        source.scan(10)


def test_a_wrong_id_field_is_named_with_its_option(tmp_path):
    source = Source(write(tmp_path / "in.jsonl", rows()), "text", "doc_id")
    named = (
        r"no row has an id in field 'doc_id' \(no id in field 'doc_id'\); choose the field with --id-field"
    )
    with pytest.raises(ValueError, match=named):
        source.scan(10)


def test_duplicate_ids_are_refused(tmp_path):
    records = rows(5) + [rows(5)[2]]
    with pytest.raises(ValueError, match="'doc-2' occurs more than once"):
        Source(write(tmp_path / "in.jsonl", records), "text", "id").scan(10)


def test_the_output_is_each_good_row_once_equal_to_embed(tmp_path, model_dir):
    records = rows()
    records[3]["text"] = ""
    source = Source(write(tmp_path / "in.jsonl", records), "text", "id")
    settings = Settings(model=str(model_dir), keep=0.5, batch_size=3)
    summary = embed_corpus(
        source, tmp_path / "out", settings, shard_size=5, progress=False, report=lambda s: None
    )
    ids, vectors = read_output(tmp_path / "out")
    good = [r for r in records if r["text"]]
    assert ids == [r["id"] for r in good] and summary["embedded"] == len(good) and summary["skipped"] == 1
    model, tokenizer = tokenfuse.assets.text.load_text_model(str(model_dir))
    tokenfuse.apply(model, "tome", keep=0.5)
    expect = [
        tokenfuse.embed(model, tokenizer, [r["text"] for r in records[k : k + 5] if r["text"]], batch_size=3)
        for k in range(0, len(records), 5)
    ]  # shard by shard, as the job batches them
    np.testing.assert_array_equal(vectors, torch.cat(expect).numpy())
    assert json.loads((tmp_path / "out" / "_skipped.json").read_text()) == [
        {"id": "doc-3", "problem": "empty text"}
    ]
    meta = json.loads(
        pq.ParquetFile(tmp_path / "out" / "part-00000.parquet").schema_arrow.metadata[b"tokenfuse"]
    )
    assert (meta["method"], meta["keep"], meta["model"], meta["shard"]) == ("tome", 0.5, str(model_dir), 0)


def test_stop_on_a_bad_row_fails_before_any_file_is_written(tmp_path, model_dir):
    records = rows(8)
    del records[6]["text"]
    source = Source(write(tmp_path / "in.jsonl", records), "text", "id")
    with pytest.raises(ValueError, match=r"1 bad row in .*'doc-6' \(no text in field 'text'\)"):
        embed_corpus(
            source, tmp_path / "out", Settings(model=str(model_dir)), on_error="stop", progress=False
        )
    assert not (tmp_path / "out").exists()


def test_a_rerun_resumes_rewrites_only_missing_shards_and_refuses_another_job(tmp_path, model_dir):
    source = Source(write(tmp_path / "in.jsonl", rows()), "text", "id")
    out, settings = tmp_path / "out", Settings(model=str(model_dir), keep=0.5)
    run = dict(shard_size=5, progress=False, report=lambda s: None)
    embed_corpus(source, out, settings, **run)
    ids, vectors = read_output(out)
    stamp = {k: (out / shard_files.shard_name(k)).stat().st_mtime_ns for k in (0, 1, 3, 4)}
    (out / shard_files.shard_name(2)).unlink()  # as if killed before shard 2 was renamed into place
    (out / ".part-00002.parquet.1234.tmp").write_bytes(b"half a shard")
    summary = embed_corpus(source, out, settings, **run)
    assert summary["resumed_from"] == 4 and summary["embedded"] == len(ids)
    assert {k: (out / shard_files.shard_name(k)).stat().st_mtime_ns for k in stamp} == stamp
    assert not list(out.glob(".*.tmp"))
    again_ids, again = read_output(out)
    assert again_ids == ids
    np.testing.assert_array_equal(again, vectors)
    with pytest.raises(ValueError, match="holds another job .*keep=0.5 there, 0.3 here"):
        embed_corpus(source, out, Settings(model=str(model_dir), keep=0.3), **run)


def test_an_output_folder_that_is_not_a_job_is_refused(tmp_path, model_dir):
    source = Source(write(tmp_path / "in.jsonl", rows(4)), "text", "id")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no tokenfuse embed job"):
        embed_corpus(source, tmp_path / "out", Settings(model=str(model_dir)), progress=False)
    with pytest.raises(ValueError, match="does not exist; create it"):
        embed_corpus(source, tmp_path / "no" / "out", Settings(model=str(model_dir)), progress=False)


def test_bad_rows_are_announced_only_when_the_run_goes_on_and_lists_them(tmp_path, model_dir):
    records = rows(4)
    records[1]["text"] = ""
    source, said = Source(write(tmp_path / "in.jsonl", records), "text", "id"), []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    run = dict(settings=Settings(model=str(model_dir)), progress=False, report=said.append)
    with pytest.raises(ValueError, match="not empty"):
        embed_corpus(source, tmp_path / "taken", **run)
    assert said == [] and not (tmp_path / "taken" / "_skipped.json").exists()
    embed_corpus(source, tmp_path / "out", **run)
    skipping = [s for s in said if s.startswith("skipping")]
    listed = (tmp_path / "out").resolve() / "_skipped.json"
    assert skipping == [f"skipping 1 bad row: 'doc-1' (empty text) (all listed in {listed})"]
    assert (tmp_path / "out" / "_skipped.json").is_file()


def test_embed_creates_its_output_folder_and_names_a_missing_parent_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["embed", "--help"])
    assert "created if missing; its parent folder must exist" in " ".join(capsys.readouterr().out.split())
    path = write(tmp_path / "in.jsonl", rows(4))
    code = cli.main(["embed", str(path), "-o", str(tmp_path / "no" / "out"), "--model", "/nonexistent"])
    assert code == 2
    assert f"its parent folder {tmp_path / 'no'} does not exist; create it" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--keep", "2"], "keep"),
        (["--method", "nope"], "nope"),
        (["--address", "ray://x:10001"], "--address names a Ray cluster"),
        (["--method", "full", "--keep", "0.5"], "drop --keep"),
        (["--text-field", "body"], "no row has a text in field 'body'"),
        (
            ["--id-field", "doc_id"],
            "no row has an id in field 'doc_id' (no id in field 'doc_id'); choose the field with --id-field",
        ),
    ],
)
def test_cli_errors_are_one_line_before_any_work(tmp_path, model_dir, capsys, argv, message):
    path = write(tmp_path / "in.jsonl", rows(4))
    code = cli.main(["embed", str(path), "-o", str(tmp_path / "out"), "--model", str(model_dir), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def bbc_paragraphs(path: Path, documents: int) -> Path:
    from tokenfuse.assets.text import bbc_paragraphs

    path.write_text("".join(json.dumps(r) + "\n" for r in bbc_paragraphs(documents)))
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_part_way_then_rerun_equals_an_uninterrupted_run(tmp_path):
    corpus = bbc_paragraphs(tmp_path / "bbc.jsonl", 600)
    n = len(corpus.read_text().splitlines())
    assert n > 3000
    command = [
        sys.executable,
        "-m",
        "tokenfuse.cli",
        "embed",
        str(corpus),
        "--id-field",
        "id",
        "--max-length",
        "64",
        "--shard-size",
        "200",
        "--no-progress",
        "-o",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    job = subprocess.Popen(
        [*command, str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while len(list(out.glob("part-*.parquet"))) < 3 and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = len(list(out.glob("part-*.parquet")))
    assert 3 <= done < -(-n // 200), "the kill came after the run had finished: nothing was resumed"
    rerun = subprocess.run([*command, str(out)], check=True, env=env, capture_output=True, text=True)
    assert f"resumed after {done} complete shards" in rerun.stderr
    ids, vectors = read_output(out)
    whole_ids, whole = read_output(tmp_path / "whole")
    assert len(ids) == len(set(ids)) == n and ids == whole_ids
    np.testing.assert_array_equal(vectors, whole)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="pip install 'tokenfuse[ray]'")
def test_ray_engine_writes_the_same_shards_and_resumes_a_local_run(tmp_path):
    corpus = bbc_paragraphs(tmp_path / "bbc.jsonl", 40)
    source, settings = Source(corpus, "text", "id"), Settings(max_length=64)
    run = dict(shard_size=100, progress=False, report=lambda s: None)
    embed_corpus(source, tmp_path / "local", settings, **run)
    local_ids, local = read_output(tmp_path / "local")
    out = tmp_path / "ray"
    embed_corpus(source, out, settings, **run)
    for k in (1, 2):  # Ray finishes what a local run left
        (out / shard_files.shard_name(k)).unlink()
    summary = embed_corpus(source, out, settings, engine="ray", **run)
    assert summary["resumed_from"] == len(list(out.glob("part-*"))) - 2
    ray_ids, vectors = read_output(out)
    assert ray_ids == local_ids
    np.testing.assert_allclose(vectors, local, atol=1e-6, rtol=0)
    # the packaged MiniLM ends in Normalize: on Ray too, unit vectors
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    # two actors of one thread each: the same sums as one thread locally (a thread count changes the
    # order of float additions: 1.1e-6 apart from the two-thread run above)
    embed_corpus(source, tmp_path / "one-thread", settings, threads=1, **run)
    embed_corpus(source, tmp_path / "ray-actors", settings, engine="ray", actors=2, threads=1, **run)
    one_ids, one_thread = read_output(tmp_path / "one-thread")
    ids, vectors = read_output(tmp_path / "ray-actors")
    assert ids == one_ids == local_ids
    np.testing.assert_allclose(vectors, one_thread, atol=1e-6, rtol=0)


def test_cli_embeds_a_csv_and_writes_its_summary(tmp_path, model_dir, capsys):
    path = write(tmp_path / "in.csv", rows(9))
    argv = [
        "embed",
        str(path),
        "-o",
        str(tmp_path / "out"),
        "--model",
        str(model_dir),
        "--id-field",
        "id",
        "--shard-size",
        "4",
        "--method",
        "full",
        "--json",
        str(tmp_path / "run.json"),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    assert "9 of 9 rows embedded into 3 shards" in capsys.readouterr().err
    summary = json.loads((tmp_path / "run.json").read_text())
    assert (summary["embedded"], summary["shards"], summary["skipped"]) == (9, 3, 0)
    ids, _ = read_output(tmp_path / "out")
    assert ids == [f"doc-{i}" for i in range(9)]
    assert cli.main(argv) == 0  # the same job again: every shard is there
    again = capsys.readouterr().err
    assert f"nothing left to embed: every shard in {tmp_path / 'out'} was already complete" in again
    assert "docs/s" not in again


def test_cli_counts_one_shard_as_one(tmp_path, model_dir, capsys):
    path = write(tmp_path / "in.jsonl", rows(1))
    argv = ["embed", str(path), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--no-progress"]
    assert cli.main(argv) == 0
    assert "1 of 1 row embedded into 1 shard in" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="pip install 'tokenfuse[ray]'")
def test_embed_bench_rows(capsys, tmp_path):
    assert (
        cli.main(
            [
                "bench",
                "--task",
                "embed",
                "--limit",
                "10",
                "--repeats",
                "1",
                "--max-length",
                "64",
                "--no-progress",
                "--json",
                str(tmp_path / "embed.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "embed.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["local", "ray"]
    assert rows[0]["throughput"] == 1.0 and rows[1]["docs_per_second"] > 0
    assert rows[1]["max_abs_diff"] <= 1e-6 and rows[0]["documents"] == rows[1]["documents"] > 10


def test_a_shard_killed_while_written_never_has_its_final_name(tmp_path):
    def half_then_killed(tmp: Path) -> None:
        tmp.write_bytes(b"PAR1 half")
        raise KeyboardInterrupt  # stands for the kill: nothing after this line runs

    with pytest.raises(KeyboardInterrupt):
        shard_files.write_atomic(tmp_path / shard_files.shard_name(0), half_then_killed)
    assert shard_files.done_shards(tmp_path) == set()
