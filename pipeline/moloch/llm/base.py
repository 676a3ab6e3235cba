"""The one interface every role (player, voter, judge) talks to.

A backend turns a batch of chat requests into completions. Everything that
decides an answer is in the request (messages, sampling, seed, sample index,
adapter), so the request is also the cache key (see ``cache.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import ModelError

Message = tuple[str, str]  # (role, content)
# Where an OpenAI-compatible role's requests go by default, and the hosts that are this
# machine (a server there costs nothing and its port is no identity).
OPENAI_URL = "https://api.openai.com/v1"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class AnswerFormat:
    """A reply shape enforced by constrained decoding (transformers backend only).

    The reply starts with ``opening``, then the model writes freely until it
    stops or its budget runs out, then it must end with one of ``options``; the
    model's own next-token probabilities pick the option. This lets a tiny model
    that cannot follow the XML instructions still answer (the smoke profile);
    the paper's models answer freely, as in the original.
    """

    opening: str
    options: tuple[str, ...]

    @staticmethod
    def tagged(tag: str, values: tuple[str, ...]) -> AnswerFormat:
        """``<think> ... </think>`` then ``<tag>value</tag>`` for one of ``values``."""
        return AnswerFormat("<think>", tuple(f" </think>\n<{tag}>{v}</{tag}>" for v in values))


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    temperature: float
    top_p: float | None = None  # None: the model's own default (see moloch.llm.sampling)
    top_k: int | None = None  # None: likewise
    max_tokens: int | None = 256  # None: no limit (OpenAI-compatible servers only)
    seed: int = 0
    sample_index: int = 0  # the n-th independent sample for the same messages
    adapter: str | None = None  # path of a LoRA adapter folder, or None for the base model
    enable_thinking: bool | None = None  # chat-template switch (Qwen3)
    add_special_tokens: bool = False  # the tokenizer adds its special tokens too (v1 did)
    answer_format: AnswerFormat | None = None  # forced reply shape (see AnswerFormat)

    @staticmethod
    def sampled(spec, messages, **kwargs) -> ChatRequest:
        """A request with a role's sampling settings (a ModelSpec), the rest from ``kwargs``."""
        return ChatRequest(
            messages=tuple((role, text) for role, text in messages),
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            max_tokens=spec.max_tokens,
            enable_thinking=spec.enable_thinking,
            add_special_tokens=spec.add_special_tokens,
            **kwargs,
        )

    @staticmethod
    def chat(system: str | None, user: str, **kwargs) -> ChatRequest:
        messages: list[Message] = []
        if system is not None:
            messages.append(("system", system))
        messages.append(("user", user))
        return ChatRequest(messages=tuple(messages), **kwargs)

    def as_openai_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    cached: bool = False
    meta: dict = field(default_factory=dict, compare=False)


OnAnswer = Callable[[int, Completion], None]  # (position in the batch, its answer)


@runtime_checkable
class Backend(Protocol):
    """What a model backend provides. ``identity`` names the exact weights.

    A backend that sets ``pool = True`` (the remote ones) takes ``generate(requests,
    on_answer=...)``: it keeps its own number of requests in flight over the whole list and
    reports each answer as it arrives, so the client sends it every miss at once and commits
    answers one by one. The others answer a batch at a time, as the client cuts them.
    """

    name: str

    def identity(self) -> dict:
        """Everything that pins the model: id, revision or file hash."""
        ...

    def generate(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """Answer every request, in order. Must not drop any."""
        ...


def refuse_answer_format(backend: str, requests: Sequence[ChatRequest]) -> None:
    """Backends without constrained decoding say so rather than ignore the format."""
    if any(r.answer_format is not None for r in requests):
        raise ModelError(
            f"the {backend} backend cannot force an answer format: set force_answer: false "
            f"for this role in the profile, or serve it with the transformers backend"
        )
