"""Fetch, verify and read the study's inputs (anchors, v1 prompts, personas).

Every input is a row of ``data/inputs.csv`` (name, path in the authors'
repository, URL, SHA-256, format, role). ``fetch`` downloads a file with pooch
into ``cache_dir()/data/<path>`` and always checks its SHA-256; with
``$MOLOCH_DATA_MIRROR`` set, a local copy laid out like the URLs
(``<mirror>/batu-el/molochs-bargain/<commit>/<path>``) replaces the network.
The loaders turn the verified files into the typed records of ``anchors.py``.

    python -m moloch.data            # fetch and verify every input (= nox -s data)
    python -m moloch.data --list     # what the input list holds
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pooch
import requests

from .anchors import Anchor, Persona, make_anchor, make_persona
from .errors import FAILED, DataError, guarded
from .files import read_json, read_jsonl
from .paths import ENV_MIRROR, INPUTS_FILE, cache_dir
from .tasks import get_task

RAW_HOST = "https://raw.githubusercontent.com/"
INPUT_COLUMNS = ("name", "path", "url", "sha256", "format", "role")
FORMATS = ("json", "jsonl", "md")
SPLITS = ("train", "test")
SOURCES = ("v1", "raw")
FETCH_HINT = "run `nox -s data` (set MOLOCH_DATA_MIRROR to use a local copy)"


@dataclass(frozen=True)
class Entry:
    """One input file of the input list."""

    name: str
    path: str
    url: str
    sha256: str
    format: str
    role: str


@dataclass(frozen=True)
class Inputs:
    """Where inputs are listed, kept and copied from; tests pass their own."""

    inputs_file: Path
    cache: Path
    mirror: Path | None = None

    @classmethod
    def from_env(cls) -> Inputs:
        """The project's input list, the user cache and ``$MOLOCH_DATA_MIRROR``."""
        mirror = os.environ.get(ENV_MIRROR)
        # resolve() makes a relative mirror path relative to the current directory
        return cls(
            inputs_file=INPUTS_FILE,
            cache=cache_dir() / "data",
            mirror=Path(mirror).expanduser().resolve() if mirror else None,
        )

    def entries(self) -> dict[str, Entry]:
        return read_inputs(self.inputs_file)


# --- the input list -------------------------------------------------------------------------


def read_inputs(path: Path = INPUTS_FILE) -> dict[str, Entry]:
    """The input list's rows by name, checked for shape (columns, hashes, formats)."""
    return _read_inputs(Path(path), _mtime(path))


def _mtime(path: Path) -> float:
    try:
        return Path(path).stat().st_mtime
    except FileNotFoundError:
        raise DataError(f"input list {path} is missing: restore it from git") from None


@cache
def _read_inputs(path: Path, _mtime: float) -> dict[str, Entry]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != INPUT_COLUMNS:
            raise DataError(
                f"{path}: columns are {reader.fieldnames}, expected {list(INPUT_COLUMNS)}"
            )
        entries: dict[str, Entry] = {}
        for line, row in enumerate(reader, start=2):
            entry = Entry(**{k: (row[k] or "").strip() for k in INPUT_COLUMNS})
            where = f"{path} line {line} ({entry.name or 'no name'})"
            if not re.fullmatch(r"[0-9a-f]{64}", entry.sha256):
                raise DataError(f"{where}: sha256 {entry.sha256!r} is not 64 hex digits")
            if entry.format not in FORMATS:
                raise DataError(f"{where}: format {entry.format!r} is not one of {FORMATS}")
            if not entry.url.endswith("/" + entry.path):
                raise DataError(f"{where}: url does not end with the path {entry.path!r}")
            if entry.name in entries:
                raise DataError(f"{where}: name {entry.name!r} appears twice")
            entries[entry.name] = entry
    return entries


def find_entry(name_or_path: str, inputs: Inputs | None = None) -> Entry:
    """The input-list row with this name or path."""
    inputs = inputs or Inputs.from_env()
    entries = inputs.entries()
    if name_or_path in entries:
        return entries[name_or_path]
    for entry in entries.values():
        if entry.path == name_or_path:
            return entry
    raise DataError(
        f"no input named {name_or_path!r} in {inputs.inputs_file}; "
        f"known names: {', '.join(entries)}"
    )


# --- fetching -------------------------------------------------------------------------


