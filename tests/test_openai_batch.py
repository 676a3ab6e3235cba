"""The Batch API backend against a local fake of the files and batches endpoints."""

from __future__ import annotations

import email.parser
import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler

import pytest

from moloch.config import ModelSpec
from moloch.errors import ModelError
from moloch.faults import LocalServer
from moloch.llm import CallCache, ChatRequest, get_llm
from moloch.llm.openai_batch import BATCH_ROUNDS, OpenAIBatchBackend
from moloch.prices import cost


class BatchAPI(LocalServer):
    """The OpenAI files and batches endpoints, in memory, on 127.0.0.1.

    A batch moves from validating to in_progress to its fate over successive retrieves;
    ``fates`` gives each new batch its fate (then "complete"): "complete", "errors" (every
    other line fails with HTTP 500), "expired" or "cancelled" (half the lines answered),
    "failed" (nothing answered). ``created`` counts batches submitted (what is paid).
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.fates: deque[str] = deque()
        self.created = 0
        self.lines_submitted: list[int] = []
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with api.lock:
                    if self.path == "/v1/files":
                        return self.send(api.upload(self.headers["Content-Type"], body))
                    if self.path == "/v1/batches":
                        return self.send(api.create(json.loads(body)))
                self.send({"error": {"message": "no such path"}}, 404)

            def do_GET(self):
                with api.lock:
                    if self.path.startswith("/v1/files/") and self.path.endswith("/content"):
                        return self.send(api.files[self.path.split("/")[3]], raw=True)
                    if self.path.startswith("/v1/batches/"):
                        return self.send(api.retrieve(self.path.split("/")[3]))
                    if self.path.startswith("/v1/batches"):
                        data = list(api.batches.values())
                        return self.send({"object": "list", "data": data, "has_more": False})
                self.send({"error": {"message": "no such path"}}, 404)

            def send(self, payload, status=200, raw=False):
                data = payload if raw else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(Handler)

    def upload(self, content_type: str, body: bytes) -> dict:
        message = email.parser.BytesParser().parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        parts = {
            p.get_param("name", header="content-disposition"): p for p in message.get_payload()
        }
        file_id = f"file-{len(self.files)}"
        self.files[file_id] = parts["file"].get_payload(decode=True)
        return {"id": file_id, "object": "file", "bytes": len(self.files[file_id]),
                "created_at": 0, "filename": "batch.jsonl", "purpose": "batch"}  # fmt: skip

    def create(self, spec: dict) -> dict:
        self.created += 1
        batch_id = f"batch-{self.created}"
        lines = self.files[spec["input_file_id"]].decode().splitlines()
        self.lines_submitted.append(len(lines))
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": spec["endpoint"],
            "input_file_id": spec["input_file_id"], "completion_window": "24h",
            "status": "validating", "created_at": 0, "metadata": spec.get("metadata"),
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "_fate": self.fates.popleft() if self.fates else "complete", "_looks": 0,
        }  # fmt: skip
        return self.public(batch_id)

    def public(self, batch_id: str) -> dict:
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    def retrieve(self, batch_id: str) -> dict:
        batch = self.batches[batch_id]
        batch["_looks"] += 1
        if batch["_looks"] == 1:
            batch["status"] = "in_progress"
        elif batch["status"] == "in_progress":
            self.finish(batch)
        return self.public(batch_id)

    def finish(self, batch: dict) -> None:
        fate = batch["_fate"]
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]].decode().splitlines()]
        if fate in ("expired", "cancelled"):
            lines = lines[: len(lines) // 2]
        if fate == "failed":
            lines = []
            batch["errors"] = {"object": "list", "data": [{"code": "invalid", "message": "bad"}]}
        good, bad = [], []
        for i, line in enumerate(lines):
            if fate == "errors" and i % 2:
                bad.append({"custom_id": line["custom_id"], "error": None, "response": {
                    "status_code": 500, "body": {"error": {"message": "boom"}}}})  # fmt: skip
                continue
            user = line["body"]["messages"][-1]["content"]
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            body = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": f"echo: {user}"}}],
                    "usage": usage}  # fmt: skip
            good.append({"custom_id": line["custom_id"], "error": None,
                         "response": {"status_code": 200, "body": body}})  # fmt: skip
        for name, rows in (("output_file_id", good), ("error_file_id", bad)):
            if rows:
                file_id = f"file-{len(self.files)}"
                self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[name] = file_id
        batch["status"] = "completed" if fate in ("complete", "errors") else fate
        batch["request_counts"].update(completed=len(good), failed=len(bad))


@pytest.fixture
def api(monkeypatch):
    with BatchAPI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        yield server


def spec(**changes) -> ModelSpec:
    values = dict(backend="openai-batch", model="gpt-4o-mini", temperature=0.1, max_tokens=16,
                  batch_poll_s=0.01, batch_max_requests=4)  # fmt: skip
    return ModelSpec(**{**values, **changes})


def asks(n: int) -> list[ChatRequest]:
    return [ChatRequest.chat("You are a voter.", f"q{i}", temperature=0.1, max_tokens=16)
            for i in range(n)]  # fmt: skip


def test_misses_go_out_in_batches_and_come_back_in_order_into_the_cache(api, tmp_path):
    llm = get_llm(spec(), cache=tmp_path / "run" / "llm-cache.sqlite", mode="live")
    out = llm.complete(asks(10))
    assert [c.text for c in out] == [f"echo: q{i}" for i in range(10)]
    assert api.created == 3 and api.lines_submitted == [4, 4, 2]  # at most batch_max_requests
    records = sorted((tmp_path / "run" / "batches").glob("*.json"))
    assert len(records) == 3 and all(json.loads(p.read_text())["read"] for p in records)
    again = get_llm(spec(), cache=tmp_path / "run" / "llm-cache.sqlite", mode="live")
    assert [c.text for c in again.complete(asks(10))] == [c.text for c in out]
    assert api.created == 3  # all from the cache
    synchronous = get_llm(spec(backend="openai"), cache=tmp_path / "run" / "llm-cache.sqlite")
    assert all(c.cached for c in synchronous.complete(asks(10)))  # one cache key for both


@pytest.mark.parametrize("fate", ["errors", "expired", "cancelled"])
def test_only_what_is_missing_is_submitted_again(api, tmp_path, fate):
    api.fates.extend([fate])
    llm = get_llm(spec(batch_max_requests=8), cache=tmp_path / "c.sqlite", mode="live")
    out = llm.complete(asks(8))
    assert [c.text for c in out] == [f"echo: q{i}" for i in range(8)]
    assert api.lines_submitted == [8, 4]  # the second batch: the four left unanswered


def test_lines_that_never_succeed_end_in_an_error_and_the_answers_are_kept(api, tmp_path):
    api.fates.extend(["errors"] + ["failed"] * (BATCH_ROUNDS - 1))
    cache = CallCache(tmp_path / "c.sqlite")
    llm = get_llm(spec(batch_max_requests=8), cache=cache, mode="live")
    with pytest.raises(ModelError, match=f"4 of 8 requests have no answer after {BATCH_ROUNDS}"):
        llm.complete(asks(8))
    assert api.created == BATCH_ROUNDS and api.lines_submitted == [8, 4, 4]
    assert len(cache) == 4  # the four answered lines were committed before the error


def test_a_restart_polls_the_same_batch_and_never_pays_twice(api, tmp_path, monkeypatch):
    cache = tmp_path / "run" / "llm-cache.sqlite"
    real_wait = OpenAIBatchBackend._wait

    def killed(self, *args):
        raise KeyboardInterrupt  # the run dies while its batch is in flight

    monkeypatch.setattr(OpenAIBatchBackend, "_wait", killed)
    with pytest.raises(KeyboardInterrupt):
        get_llm(spec(), cache=cache, mode="live").complete(asks(3))
    monkeypatch.setattr(OpenAIBatchBackend, "_wait", real_wait)
    out = get_llm(spec(), cache=cache, mode="live").complete(asks(3))
    assert [c.text for c in out] == ["echo: q0", "echo: q1", "echo: q2"] and api.created == 1


def test_a_batch_submitted_just_before_a_crash_is_found_on_the_server(api, tmp_path, monkeypatch):
    """Killed after the batch was created but before its id was kept: its digest in the
    batch's metadata finds it again."""
    cache = tmp_path / "run" / "llm-cache.sqlite"
    real_keep = OpenAIBatchBackend._keep
    monkeypatch.setattr(OpenAIBatchBackend, "_keep", lambda self, record: (_ for _ in ()).throw(
        KeyboardInterrupt))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        get_llm(spec(), cache=cache, mode="live").complete(asks(3))
    assert api.created == 1 and not (tmp_path / "run" / "batches").exists()
    monkeypatch.setattr(OpenAIBatchBackend, "_keep", real_keep)
    out = get_llm(spec(), cache=cache, mode="live").complete(asks(3))
    assert [c.text for c in out] == ["echo: q0", "echo: q1", "echo: q2"] and api.created == 1


def test_the_batch_price_is_half_the_standard_one():
    standard, batch = spec(backend="openai"), spec()
    assert cost(standard, 1e6, 1e6) == pytest.approx(0.75)  # gpt-4o-mini: $0.15 + $0.60
    assert cost(batch, 1e6, 1e6) == pytest.approx(0.5 * cost(standard, 1e6, 1e6))
    assert cost(standard, 1e6, 0, batch=True) == pytest.approx(0.075)
