"""The client every stage calls: cache first, then the backend, in batches.

``LLM.complete(requests)`` answers a list of requests in order. Cached
answers are served at once; only the misses go to the backend, batch by
batch, and each batch is committed to the cache as soon as it returns, so an
interrupted stage resumes where it stopped. A pooled backend (``pool = True``:
the remote ones) gets every miss at once and hands back each answer as it
arrives, and each is committed then, so a crash loses only the calls in flight.
A backend that loses part of a batch raises ``PartialBatchError`` with the
answers it did get; those are cached too before the error goes on.

In replay mode (``mode="replay"`` or ``MOLOCH_LLM_MODE=replay``) the backend is
never called: a request the cache does not hold is an error that says which
one, so a report can be rebuilt offline from a finished run.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from .. import progress
from ..errors import CacheMissError, ModelError
from .base import Backend, ChatRequest, Completion
from .cache import CallCache, call_key

CallMode = Literal["live", "replay"]  # replay: answer from the cache only, never the backend
CALL_MODES: tuple[str, ...] = ("live", "replay")
ENV_MODE = "MOLOCH_LLM_MODE"


class PartialBatchError(ModelError):
    """A backend failed part of a batch; ``completed`` maps batch positions to the answers
    it did get, which the client caches before re-raising."""

    def __init__(self, message: str, completed: dict[int, Completion]):
        super().__init__(message)
        self.completed = completed


def default_mode() -> CallMode:
    """``$MOLOCH_LLM_MODE`` or ``live``."""
    mode = os.environ.get(ENV_MODE, "").strip().lower() or "live"
    if mode not in CALL_MODES:
        raise ModelError(f"{ENV_MODE}={mode!r} is not a mode: set it to 'live' or 'replay'")
    return mode  # type: ignore[return-value]


class LLM:
    """One role's model (player, voter, judge) behind a call cache."""

    def __init__(
        self,
        backend: Backend,
        cache: CallCache | None = None,
        mode: CallMode | None = None,
        role: str = "llm",
        batch_size: int = 8,
    ):
        mode = mode or default_mode()
        if mode not in CALL_MODES:
            raise ModelError(f"unknown LLM mode {mode!r} for role {role!r}: use 'live' or 'replay'")
        if mode == "replay" and cache is None:
            raise ModelError(
                f"role {role!r}: replay mode needs a call cache to replay from; pass a CallCache "
                f"or run live"
            )
        if batch_size < 1:
            raise ModelError(f"role {role!r}: batch_size must be at least 1, got {batch_size}")
        self.backend, self.cache, self.mode, self.role = backend, cache, mode, role
        self.batch_size = batch_size
        self._stats = {
            "requests": 0,
            "hits": 0,
            "misses": 0,
            "backend_calls": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "new_prompt_tokens": 0,
            "new_completion_tokens": 0,
            "wall_seconds": 0.0,
        }

    def __repr__(self) -> str:
        return f"LLM(role={self.role!r}, backend={self.backend.name!r}, mode={self.mode!r})"

    def stats(self) -> dict:
        """Counts for a stage manifest: what was served, from where, at what cost."""
        return {
            "role": self.role,
            "backend": self.backend.name,
            "identity": self.backend.identity(),
            # the model's own top_k/top_p, used where a request left them unset (local backends)
            "sampling_defaults": getattr(self.backend, "sampling_defaults", None),
            "mode": self.mode,
            **self._stats,
            "wall_seconds": round(self._stats["wall_seconds"], 3),
        }

    def complete(
        self, requests: Sequence[ChatRequest], desc: str | None = None
    ) -> list[Completion]:
        """Answer ``requests`` in order; misses go to the backend unless replaying."""
        started = time.perf_counter()
        requests = list(requests)
        try:
            return self._complete(requests, desc)
        finally:
            self._stats["wall_seconds"] += time.perf_counter() - started

    def _complete(self, requests: list[ChatRequest], desc: str | None) -> list[Completion]:
        if self.cache is None:
            keys = [str(i) for i in range(len(requests))]
            found: dict[str, Completion] = {}
        else:
            identity = self.backend.identity()
            keys = [call_key(self.backend, r, identity) for r in requests]
            found = self.cache.get_many(keys)
        # Identical requests in one call are sent once: the key says they share an answer.
        uses = Counter(keys)
        first_request: dict[str, ChatRequest] = {}
        for key, request in zip(keys, requests, strict=True):
            first_request.setdefault(key, request)
        # Misses in the order of their messages: requests that begin alike (a voter's ballots,
        # one anchor's probes) meet in a batch, where a local backend computes their common
        # prefix once. Only the order of the calls changes, never a request.
        missing = sorted(
            (k for k in uses if k not in found), key=lambda k: first_request[k].messages
        )
        hits = len(requests) - sum(uses[k] for k in missing)
        self._stats["requests"] += len(requests)
        self._stats["hits"] += hits
        self._stats["misses"] += len(missing)

        if missing and self.mode == "replay":
            raise self._miss_error(first_request[missing[0]], missing[0], len(missing))

        pooled = getattr(self.backend, "pool", False)
        size = max(1, len(missing)) if pooled else self.batch_size
        with progress.bar(len(requests), desc or self.role) as bar:
            bar.update(hits)
            for start in range(0, len(missing), size):
                batch_keys = missing[start : start + size]
                batch = [first_request[k] for k in batch_keys]
                found.update(self._answer(batch_keys, batch, pooled, bar, uses))

        out = [found[k] for k in keys]
        for answer in out:
            self._stats["prompt_tokens"] += answer.prompt_tokens
            self._stats["completion_tokens"] += answer.completion_tokens
        return out

    def _answer(self, keys, batch, pooled, bar, uses) -> dict[str, Completion]:
        """The backend's answers to ``batch``, each committed (and counted) once: all at the
        end of the batch, or, from a pooled backend, one by one as they arrive."""
        answered: dict[str, Completion] = {}

        def take(done: dict[int, Completion]) -> None:
            fresh = {keys[i]: (batch[i], replace(c, cached=False)) for i, c in done.items()}
            fresh = {k: v for k, v in fresh.items() if k not in answered}
            self._save([(k, request, c) for k, (request, c) in fresh.items()])
            for key, (_, answer) in fresh.items():
                answered[key] = answer
                self._stats["backend_calls"] += 1
                self._stats["new_prompt_tokens"] += answer.prompt_tokens
                self._stats["new_completion_tokens"] += answer.completion_tokens
                bar.update(uses[key])

        try:
            if pooled:
                answers = self.backend.generate(batch, on_answer=lambda i, c: take({i: c}))
            else:
                answers = self.backend.generate(batch)
        except PartialBatchError as err:
            take(err.completed)
            raise
        if len(answers) != len(batch):
            raise ModelError(
                f"backend {self.backend.name!r} returned {len(answers)} completions for "
                f"{len(batch)} requests (role {self.role!r}); the backend is faulty"
            )
        take(dict(enumerate(answers)))
        return answered

    def _save(self, entries: list[tuple[str, ChatRequest, Completion]]) -> None:
        if self.cache is not None and entries:
            self.cache.put_many(self.backend, entries)

    def _miss_error(self, request: ChatRequest, key: str, count: int) -> CacheMissError:
        model = self.backend.identity().get("model", self.backend.name)
        last = request.messages[-1][1] if request.messages else ""
        snippet = last[:80].replace("\n", " ")
        return CacheMissError(
            f"replay mode: the call cache {self.cache.path} has no answer for a {self.role!r} "
            f"request to {model!r} (last message starts {snippet!r}; cache key {key}); "
            f"{count} request(s) of this batch are missing. Rerun live to compute them "
            f"(unset {ENV_MODE} or pass mode='live')."
        )
