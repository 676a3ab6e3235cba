"""Reading and writing the package's files: atomic writes, JSON, and JSON lines.

Every stage output, manifest and table goes through here, so there is one
writer and one reader of each format. Writes are atomic: a reader, or a run
killed mid-write, sees the old file or the new one, never half of it.

JSON lines are split on ``\\n`` alone. ``str.splitlines`` would also break a
line at U+2028, U+2029 or ``\\x85``, which ``json.dumps(..., ensure_ascii=False)``
writes raw inside strings, so one model reply holding such a character would
corrupt every reader that used it.

    >>> write_jsonl(path, [{"text": "a\\u2028b"}])
    >>> read_jsonl(path)
    [{'text': 'a\\u2028b'}]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import DataError


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to a hidden temporary beside ``path``, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj) -> Path:
    """``obj`` as indented JSON with sorted keys, written atomically."""
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


REWRITE = "delete it and rerun the step that writes it"  # what to do with a bad output


def read_text(path: Path, what: str = "file", fix: str = REWRITE) -> str:
    """The UTF-8 text of ``path``; a missing or undecodable file is a DataError naming it."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} {path} is missing: run the step that writes it first") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {err.start}): {fix}") from None


def read_json(path: Path, what: str = "JSON file", fix: str = REWRITE) -> object:
    """The parsed content of a JSON file, or a DataError naming the file."""
    text = read_text(path, what, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{what} {path}: not valid JSON at line {err.lineno} column {err.colno} "
            f"({err.msg}): {fix}"
        ) from None


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """One JSON object per line (keys sorted, text as is), written atomically; the row count."""
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows]
    write_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path, what: str = "table", fix: str = REWRITE) -> list[dict]:
    """The rows of a JSON-lines file: each line one JSON object; blank lines are skipped."""
    rows = []
    for number, line in enumerate(read_text(path, what, fix).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {number}: not valid JSON at column {err.colno} ({err.msg}): {fix}"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, line {number}: expected a JSON object, found {type(row).__name__}: {fix}"
            )
        rows.append(row)
    return rows
