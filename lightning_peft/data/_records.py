"""Reading the user's own files: text checked to be text, rows of CSV / TSV / JSONL / JSON, class-per-folder trees.

Every error names the file, the row (line) and what was expected, so a bad file is fixed without reading code.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Record", "class_folders", "read_records", "read_text", "require_column", "scan_class_folders"]

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


@dataclass(frozen=True)
class Record:
    """One row of a table file: its values and where it came from (``line`` is 1-based, the header is line 1).

    Example::

        >>> from lightning_peft.data._records import Record
        >>> Record({"text": "hi"}, "rows.csv", 2).where
        "'rows.csv', line 2"
    """

    values: dict[str, Any]
    path: str
    line: int

    @property
    def where(self) -> str:
        """``'file.csv', line 7`` for error messages."""
        return f"{self.path!r}, line {self.line}"


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """Return the content of a text file (UTF-8 unless ``encoding`` says otherwise), refusing binary files.

    Raises:
        ValueError: If the file holds NUL bytes (a binary file: image, archive, model weights) or cannot be
            decoded with ``encoding``; the message names the file, the line and the byte offset.

    Example::

        >>> import tempfile, os
        >>> from lightning_peft.data._records import read_text
        >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> _ = open(path, "w", encoding="utf-8").write("héllo")
        >>> read_text(path)
        'héllo'
    """
    data = Path(path).read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ValueError(
            f"{os.fspath(path)!r} is a binary file, not text (a NUL byte at offset {nul}, line {line})."
            " HINT: give text files only (.txt, .md, .csv, .jsonl, ...); select"
            " them with a glob pattern such as 'corpus/**/*.txt'."
        )
    try:
        return data.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{os.fspath(path)!r} is not {encoding} text: byte {data[err.start : err.start + 1]!r}"
            f" at offset {err.start}"
            f" (line {line}) cannot be decoded. HINT: re-save the file as UTF-8"
            " (e.g. `iconv -f latin1 -t utf-8`), or set `encoding` to the file's encoding (e.g. 'latin-1')."
        ) from err


def _table_rows(path: str, text: str) -> list[Record]:
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        rows = []
        try:
            for row in reader:
                if None in row:
                    raise ValueError(
                        f"{path!r}, line {reader.line_num} has {len(reader.fieldnames) + len(row[None])} fields, the"
                        f" header {len(reader.fieldnames)} ({reader.fieldnames}). HINT: quote fields that contain the"
                        ' delimiter ("a, b"), or fix the row.'
                    )
                rows.append(Record({k: v for k, v in row.items()}, path, reader.line_num))
        except csv.Error as err:
            raise ValueError(
                f"{path!r}, line {reader.line_num} is not valid CSV: {err}. HINT: fix the quoting."
            ) from err
        if not reader.fieldnames:
            raise ValueError(f"{path!r} is empty: a CSV file starts with a header row. HINT: e.g. 'text,label'.")
        return rows
    if suffix == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path!r}, line {err.lineno}, column {err.colno} is not valid JSON: {err.msg}."
                " HINT: a .json file holds one list of objects; use .jsonl for one object per line."
            ) from err
        if not isinstance(content, list):
            raise ValueError(
                f"{path!r} must hold a list of objects, got a JSON {type(content).__name__}."
                ' HINT: e.g. [{"text": "...", "label": "..."}].'
            )
        lines = [(item, 1) for item in content]
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((json.loads(line), number))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path!r}, line {number} is not valid JSON: {err.msg} (column {err.colno})."
                    " HINT: a .jsonl file holds one JSON object per line."
                ) from err
    records = []
    for item, number in lines:
        if not isinstance(item, dict):
            raise ValueError(
                f"{path!r}, line {number} must be a JSON object, got {type(item).__name__} {str(item)[:60]!r}."
                ' HINT: e.g. {"text": "...", "label": "..."}.'
            )
        records.append(Record(item, path, number))
    return records


def read_records(path: str | os.PathLike, encoding: str = "utf-8") -> list[Record]:
    r"""Return the rows of a ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` file (text checked as by :func:`read_text`).

    Raises:
        ValueError: If the suffix is none of those, the file is binary or not UTF-8, or a row cannot be parsed
            (the message names the file and the line).

    Example::

        >>> import tempfile, os
        >>> from lightning_peft.data._records import read_records
        >>> path = os.path.join(tempfile.mkdtemp(), "rows.jsonl")
        >>> _ = open(path, "w").write('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
        >>> [(r.values["label"], r.line) for r in read_records(path)]
        [('pos', 1), ('neg', 2)]
    """
    path = os.fspath(path)
    if Path(path).suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(
            f"{path!r} must be a table file with one of the suffixes {TABLE_SUFFIXES}, got {Path(path).suffix!r}."
            " HINT: save the data as CSV (a header row, then one example per row) or JSONL (one object per line)."
        )
    return _table_rows(path, read_text(path, encoding))


def require_column(records: Sequence[Record], column: str, option: str) -> None:
    """Check that every record has a non-empty ``column``.

    Args:
        records: Rows from :func:`read_records`.
        column: The column (CSV) or key (JSON) that must be present.
        option: The argument that names the column, for the hint (e.g. ``"text_column"``).

    Raises:
        ValueError: Naming the file, the first row without the column, the columns it has, and ``option``.
    """
    for record in records:
        value = record.values.get(column)
        if column not in record.values:
            raise ValueError(
                f"{record.where} has no column `{option}`={column!r}; its columns are {sorted(record.values)}."
                f" HINT: set `{option}` to one of them, e.g. --data.init_args.{option}={next(iter(record.values), '')}."
            )
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(
                f"{record.where} has an empty `{option}`={column!r} value. HINT: fill it in or remove the row."
            )


def class_folders(root: str | os.PathLike) -> list[str]:
    """Return the class names of a class-per-folder tree: its sub-folders, sorted (hidden ones skipped).

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
        ValueError: If it has fewer than two sub-folders.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{os.fspath(root)!r} is not a folder. HINT: give a folder with one sub-folder per class, e.g."
            " data/train/cat/*.jpg and data/train/dog/*.jpg."
        )
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise ValueError(
            f"{os.fspath(root)!r} must hold one sub-folder per class (at least 2), got {names}."
            " HINT: put each class's files in a folder named after the class."
        )
    return names


def scan_class_folders(
    root: str | os.PathLike, classes: Sequence[str], suffixes: Sequence[str], kind: str
) -> list[tuple[str, int]]:
    """Return ``(file, class index)`` for every file with one of ``suffixes`` under ``root/<class>/`` (recursive).

    Raises:
        FileNotFoundError: If a class folder is missing under ``root`` (e.g. the validation folder lacks a class).
        ValueError: If a class folder has no file of the accepted kinds.
    """
    root = Path(root).expanduser()
    samples = []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{os.fspath(root)!r} has no folder for the class {name!r} (its classes are"
                f" {sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else 'none: no folder'})."
                " HINT: the training and validation folders must hold the same class folders."
            )
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise ValueError(
                f"{os.fspath(folder)!r} holds no {kind} file (accepted suffixes: {tuple(suffixes)})."
                f" HINT: put the {kind} files of class {name!r} there, or remove the folder."
            )
        samples += [(os.fspath(p), index) for p in files]
    return samples
