"""The LLM client: cache first, misses in batches, replay mode, order and stats."""

from __future__ import annotations

import pytest

from moloch.config import ModelSpec
from moloch.errors import CacheMissError, ModelError
from moloch.llm import LLM, CallCache, ChatRequest, get_llm, make_backend
from moloch.llm.fake import FakeBackend, request_digest


def requests(n: int, text: str = "Which pitch wins?") -> list[ChatRequest]:
    return [
        ChatRequest.chat("sys", f"{text} #{i}", temperature=0.7, seed=7, sample_index=i % 2)
        for i in range(n)
    ]


def test_fake_answers_are_a_pure_function_of_the_request():
    a, b = FakeBackend(), FakeBackend()
    batch = requests(4)
    assert [c.text for c in a.generate(batch)] == [c.text for c in b.generate(batch)]
    texts = {c.text for c in a.generate(batch)}
    assert len(texts) == 4  # differing messages or sample index give differing answers
    assert request_digest(batch[0]) != request_digest(
        ChatRequest(batch[0].messages, 0.7, seed=8, sample_index=0)
    )
    assert a.calls == 8 and a.batches == 2


def test_second_run_is_served_from_the_cache(tmp_path):
    backend = FakeBackend()
    llm = LLM(backend, CallCache(tmp_path / "c.sqlite"), mode="live", role="voter", batch_size=3)
    first = llm.complete(requests(10))
    assert backend.calls == 10 and backend.batches == 4  # 3 + 3 + 3 + 1
    assert not any(c.cached for c in first)

    again = LLM(backend, CallCache(tmp_path / "c.sqlite"), mode="live", role="voter")
    second = again.complete(requests(10))
    assert backend.calls == 10  # zero new backend calls
    assert [c.text for c in second] == [c.text for c in first]
    assert all(c.cached for c in second)
    stats = again.stats()
    assert (stats["requests"], stats["hits"], stats["misses"], stats["backend_calls"]) == (
        10,
        10,
        0,
        0,
    )
    assert stats["new_prompt_tokens"] == 0 and stats["prompt_tokens"] > 0
    assert stats["identity"] == {"backend": "fake", "model": "fake"} and stats["role"] == "voter"


def test_results_keep_request_order_with_mixed_hits_and_duplicates(tmp_path):
    backend = FakeBackend()
    cache = CallCache(tmp_path / "c.sqlite")
    batch = requests(6)
    LLM(backend, cache, mode="live").complete(batch[::2])  # warm every other request
    mixed = [batch[5], batch[0], batch[5], batch[3], batch[2], batch[1]]
    out = LLM(backend, cache, mode="live", batch_size=2).complete(mixed)
    expected = [c.text for c in FakeBackend().generate(mixed)]
    assert [c.text for c in out] == expected
    # 3 warmed + the 3 unseen ones, and batch[5] sent once although asked twice.
    assert backend.calls == 3 + 3
    assert [c.cached for c in out] == [False, True, False, False, True, False]


def test_each_batch_is_committed_before_a_crash(tmp_path):
    def responder(request):
        if request.messages[-1][1].endswith("#7"):
            raise RuntimeError("backend died")
        return "ok " + request.messages[-1][1]

    cache_path = tmp_path / "c.sqlite"
    dying = LLM(FakeBackend(responder=responder), CallCache(cache_path), mode="live", batch_size=3)
    with pytest.raises(RuntimeError, match="backend died"):
        dying.complete(requests(10))  # batches [0-2], [3-5] done; [6-8] dies

    healthy = FakeBackend(responder=lambda r: "ok " + r.messages[-1][1])
    out = LLM(healthy, CallCache(cache_path), mode="live", batch_size=3).complete(requests(10))
    assert healthy.calls == 4  # only 6..9 recomputed
    assert [c.text for c in out] == [f"ok Which pitch wins? #{i}" for i in range(10)]