@dataclass(frozen=True)
class MirrorDownloader:
    """A pooch downloader that copies a raw.githubusercontent.com file from a mirror."""

    mirror: Path

    def source(self, url: str) -> Path:
        if not url.startswith(RAW_HOST):
            raise DataError(f"{url}: only {RAW_HOST} addresses can come from a mirror")
        return self.mirror / url[len(RAW_HOST) :]

    def __call__(self, url: str, output_file, pooch_obj=None, check_only: bool = False):
        src = self.source(url)
        if check_only:
            return src.is_file()
        if not src.is_file():
            raise DataError(
                f"{src} is missing from the data mirror ({ENV_MIRROR}={self.mirror}); "
                f"it stands in for {url}: point {ENV_MIRROR} at a complete copy or unset it "
                f"to download"
            )
        # pooch hands a temporary file and checks its hash before moving it in place
        shutil.copyfile(src, output_file)
        return None


def fetch(name_or_path: str, inputs: Inputs | None = None) -> Path:
    """The verified local copy of one input, downloaded (or copied) when needed.

    A cached copy whose SHA-256 differs is fetched again; a download whose
    SHA-256 differs is discarded and raises ``DataError``.
    """
    inputs = inputs or Inputs.from_env()
    entry = find_entry(name_or_path, inputs)
    store = pooch.create(
        path=inputs.cache,
        base_url="",
        registry={entry.path: f"sha256:{entry.sha256}"},
        urls={entry.path: entry.url},
        retry_if_failed=0 if inputs.mirror else 2,
    )
    downloader = MirrorDownloader(inputs.mirror) if inputs.mirror else None
    source = str(downloader.source(entry.url)) if downloader else entry.url
    try:
        return Path(store.fetch(entry.path, downloader=downloader))
    except ValueError as err:  # pooch's hash check; its message carries the actual hash
        found = re.search(r"but got ([0-9a-f]+)", str(err))
        todo = (
            f"replace the mirror file with the authors' version (or unset {ENV_MIRROR})"
            if downloader
            else f"retry later, or set {ENV_MIRROR} to a verified local copy"
        )
        raise DataError(
            f"checksum mismatch for input {entry.name!r} ({entry.path}) from {source}: "
            f"expected sha256 {entry.sha256}, got {found.group(1) if found else 'another'}. "
            f"The copy was discarded: {todo}"
        ) from err
    except (OSError, requests.exceptions.RequestException) as err:
        raise DataError(
            f"could not fetch input {entry.name!r} from {source}: {err}. "
            f"Offline? set {ENV_MIRROR} to a local copy of the data"
        ) from err


def fetch_all(inputs: Inputs | None = None) -> dict[str, Path]:
    """Every input of the input list, by name."""
    inputs = inputs or Inputs.from_env()
    return {name: fetch(name, inputs) for name in inputs.entries()}


def verify_all(inputs: Inputs | None = None, out=None) -> list[str]:
    """Fetch and verify every input, one line each; returns the names that failed."""
    inputs = inputs or Inputs.from_env()
    out = out or sys.stdout
    entries = inputs.entries()
    failed = []
    for name, entry in entries.items():
        try:
            fetch(name, inputs)
        except DataError as err:
            failed.append(name)
            print(f"FAIL {name}: {err}", file=out)
        else:
            print(f"ok   {name:42s} {entry.sha256[:12]}  {entry.path}", file=out)
    source = f"mirror {inputs.mirror}" if inputs.mirror else "the network"
    print(
        f"{len(entries) - len(failed)} of {len(entries)} inputs verified "
        f"(sha256) in {inputs.cache}; missing or stale copies come from {source}",
        file=out,
    )
    return failed


# --- parsing --------------------------------------------------------------------------


@cache
def _records(path: Path, sha256: str, fmt: str) -> tuple[tuple[str, object], ...]:
    """(where, record) pairs of a verified JSON list or JSON-lines file."""
    if fmt == "json":
        data = read_json(path, "input", FETCH_HINT)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list, got {type(data).__name__}")
        return tuple((f"{path} record {i}", rec) for i, rec in enumerate(data))
    rows = read_jsonl(path, "input", FETCH_HINT)
    return tuple((f"{path} record {i}", rec) for i, rec in enumerate(rows))


def _read(entry: Entry, inputs: Inputs) -> tuple[tuple[str, object], ...]:
    path = fetch(entry.name, inputs)
    return _records(path, entry.sha256, entry.format)


