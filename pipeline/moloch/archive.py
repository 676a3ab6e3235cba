"""A finished run as one file anyone can replay, and back.

    moloch archive --profile paper [--adapters] [--out FILE]    # FILE and FILE.sha256
    moloch fetch-run URL-or-FILE [--sha256 HEX] [--run-dir DIR]  # then replay it:
    MOLOCH_LLM_MODE=replay moloch run --run-dir DIR --force all-but-train

The archive (gzip tar) holds the run folder: its profile, every unit's outputs, manifest
and executed notebook, the claims and cells, and a snapshot of the call cache, with
``ARCHIVE.json`` listing each member's SHA-256. LoRA weights stay out unless
``--adapters``: each train unit then gets ``.not-archived.json`` naming the files left
out (with the hashes its manifest recorded) and the adapter's content hash, which is what
the call cache is keyed on, so a replay finds every answer without the weights (and a
live call that needs them stops with an error naming the missing folder).

``fetch-run`` downloads with pooch (a URL needs its ``--sha256``) or takes a local file
(its ``.sha256`` beside it), checks the file and then every member against ``ARCHIVE.json``
before the run folder appears; a mismatch is refused by name and nothing is left behind.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from .errors import MolochError
from .files import read_json
from .hashing import file_sha256
from .llm.adapters import NOT_ARCHIVED, NOT_WEIGHTS, adapter_sha256
from .manifests import MANIFEST, git_commit
from .paths import cache_dir, runs_dir
from .runs import JOBS_DIR, PROFILE_COPY, SHARDS_DIR, Run

INDEX = "ARCHIVE.json"
CACHE_NAME = "llm-cache.sqlite"  # Run.cache_path's name


class ArchiveError(MolochError):
    """An archive that cannot be made, found or trusted."""


def _skipped(rel: Path) -> bool:
    """What an archive never holds: hidden files (locks, kernelspecs, progress), temporary
    files, the live call-cache files (a snapshot goes in instead) and ``moloch submit``'s
    job pickles and logs (of one cluster, not of the run)."""
    return (
        any(part.startswith(".") for part in rel.parts)
        or rel.parts[0] == JOBS_DIR
        or rel.name.endswith(".tmp")
        or rel.name.startswith(CACHE_NAME)
    )


def _weights(run: Run) -> dict[Path, list[Path]]:
    """Each trained adapter folder of the run and its weight files (what --adapters adds)."""
    found = {}
    for folder in sorted((run.folder / "train").glob("*/*/*/adapter")):
        files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in NOT_WEIGHTS]
        if files:
            found[folder] = files
    return found


def pack(run: Run, out: Path | None = None, adapters: bool = False) -> Path:
    """Write the archive of ``run`` to ``out`` (default ``<run folder>.tar.gz``) and its
    SHA-256 to ``out.sha256``; returns ``out``."""
    if not (run.folder / PROFILE_COPY).is_file():
        raise ArchiveError(f"{run.folder} is not a run folder (no {PROFILE_COPY}): run it first")
    unmerged = sorted((run.folder / SHARDS_DIR).glob("*/*.sqlite"))
    if unmerged:
        raise ArchiveError(
            f"{run.folder} has shard call caches not merged into its own ({unmerged[0]}, ...): "
            f"wait for moloch submit's last job, or merge them: moloch cache merge "
            f"{run.folder / SHARDS_DIR}/*/llm-cache.sqlite --run-dir {run.folder}"
        )
    out = Path(out) if out else run.folder.with_name(run.folder.name + ".tar.gz")
    left_out = {} if adapters else _weights(run)
    skip = {p for files in left_out.values() for p in files}
    members: dict[str, Path] = {}  # name in the archive: the file it is made from
    for path in sorted(run.folder.rglob("*")):
        rel = path.relative_to(run.folder)
        if path.is_file() and not _skipped(rel) and path not in skip:
            members[rel.as_posix()] = path
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)  # what the archive holds that is not in the run folder as is

        def made(name: str, content: dict) -> None:
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).write_text(json.dumps(content, indent=1))
            members[name] = scratch / name

        for adapter, files in left_out.items():
            unit = adapter.parent
            recorded = read_json(unit / MANIFEST, "manifest").get("outputs", {})
            names = [f.relative_to(unit).as_posix() for f in files]
            made((unit / NOT_ARCHIVED).relative_to(run.folder).as_posix(), {
                "files": {n: (recorded.get(n) or {}).get("sha256") for n in names},
                "adapters": {adapter.name: adapter_sha256(adapter)},
            })  # fmt: skip
        if run.cache_path.is_file():  # a consistent copy, WAL included
            snapshot = scratch / CACHE_NAME
            with sqlite3.connect(run.cache_path) as src, sqlite3.connect(snapshot) as dst:
                src.backup(dst)
            members[CACHE_NAME] = snapshot
        made(INDEX, {
            "format": 1,
            "profile": run.name,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "code": git_commit(),
            "adapters": adapters,
            "files": {name: file_sha256(path) for name, path in sorted(members.items())},
        })  # fmt: skip
        partial = out.with_name(out.name + ".tmp")
        with tarfile.open(partial, "w:gz") as tar:
            for name, path in members.items():
                tar.add(path, arcname=name, recursive=False)
        partial.replace(out)
    digest = file_sha256(out)
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n")
    return out


def fetch(source: str, sha256: str | None = None) -> Path:
    """The archive file of ``source`` (a URL, downloaded with pooch into the cache, or a
    path), after checking its SHA-256 (``sha256``, else a local file's ``.sha256``)."""
    if "://" in source:
        if not sha256:
            raise ArchiveError(f"{source}: give its --sha256 (from the .sha256 file beside it)")
        import pooch

        try:
            got = pooch.retrieve(source, known_hash=f"sha256:{sha256}",
                                 path=cache_dir() / "archives", progressbar=False)  # fmt: skip
        except ValueError as err:  # pooch's hash mismatch
            raise ArchiveError(f"{source}: {err}") from None
        return Path(got)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ArchiveError(f"archive {path} does not exist: give a URL or a file")
    sidecar = path.with_name(path.name + ".sha256")
    if not sha256 and sidecar.is_file():
        sha256 = sidecar.read_text().split()[0]
    if not sha256:
        raise ArchiveError(f"{path}: no {sidecar.name} beside it; give its --sha256")
    actual = file_sha256(path)
    if actual != sha256.lower():
        raise ArchiveError(
            f"archive {path} has SHA-256 {actual[:12]}, not {sha256[:12]}: it is corrupt or not "
            f"the one published; download it again"
        )
    return path


def _checked_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """The archive's members, each a plain file or folder with a relative name inside the
    folder it unpacks into; anything else (a link, a device, an absolute name, a '..') is
    refused. tarfile's 'data' filter checks the same, but Python before 3.11.4 has none."""
    members = tar.getmembers()
    for member in members:
        name = PurePosixPath(member.name)
        if not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts:
            raise ArchiveError(
                f"{archive}: member {member.name!r} is not a file or folder inside the run "
                f"folder: not a run archive (nothing was unpacked)"
            )
    return members


def unpack(archive: Path, target: Path | None = None) -> Path:
    """Unpack a checked archive into ``target`` (default ``data/runs/<its profile>``), which
    must not exist; every member's kind and name are checked before anything is unpacked,
    its contents against the archive's index before the run is moved into place."""
    with tarfile.open(archive, "r:gz") as tar:
        try:
            index = json.loads(tar.extractfile(INDEX).read())
        except (KeyError, AttributeError, ValueError):
            raise ArchiveError(f"{archive} has no readable {INDEX}: not a run archive") from None
        target = Path(target) if target else runs_dir() / index["profile"]
        if target.exists() and any(target.iterdir()):
            raise ArchiveError(
                f"{target} already holds files: unpack the archive elsewhere (--run-dir)"
            )
        scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent if
                                        target.parent.exists() else None))  # fmt: skip
        try:
            members = _checked_members(tar, archive)
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4 on: the same checks again
                tar.extractall(scratch, members, filter="data")
            else:
                tar.extractall(scratch, members)
            names = {m.name for m in members if m.isfile()} - {INDEX}
            if names != set(index["files"]):
                raise ArchiveError(f"{archive}: its members are not those its {INDEX} lists")
            for name, digest in index["files"].items():
                if file_sha256(scratch / name) != digest:
                    raise ArchiveError(f"{archive}: member {name} does not match its {INDEX}")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.rmdir()
            shutil.move(str(scratch), target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target
