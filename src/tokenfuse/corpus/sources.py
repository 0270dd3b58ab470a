"""Corpus inputs read as rows (id, text), streamed: JSON Lines, CSV, Parquet, a folder of text files.

A source is scanned once before any embedding: every row is validated (a bad row is reported with
its id, never embedded), ids are checked unique, and the position where each shard starts is
recorded (a byte offset in a JSON Lines or CSV file, a row number in a Parquet file or a folder), so
that a shard is read alone, by any process, without reading what comes before it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Format = Literal["jsonl", "csv", "parquet", "folder"]
SUFFIXES: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Row:
    """One input row: its id, its text, and why it cannot be embedded ("" if it can); `field`: the
    field at fault ("id" or "text"), "" when the row itself is broken or fine."""

    id: Any
    text: str
    problem: str = ""
    field: str = ""


@dataclass(frozen=True)
class Scan:
    """What a full pass over a source found: how many rows, where each shard starts, the bad rows."""

    rows: int
    starts: list[int]
    bad: list[Row]


@dataclass(frozen=True)
class Source:
    """An input: a file or folder, and the fields holding each row's text and id. id_field None: the
    row number (a folder: the file's path inside it)."""

    path: Path
    text_field: str = "text"
    id_field: str | None = None

    @property
    def format(self) -> Format:
        return format_of(self.path)

    def check(self) -> None:
        """Fail now on what would fail every row: a missing input, an unknown format, a field that
        is not there."""
        fmt = self.format
        if fmt == "csv":
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            self._check_fields(header, "CSV header")
        elif fmt == "parquet":
            import pyarrow as pa

            schema = _parquet(self.path).schema_arrow
            self._check_fields(schema.names, "Parquet columns")
            kind = schema.field(self.text_field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise ValueError(
                    f"{self.path}: column {self.text_field!r} holds {kind}, not text; choose the text "
                    "column with --text-field"
                )
        elif fmt == "folder" and self.id_field is not None:
            raise ValueError("--id-field is for tables; a folder's ids are its files' paths")

    def _check_fields(self, names: list[str], where: str) -> None:
        for field, option in ((self.text_field, "--text-field"), (self.id_field, "--id-field")):
            if field is not None and field not in names:
                raise ValueError(
                    f"{self.path}: no {field!r} in its {where} ({', '.join(map(str, names)) or 'none'}); "
                    f"choose one with {option}"
                )

    def fingerprint(self) -> str:
        """Size and modification time of the input (of every file, for a folder): a resumed job
        checks that its input did not change under it."""
        digest = hashlib.sha1()
        for f in _files(self.path) if self.path.is_dir() else [self.path]:
            st = f.stat()
            digest.update(
                f"{f.relative_to(self.path) if self.path.is_dir() else ''}:{st.st_size}:"
                f"{st.st_mtime_ns}\n".encode()
            )
        return digest.hexdigest()

    def scan(self, shard_size: int) -> Scan:
        """Read every row once: validate it, check ids are unique, note where each shard starts."""
        starts, bad, seen, n = [], [], set(), 0
        for position, row in self._rows(0):
            if n % shard_size == 0:
                starts.append(position)
            if row.problem:
                bad.append(row)
            key = (type(row.id).__name__, row.id)
            if key in seen:
                raise ValueError(f"{self.path}: id {row.id!r} occurs more than once; ids must be unique")
            seen.add(key)
            n += 1
        if n == 0:
            raise ValueError(f"{self.path} holds no rows")
        if len(bad) == n and self.format == "jsonl":  # a field no row has: a wrong name, not bad rows
            field = "id" if all(r.field == "id" for r in bad) else "text"
            name, what = (self.id_field, "an id") if field == "id" else (self.text_field, "a text")
            raise ValueError(
                f"{self.path}: no row has {what} in field {name!r} ({bad[0].problem}); choose the field "
                f"with --{field}-field"
            )
        return Scan(rows=n, starts=starts, bad=bad)

    def read(self, start: int, first_row: int, count: int) -> list[Row]:
        """`count` rows from the shard that starts at position `start` (from `scan`), whose first row
        is row number `first_row`."""
        rows = []
        for _, row in self._rows(start, first_row):
            if len(rows) == count:
                break
            rows.append(row)
        return rows

    def _rows(self, start: int, first_row: int = 0) -> Iterator[tuple[int, Row]]:
        """(position, row) from position `start` on."""
        return {"jsonl": self._jsonl, "csv": self._csv, "parquet": self._parquet, "folder": self._folder}[
            self.format
        ](start, first_row)

    def _jsonl(self, start: int, number: int) -> Iterator[tuple[int, Row]]:
        with open(self.path, "rb") as f:
            f.seek(start)
            position = start
            for line in f:
                here, position = position, position + len(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield (
                        here,
                        Row(number, "", f"line is not valid JSON ({e.msg if hasattr(e, 'msg') else e})"),
                    )
                else:
                    yield (
                        here,
                        self._row(record, number)
                        if isinstance(record, dict)
                        else Row(number, "", "line is not a JSON object"),
                    )
                number += 1

    def _csv(self, start: int, number: int) -> Iterator[tuple[int, Row]]:
        with open(self.path, "rb") as f:
            header = next(csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline="")))
        with open(self.path, "rb") as f:
            f.seek(start)
            offset = [start]

            def lines() -> Iterator[str]:  # the reader pulls whole lines: the offset is exact between records
                for line in f:
                    offset[0] += len(line)
                    yield line.decode("utf-8")

            reader = csv.reader(lines())
            if start == 0:
                next(reader)  # the header
            position = offset[0]
            for values in reader:
                here, position = position, offset[0]
                if values:
                    yield here, self._row(dict(zip(header, values, strict=False)), number)
                    number += 1

    def _parquet(self, start: int, number: int) -> Iterator[tuple[int, Row]]:
        columns = [self.text_field] + ([self.id_field] if self.id_field else [])
        file, row = _parquet(self.path), 0
        for group in range(file.num_row_groups):
            size = file.metadata.row_group(group).num_rows
            if row + size <= start:
                row += size
                continue
            table = file.read_row_group(group, columns=columns).slice(max(0, start - row))
            row = max(row, start)
            for record in table.to_pylist():
                yield row, self._row(record, number)
                row, number = row + 1, number + 1

    def _folder(self, start: int, number: int) -> Iterator[tuple[int, Row]]:
        for i, f in enumerate(_files(self.path)[start:], start):
            name = f.relative_to(self.path).as_posix()
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                yield i, Row(name, "", "not UTF-8 text")
                continue
            yield i, Row(name, text, "" if text.strip() else "empty text")

    def _row(self, record: dict, number: int) -> Row:
        if self.id_field is None:
            ident = number
        elif record.get(self.id_field) is None:
            return Row(f"row {number}", "", f"no id in field {self.id_field!r}", "id")
        else:
            ident = record[self.id_field]
            if not isinstance(ident, str | int):
                problem = f"id field {self.id_field!r} holds a {type(ident).__name__}"
                return Row(f"row {number}", "", problem, "id")
        text = record.get(self.text_field)
        if text is None:
            return Row(ident, "", f"no text in field {self.text_field!r}", "text")
        if not isinstance(text, str):
            problem = f"field {self.text_field!r} holds a {type(text).__name__}, not text"
            return Row(ident, "", problem, "text")
        return Row(ident, text, "" if text.strip() else "empty text")


def format_of(path: Path) -> Format:
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise ValueError(f"input {path} does not exist")
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"input {path}: unknown format {path.suffix or '(no suffix)'}; give a "
            f"{', '.join(SUFFIXES)} file or a folder of text files"
        )
    return fmt


def _files(folder: Path) -> list[Path]:
    """Every non-hidden file under the folder, in a fixed order."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root, n) for n in sorted(names) if not n.startswith(".")]
    return sorted(found, key=lambda f: f.relative_to(folder).as_posix())


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading Parquet needs pyarrow: pip install 'tokenfuse[corpus]'") from None
    return pq.ParquetFile(path)