# --- loaders --------------------------------------------------------------------------


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return split


def raw_entry(task: str, split: str, inputs: Inputs | None = None) -> Entry:
    """The input-list row of a task's raw split."""
    path = f"artsco/data/{get_task(task).key}/{_check_split(split)}.json"
    return find_entry(path, inputs)


def player_file_entry(task: str, split: str, model: str, inputs: Inputs | None = None) -> Entry:
    """The input-list row of the v1 per-model file (``model``: 'Qwen3-8B' or 'Qwen/Qwen3-8B')."""
    key, split = get_task(task).key, _check_split(split)
    inputs = inputs or Inputs.from_env()
    found = [
        e
        for e in inputs.entries().values()
        if e.path.startswith(f"artsco/data/{key}/")
        and e.path.endswith(f"/{model}/{split}.json")
        and e.path.count("/") == 5
    ]
    if len(found) != 1:
        models = sorted(
            {
                "/".join(e.path.split("/")[3:5])
                for e in inputs.entries().values()
                if e.path.startswith(f"artsco/data/{key}/") and e.path.count("/") == 5
            }
        )
        raise DataError(
            f"no v1 prompt file for task {task!r}, split {split!r}, model {model!r} in "
            f"{inputs.inputs_file}; models with one: {', '.join(models) or 'none'}"
        )
    return found[0]


def load_anchors(
    task: str,
    split: str,
    source: str = "v1",
    player_file_model: str = "Qwen3-8B",
    inputs: Inputs | None = None,
) -> list[Anchor]:
    """The anchors of one task and split, in file order.

    ``source="v1"`` reads the anchor fields of the per-model file v1 used (for
    sales these differ from the raw split, which was re-drawn later);
    ``source="raw"`` reads the raw split.
    """
    inputs = inputs or Inputs.from_env()
    if source == "v1":
        entry = player_file_entry(task, split, player_file_model, inputs)
    elif source == "raw":
        entry = raw_entry(task, split, inputs)
    else:
        raise DataError(f"unknown anchor source {source!r}: choose one of {', '.join(SOURCES)}")
    path = fetch(entry.name, inputs)
    return list(_anchors(get_task(task).name, path, entry.sha256, entry.format))


@cache
def _anchors(task: str, path: Path, sha256: str, fmt: str) -> tuple[Anchor, ...]:
    return tuple(make_anchor(task, rec, where) for where, rec in _records(path, sha256, fmt))


def load_v1_prompts(
    task: str, split: str, model: str = "Qwen3-8B", inputs: Inputs | None = None
) -> list[str]:
    """The full chat-templated prompts v1 sent (the ``prompt`` field), in file order."""
    inputs = inputs or Inputs.from_env()
    prompts = []
    for where, rec in _read(player_file_entry(task, split, model, inputs), inputs):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise DataError(f"{where}: missing string field 'prompt'; {FETCH_HINT}")
        prompts.append(rec["prompt"])
    return prompts


def load_personas(name: str = "persona_split1", inputs: Inputs | None = None) -> list[Persona]:
    """The audience: v1's 20 PRODIGY personas (``split1.json``) unless told otherwise."""
    inputs = inputs or Inputs.from_env()
    entry = find_entry(name, inputs)
    return list(_personas(fetch(entry.name, inputs), entry.sha256, entry.format))


@cache
def _personas(path: Path, sha256: str, fmt: str) -> tuple[Persona, ...]:
    return tuple(make_persona(rec, where) for where, rec in _records(path, sha256, fmt))


# --- command line ---------------------------------------------------------------------


def main(argv: list[str] | None = None, prog: str = "python -m moloch.data") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Fetch every input of data/inputs.csv into the cache and verify its SHA-256. "
            f"Set {ENV_MIRROR} to a local mirror folder to work offline; MOLOCH_CACHE "
            "moves the cache."
        ),
    )
    parser.add_argument("--list", action="store_true", help="print the input list and exit")
    args = parser.parse_args(argv)

    def work() -> int:
        inputs = Inputs.from_env()
        if args.list:
            for entry in inputs.entries().values():
                print(f"{entry.name:42s} {entry.format:5s} {entry.role}")
            return 0
        pooch.get_logger().setLevel("WARNING")  # one line per file is ours to print
        return FAILED if verify_all(inputs) else 0

    return guarded(work)


if __name__ == "__main__":
    sys.exit(main())
