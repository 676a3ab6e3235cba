"""Persistent cache of model calls, one SQLite file shared by every stage and process.

The key of a call is a hash of everything that decides its answer: the
backend and the exact weights it serves (``identity()``), the content of the
LoRA adapter (not its path), the messages and every sampling setting. A run
that is interrupted and started again therefore pays only for the calls it
had not finished, and a report can be rebuilt offline from the cache alone
(``MOLOCH_LLM_MODE=replay``).

Writes are committed batch by batch in WAL mode with a busy timeout, so
several processes can fill the same file at once and a crash loses at most
the calls that were in flight; a cache another writer holds for longer is
retried a few times (the batch waits in memory) before a clear error.

Every answer is stored with a checksum over its key and content, checked on
every read: a row changed on disk (a flipped byte passes SQLite's own checks)
is never served; it is dropped with a warning and its call is made again.

A cache can have a ``lower`` file it reads but never writes (one shard job of
``moloch submit`` writes its own file and reads the run's, which no job writes
while the shards run); answers found there are hits like any other.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ModelError
from ..hashing import object_sha256, text_sha256
from ..paths import cache_dir
from .adapters import verified_sha256
from .base import Backend, ChatRequest, Completion

CACHE_FILE_NAME = "calls.sqlite"
BUSY_TIMEOUT_MS = 60_000  # writers wait this long for the lock before failing

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    meta TEXT NOT NULL,
    created REAL NOT NULL,
    checksum TEXT
)
"""
BUSY_RETRIES = 3  # after the busy timeout: attempts before a clear error (batch kept meanwhile)
log = logging.getLogger(__name__)


def answer_checksum(key: str, text: str, prompt_tokens, completion_tokens, finish, meta) -> str:
    """What a stored answer's checksum covers: its key and everything served from the row."""
    return text_sha256(
        json.dumps([key, text, int(prompt_tokens), int(completion_tokens), finish, meta])
    )


def _busy(err: sqlite3.OperationalError) -> bool:
    """Whether SQLite failed because another connection holds the file (worth waiting)."""
    return "locked" in str(err) or "busy" in str(err)


def _answer_rows(conn: sqlite3.Connection, keys: list[str]) -> list[tuple]:
    """The (key, answer fields, checksum) rows of ``keys`` (at most 500: SQLite's limit)."""
    marks = ",".join("?" * len(keys))
    return conn.execute(
        "SELECT key, text, prompt_tokens, completion_tokens, finish_reason, meta, checksum "
        f"FROM calls WHERE key IN ({marks})",
        keys,
    ).fetchall()


def default_cache_path() -> Path:
    return cache_dir() / CACHE_FILE_NAME


def key_fields(identity: dict, backend_name: str, request: ChatRequest) -> dict:
    """The fields that decide an answer, as the plain dict that is hashed."""
    return {
        "backend": backend_name,
        "identity": identity,
        "adapter": verified_sha256(request.adapter) if request.adapter else None,
        "messages": [list(m) for m in request.messages],
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "max_tokens": request.max_tokens,
        "seed": request.seed,
        "sample_index": request.sample_index,
        "enable_thinking": request.enable_thinking,
        "add_special_tokens": request.add_special_tokens,
        "answer_format": asdict(request.answer_format) if request.answer_format else None,
    }


def call_key(backend: Backend, request: ChatRequest, identity: dict | None = None) -> str:
    """Cache key of one request to one backend (``identity``: its identity(), if known)."""
    identity = backend.identity() if identity is None else identity
    return object_sha256(key_fields(identity, backend.name, request))


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0  # rows whose checksum did not match: dropped, recomputed