def test_replay_serves_hits_and_never_calls_the_backend(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    live = LLM(FakeBackend(), cache, mode="live")
    expected = live.complete(requests(3))
    offline = FakeBackend(responder=lambda r: pytest.fail("replay called the backend"))
    out = LLM(offline, cache, mode="replay").complete(requests(3))
    assert out == [c.__class__(**{**c.__dict__, "cached": True}) for c in expected]


def test_replay_miss_names_the_request_and_says_what_to_do(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    LLM(FakeBackend(model="gpt-4o-mini"), cache, mode="live").complete(requests(1))
    backend = FakeBackend(model="gpt-4o-mini")
    replay = LLM(backend, cache, mode="replay", role="voter")
    wanted = requests(3, text="A long ballot " + "x" * 200)
    with pytest.raises(CacheMissError) as info:
        replay.complete(wanted)
    message = str(info.value)
    assert "'voter'" in message and "'gpt-4o-mini'" in message
    assert "A long ballot " + "x" * 66 in message and "x" * 67 not in message  # first 80 chars
    assert "3 request(s)" in message and "Rerun live" in message and "MOLOCH_LLM_MODE" in message
    from moloch.llm.cache import call_key

    assert call_key(backend, wanted[0]) in message
    assert backend.calls == 0


def test_environment_switch_selects_replay(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLOCH_LLM_MODE", "replay")
    llm = LLM(FakeBackend(), CallCache(tmp_path / "c.sqlite"))
    assert llm.mode == "replay"
    with pytest.raises(CacheMissError):
        llm.complete(requests(1))
    monkeypatch.setenv("MOLOCH_LLM_MODE", "sometimes")
    with pytest.raises(ModelError, match="MOLOCH_LLM_MODE='sometimes'.*'live' or 'replay'"):
        LLM(FakeBackend(), CallCache(tmp_path / "c.sqlite"))


def test_replay_without_a_cache_is_refused():
    with pytest.raises(ModelError, match="replay mode needs a call cache"):
        LLM(FakeBackend(), None, mode="replay")


def test_no_cache_still_answers_in_order():
    backend = FakeBackend()
    out = LLM(backend, None, mode="live", batch_size=4).complete(requests(5))
    assert [c.text for c in out] == [c.text for c in FakeBackend().generate(requests(5))]
    assert backend.batches == 2


def test_a_backend_that_drops_answers_is_caught(tmp_path):
    class Lossy(FakeBackend):
        def generate(self, batch):
            return super().generate(batch)[:-1]

    with pytest.raises(ModelError, match="returned 1 completions for 2 requests"):
        LLM(Lossy(), CallCache(tmp_path / "c.sqlite"), mode="live").complete(requests(2))


def test_get_llm_builds_the_spec_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLOCH_CACHE", str(tmp_path))
    monkeypatch.delenv("MOLOCH_LLM_MODE", raising=False)
    spec = ModelSpec(backend="fake", model="toy", temperature=0.1, max_tokens=8, batch_size=5)
    llm = get_llm(spec, role="judge")
    assert isinstance(llm.backend, FakeBackend) and llm.backend.model == "toy"
    assert llm.cache.path == tmp_path / "calls.sqlite" and llm.batch_size == 5
    assert get_llm(spec, cache=False).cache is None
    assert get_llm(spec, cache=tmp_path / "other.sqlite").cache.path == tmp_path / "other.sqlite"
    remote = spec.model_copy(update={"backend": "openai", "max_concurrency": 32})
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert get_llm(remote, cache=False).batch_size == 32
    assert make_backend(remote).identity()["base_url"] == "http://127.0.0.1:9/v1"


def test_misses_go_to_the_backend_ordered_by_their_messages(tmp_path):
    """Requests that begin alike meet in a batch (the local backend shares their prefix);
    answers still come back in the caller's order."""
    seen: list[str] = []

    class Recording(FakeBackend):
        def generate(self, requests):
            seen.extend(r.messages[1][1] for r in requests)
            return super().generate(requests)

    voters = [f"voter {v}: ballot {d}" for d in range(3) for v in (2, 0, 1)]
    batch = [ChatRequest.chat("sys", text, temperature=0.1) for text in voters]
    llm = LLM(Recording(), CallCache(tmp_path / "c.sqlite"), mode="live", batch_size=3)
    answers = llm.complete(batch)
    assert seen == sorted(voters)  # each batch of three holds one voter's ballots
    assert [c.text for c in answers] == [c.text for c in FakeBackend().generate(batch)]
