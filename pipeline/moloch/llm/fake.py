"""A deterministic stand-in model for tests: no weights, no network.

By default the answer is a pure function of the request (its messages, seed,
sample index and adapter), so two runs agree and two samples differ. A test
scripts the answers it needs with ``responder``::

    >>> from moloch.llm.fake import FakeBackend
    >>> voter = FakeBackend(responder=lambda request: "<think>x</think><vote>A</vote>")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..hashing import object_sha256
from .base import ChatRequest, Completion

Responder = Callable[[ChatRequest], str]


def request_digest(request: ChatRequest) -> str:
    """Hash of the fields a fake answer depends on."""
    return object_sha256(
        {
            "messages": [list(m) for m in request.messages],
            "seed": request.seed,
            "sample_index": request.sample_index,
            "adapter": request.adapter,
        }
    )


def default_responder(request: ChatRequest) -> str:
    return f"<think>fake thought {request_digest(request)[:12]}</think>fake answer"


def approx_tokens(text: str) -> int:
    """Token count by the usual four-characters-per-token rule of thumb."""
    return max(1, round(len(text) / 4))


class FakeBackend:
    """Answers every request with ``responder(request)``; counts what it was sent."""

    name = "fake"

    def __init__(self, model: str = "fake", responder: Responder | None = None):
        self.model = model
        self.responder = responder or default_responder
        self.calls = 0  # requests answered
        self.batches = 0  # generate() invocations
        self.seen: list[ChatRequest] = []

    def identity(self) -> dict:
        return {"backend": self.name, "model": self.model}

    def generate(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        self.batches += 1
        out = []
        for request in requests:
            text = self.responder(request)
            self.calls += 1
            self.seen.append(request)
            prompt = "".join(content for _, content in request.messages)
            out.append(
                Completion(
                    text=text,
                    prompt_tokens=approx_tokens(prompt),
                    completion_tokens=approx_tokens(text),
                    finish_reason="stop",
                )
            )
        return out