class CallCache:
    """Completions by call key, in one SQLite file.

    One connection per process (and thread): a connection opened before a
    fork is never reused by the child. ``lower``: a cache file read for the
    keys this one lacks, never written (absent: none).
    """

    def __init__(self, path: str | Path | None = None, lower: str | Path | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self.lower = Path(lower) if lower is not None else None
        self.stats = CacheStats()
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"CallCache({str(self.path)!r})"

    def _lower_rows(self, keys: list[str]) -> list[tuple]:
        """Rows of ``keys`` in the lower file, read-only: ``immutable`` takes no lock and
        needs no shared memory, so it reads a file on a network filesystem (its writer
        checkpoints it before the readers start: ``moloch.submit``)."""
        if self.lower is None or not keys or not self.lower.is_file():
            return []
        try:
            conn = sqlite3.connect(f"file:{self.lower}?mode=ro&immutable=1", uri=True)
        except sqlite3.DatabaseError as err:
            raise ModelError(
                f"call cache {self.lower} (read-only) cannot be opened ({err})"
            ) from err
        try:
            rows = []
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                rows += _answer_rows(conn, chunk)
            return rows
        except sqlite3.DatabaseError as err:
            raise ModelError(
                f"call cache {self.lower} (read-only) cannot be read ({err}); if it is "
                f"corrupt, move it away (its calls are made again)"
            ) from err
        finally:
            conn.close()

    # --- connection -------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Two connections setting up one new file at once: switching it to WAL takes a lock
        # SQLite does not wait for (measured: "database is locked" at once), so wait here.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                conn = self._open()
                break
            except sqlite3.OperationalError as err:
                if not _busy(err):
                    raise self._unreadable(err) from err
                if time.monotonic() > deadline:
                    raise ModelError(
                        f"call cache {self.path} stayed locked by another process for "
                        f"{BUSY_TIMEOUT_MS // 1000} s while opening it: stop the other run and "
                        f"run again"
                    ) from err
                time.sleep(0.05)
            except sqlite3.DatabaseError as err:
                raise self._unreadable(err) from err
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
            if "checksum" not in columns:  # a cache made before checksums: add the column
                conn.execute("ALTER TABLE calls ADD COLUMN checksum TEXT")
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def _unreadable(self, err: Exception) -> ModelError:
        return ModelError(
            f"call cache {self.path} cannot be opened ({err}); if it is corrupt, move it "
            f"away and rerun (calls not in it are recomputed), or set MOLOCH_CACHE"
        )

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    # --- reads and writes --------------------------------------------------------

    def _retrying(self, what: str, work):
        """``work()``, retried when another writer holds the file past the busy timeout."""
        for attempt in range(BUSY_RETRIES):
            try:
                return work()
            except sqlite3.OperationalError as err:
                if not _busy(err):
                    raise ModelError(f"call cache {self.path}: {what} failed ({err})") from err
                log.warning("call cache %s busy (%s); retry %d", self.path, what, attempt + 1)
        raise ModelError(
            f"call cache {self.path} stayed locked by another process for "
            f"{BUSY_RETRIES} x {BUSY_TIMEOUT_MS // 1000} s ({what}); stop the other run and run "
            f"again: every answer written before is kept"
        )

    @staticmethod
    def _completion(row: tuple) -> Completion | None:
        """A (key, text, tokens, finish, meta, checksum) row as served; None if its checksum
        does not hold (rows of a cache made before checksums have none)."""
        key, text, p_tok, c_tok, finish, meta, checksum = row
        if checksum is not None and checksum != answer_checksum(
            key, text, p_tok, c_tok, finish, meta
        ):
            return None
        return Completion(text=text, prompt_tokens=p_tok, completion_tokens=c_tok,
                          finish_reason=finish, cached=True, meta=json.loads(meta))  # fmt: skip

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        """The cached completions among ``keys`` (counted as hits and misses), from this
        file, then from the lower one for the keys this one lacks.

        A row whose checksum does not match is not served: it is deleted (so the call
        is made again and stored afresh; in the lower file it is left) and counted in
        ``stats.corrupt``.
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Completion] = {}
        bad: list[str] = []
        conn = self._connection()
        for start in range(0, len(wanted), 500):  # stay under SQLite's variable limit
            chunk = wanted[start : start + 500]
            rows = self._retrying("read", lambda chunk=chunk: _answer_rows(conn, chunk))
            for row in rows:
                served = self._completion(row)
                if served is None:
                    bad.append(row[0])
                else:
                    found[row[0]] = served
        lower_bad = 0
        for row in self._lower_rows([k for k in wanted if k not in found]):
            served = self._completion(row)
            if served is None:
                lower_bad += 1
            else:
                found[row[0]] = served
        if lower_bad:
            log.warning("call cache %s: %d answer(s) did not match their checksum; made again",
                        self.lower, lower_bad)  # fmt: skip
            self.stats.corrupt += lower_bad
        if bad:
            log.warning(
                "call cache %s: %d answer(s) did not match their checksum; they are "
                "dropped and will be recomputed", self.path, len(bad),
            )  # fmt: skip
            self._retrying("drop", lambda: self._delete(conn, bad))
            self.stats.corrupt += len(bad)
        self.stats.hits += len(found)
        self.stats.misses += len(wanted) - len(found)
        return found

    @staticmethod
    def _delete(conn: sqlite3.Connection, keys: list[str]) -> None:
        with conn:
            conn.executemany("DELETE FROM calls WHERE key = ?", [(k,) for k in keys])

    def get(self, key: str) -> Completion | None:
        return self.get_many([key]).get(key)

    def put_many(
        self,
        backend: Backend,
        entries: Sequence[tuple[str, ChatRequest, Completion]],
    ) -> None:
        """Store (key, request, completion) triples in one committed transaction.

        The first answer stored under a key wins: a cached answer never changes
        once a stage may have used it.
        """
        if not entries:
            return
        identity = backend.identity()
        model = str(identity.get("model", ""))
        now = time.time()
        rows = []
        for key, request, completion in entries:
            meta = json.dumps(completion.meta, ensure_ascii=False, default=str)
            fields = (
                completion.text,
                int(completion.prompt_tokens),
                int(completion.completion_tokens),
                completion.finish_reason,
                meta,
            )
            rows.append(
                (key, backend.name, model, json.dumps(request.to_json(), ensure_ascii=False),
                 *fields, now, answer_checksum(key, *fields))
            )  # fmt: skip
        conn = self._connection()

        def commit() -> None:
            with conn:  # one transaction, committed on exit
                conn.executemany(
                    "INSERT OR IGNORE INTO calls (key, backend, model, request, text, "
                    "prompt_tokens, completion_tokens, finish_reason, meta, created, checksum) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )

        self._retrying("write", commit)
        self.stats.writes += len(rows)

    def request_json(self, key: str) -> dict | None:
        """The request stored with a key (for audits and error messages)."""
        row = self._connection().execute("SELECT request FROM calls WHERE key = ?", (key,))
        found = row.fetchone()
        return json.loads(found[0]) if found else None

    def __len__(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    # --- whole-file operations (moloch cache ...) ------------------------------------

    _COLUMNS = ("key, backend, model, request, text, prompt_tokens, completion_tokens, "
                "finish_reason, meta, created, checksum")  # fmt: skip

    def _verified_rows(self):
        """Every row whose checksum holds (rows of a cache made before checksums pass)."""
        for row in self._connection().execute(f"SELECT {self._COLUMNS} FROM calls ORDER BY key"):
            key, _, _, _, text, p_tok, c_tok, finish, meta, _, checksum = row
            good = checksum is None or checksum == answer_checksum(
                key, text, p_tok, c_tok, finish, meta
            )
            yield row, good

    def summary(self) -> dict:
        """Answers by backend and model, tokens, and rows that fail their checksum."""
        by_model: dict[str, int] = {}
        tokens = corrupt = 0
        for row, good in self._verified_rows():
            if not good:
                corrupt += 1
                continue
            name = f"{row[1]}:{row[2]}"
            by_model[name] = by_model.get(name, 0) + 1
            tokens += int(row[5]) + int(row[6])
        return {"path": str(self.path), "answers": sum(by_model.values()), "tokens": tokens,
                "corrupt": corrupt, "by_model": dict(sorted(by_model.items()))}  # fmt: skip

    def checkpoint(self) -> None:
        """Move every committed answer from the write-ahead log into the file itself, so
        that a read-only ``lower`` reader (which ignores the log) sees them all."""
        self._retrying("checkpoint", lambda: self._connection().execute(
            "PRAGMA wal_checkpoint(TRUNCATE)").fetchall())  # fmt: skip

    def merge_from(self, other: str | Path) -> dict:
        """Copy into this cache every verified answer of ``other`` it lacks (the first answer
        stored under a key wins, as always); rows failing their checksum are left out."""
        source = CallCache(other)
        if not source.path.is_file():
            raise ModelError(f"call cache {source.path} does not exist: give an existing file")
        rows, corrupt = [], 0
        for row, good in source._verified_rows():
            if good:
                rows.append(row)
            else:
                corrupt += 1
        conn = self._connection()
        before = len(self)

        def commit() -> None:
            with conn:
                conn.executemany(
                    f"INSERT OR IGNORE INTO calls ({self._COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )

        self._retrying("merge", commit)
        source.close()
        added = len(self) - before
        return {"read": len(rows), "added": added, "already_here": len(rows) - added,
                "corrupt_left_out": corrupt}  # fmt: skip

    def export(self, out: str | Path) -> int:
        """Every verified answer as JSON lines (key, backend, model, request, answer, tokens)
        into ``out``; returns how many."""
        from ..files import write_jsonl

        records = []
        for row, good in self._verified_rows():
            if good:
                key, backend, model, request, text, p_tok, c_tok, finish, meta, created, _ = row
                records.append({
                    "key": key, "backend": backend, "model": model, "request": json.loads(request),
                    "text": text, "prompt_tokens": p_tok, "completion_tokens": c_tok,
                    "finish_reason": finish, "meta": json.loads(meta), "created": created,
                })  # fmt: skip
        write_jsonl(Path(out), records)
        return len(records)
