"""The OpenAI Batch API (``backend: openai-batch``): the same models at half the price,
answered within the API's 24-hour window.

Every miss the client hands over becomes one line of a JSON-lines file whose
``custom_id`` is the call-cache key; the file is uploaded and submitted as a batch of at
most ``batch_max_requests`` lines (50,000 is the API's limit), and the batch's id is kept
in the run folder (``batches/<id>.json``) before anything waits on it. Batches are polled
every ``batch_poll_s`` seconds; each answer is handed to the client (and so committed to
the call cache) as its batch's output is read.

Never paid twice: a restart reads the kept ids and polls the same batches; a batch
submitted just before a crash, before its id was kept, is found again on the server by
the digest of its lines in its metadata. Lines that come back with an error, or are
missing from an expired, cancelled or failed batch, are submitted again, at most
``BATCH_ROUNDS`` times in all; then the client gets the answers there are and a
ModelError naming what is missing.

The cache key is the synchronous API's (``name = "openai"``): a batch line is the same
request to the same model, so a run can move between the two without paying again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import openai
from openai.types.chat import ChatCompletion

from ..config import ModelSpec
from ..errors import ModelError
from ..files import read_json, write_json
from ..hashing import object_sha256
from .adapters import adapter_name
from .base import ChatRequest, Completion, OnAnswer
from .cache import call_key
from .client import PartialBatchError
from .openai_backend import OpenAIBackend, _completion, _Unusable, public_url, request_options

log = logging.getLogger(__name__)

ENDPOINT, WINDOW = "/v1/chat/completions", "24h"
BATCH_ROUNDS = 3  # submissions of a line at most (its first and two retries)
DONE = frozenset({"completed", "expired", "cancelled", "failed"})  # the API's final states
DEADLINE_S = 26 * 3600  # the 24-hour window and a margin: a batch must have ended by then


class OpenAIBatchBackend(OpenAIBackend):
    """Chat completions through the Batch API; ``state_dir`` keeps the batch records."""

    name = "openai"  # the cache identity of the synchronous API: the same requests, models
    pool = True  # the client hands over every miss at once

    def __init__(self, spec: ModelSpec, state_dir: str | Path, **kwargs):
        super().__init__(spec, **kwargs)
        self.state_dir = Path(state_dir)
        self.poll_s = spec.batch_poll_s

    def __repr__(self) -> str:
        return (
            f"OpenAIBatchBackend(model={self.spec.model!r}, base_url={public_url(self.base_url)!r})"
        )

    def generate(
        self, requests: Sequence[ChatRequest], on_answer: OnAnswer | None = None
    ) -> list[Completion]:
        """Answer every request through batches; ``on_answer(index, completion)`` as read."""
        if not requests:
            return []
        self._refuse_unservable(requests)
        self._need_key()
        identity = self.identity()
        ids = [call_key(self, r, identity) for r in requests]
        where = {cid: i for i, cid in enumerate(ids)}
        answers: dict[int, Completion] = {}
        errors: dict[str, str] = {}

        def arrived(cid: str, completion: Completion) -> None:
            i = where[cid]
            if i not in answers:
                answers[i] = completion
                if on_answer is not None:
                    on_answer(i, completion)

        client = openai.OpenAI(base_url=self.base_url, api_key=self._key, timeout=self.timeout)
        try:
            for round_ in range(BATCH_ROUNDS):
                wanted = sorted(cid for cid in ids if where[cid] not in answers)
                if not wanted:
                    break
                batches = self._batches_for(client, wanted, requests, where, round_)
                self._wait(client, batches, set(wanted), arrived, errors)
        finally:
            client.close()
        missing = [cid for cid in ids if where[cid] not in answers]
        if missing:
            first = missing[0]
            raise PartialBatchError(
                f"{self.spec.model!r} at {public_url(self.base_url)} (Batch API): "
                f"{len(missing)} of {len(ids)} requests have no answer after {BATCH_ROUNDS} "
                f"submissions; the first ({first[:12]}): {errors.get(first, 'no line came back')}. "
                f"Answers received are cached; rerun to submit the rest again.",
                completed=dict(answers),
            )
        return [answers[i] for i in range(len(ids))]

    # --- batches ----------------------------------------------------------------------

    def _records(self) -> list[dict]:
        if not self.state_dir.is_dir():
            return []
        return [read_json(p, "batch record") for p in sorted(self.state_dir.glob("*.json"))]

    def _keep(self, record: dict) -> None:
        write_json(self.state_dir / f"{record['batch_id']}.json", record)

    def _batches_for(self, client, wanted, requests, where, round_) -> list[dict]:
        """The batches that will answer ``wanted``: kept ones not yet read (a restart polls
        them), and new ones for the lines no kept batch holds."""
        left = set(wanted)
        chosen = []
        for record in self._records():
            if not record.get("read") and left & set(record["custom_ids"]):
                chosen.append(record)
                left -= set(record["custom_ids"])
        todo = sorted(left)
        size = self.spec.batch_max_requests
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            chosen.append(self._submit(client, chunk, requests, where, round_))
        return chosen

    def _submit(self, client, chunk: list[str], requests, where, round_: int) -> dict:
        digest = object_sha256({"custom_ids": chunk, "round": round_})
        record = {"custom_ids": chunk, "digest": digest, "round": round_, "read": False}
        found = self._submitted(client, digest)
        if found is not None:  # submitted before a crash that came before its record
            log.warning("Batch API: batch %s found on the server again; not submitted twice",
                        found)  # fmt: skip
            record["batch_id"] = found
            self._keep(record)
            return record
        lines = [json.dumps(self._line(cid, requests[where[cid]])) for cid in chunk]
        upload = client.files.create(
            file=(f"moloch-{digest[:12]}.jsonl", ("\n".join(lines) + "\n").encode()),
            purpose="batch",
        )
        batch = client.batches.create(
            input_file_id=upload.id, endpoint=ENDPOINT, completion_window=WINDOW,
            metadata={"moloch_digest": digest},
        )  # fmt: skip
        record["batch_id"] = batch.id
        self._keep(record)
        log.warning("Batch API: submitted batch %s (%d requests, round %d)", batch.id,
                    len(chunk), round_ + 1)  # fmt: skip
        return record

    def _submitted(self, client, digest: str) -> str | None:
        """A live batch on the server with this digest (made by this backend), or None."""
        for batch in client.batches.list(limit=100):
            meta = batch.metadata or {}
            if meta.get("moloch_digest") == digest and batch.status not in ("failed", "cancelled"):
                return batch.id
        return None

    def _line(self, cid: str, request: ChatRequest) -> dict:
        body = {
            "model": adapter_name(request.adapter) if request.adapter else self.served_model,
            "messages": request.as_openai_messages(),
            "temperature": request.temperature,
            "seed": request.seed,
            "n": 1,
        }
        options = request_options(self.served_model, request)
        body.update(options.pop("extra_body", {}))
        body.update(options)
        return {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}

    def _wait(self, client, records, wanted: set[str], arrived, errors: dict) -> None:
        """Poll until every batch has ended, reading each one's answers as it ends."""
        open_ = {r["batch_id"]: r for r in records}
        seen: dict[str, str] = {}
        deadline = time.monotonic() + DEADLINE_S
        while open_:
            for batch_id, record in list(open_.items()):
                batch = client.batches.retrieve(batch_id)
                counts = batch.request_counts
                state = (
                    f"{batch.status} {counts.completed}/{counts.total}" if counts else batch.status
                )
                if seen.get(batch_id) != state:
                    log.warning("Batch API: batch %s %s", batch_id, state)
                    seen[batch_id] = state
                if batch.status in DONE:
                    self._read(client, batch, wanted, arrived, errors)
                    record.update(read=True, status=batch.status)
                    self._keep(record)
                    del open_[batch_id]
            if open_:
                if time.monotonic() > deadline:
                    raise ModelError(
                        f"Batch API: batches {sorted(open_)} have not ended {DEADLINE_S // 3600} "
                        f"h after they were polled first; check them on the provider's console"
                    )
                time.sleep(self.poll_s)

    def _read(self, client, batch, wanted: set[str], arrived, errors: dict) -> None:
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for text in client.files.content(file_id).text.splitlines():
                if not text.strip():
                    continue
                line = json.loads(text)
                cid = line.get("custom_id")
                if cid not in wanted:
                    continue
                response = line.get("response") or {}
                if line.get("error") or response.get("status_code") != 200:
                    error = line.get("error") or (response.get("body") or {}).get("error")
                    errors[cid] = f"HTTP {response.get('status_code')}: {error}"
                    continue
                try:
                    arrived(cid, _completion(ChatCompletion.model_validate(response["body"])))
                except (_Unusable, ValueError) as err:
                    errors[cid] = f"unreadable answer ({err})"
        if batch.status == "failed" and batch.errors:
            for cid in wanted:
                errors.setdefault(cid, f"batch {batch.id} failed: {batch.errors}")
