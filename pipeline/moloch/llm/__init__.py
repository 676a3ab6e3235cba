"""Model runtime: one client (``LLM``) over interchangeable backends, behind a call cache.

    >>> from moloch.config import load_profile
    >>> from moloch.llm import ChatRequest, get_llm
    >>> voter = get_llm(load_profile("smoke").audience, role="voter")
    >>> voter.complete([ChatRequest.chat("Be brief.", "Say hi", temperature=0.1)])

Backends by ``spec.backend``: ``fake`` (tests), ``openai`` (any OpenAI-compatible
server), ``transformers`` (CPU/GPU with Hugging Face) and ``vllm`` (GPU, or its CPU build). The
last two are imported only when asked for, so the light ones need no torch.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelSpec
from ..errors import ModelError
from .base import Backend, ChatRequest, Completion
from .cache import CallCache
from .client import LLM, CallMode

__all__ = [
    "LLM", "Backend", "CallCache", "ChatRequest", "Completion", "get_llm", "make_backend",
    "preflight",
]  # fmt: skip


def make_backend(spec: ModelSpec, state_dir: Path | None = None) -> Backend:
    """The backend ``spec.backend`` names, built from the spec (``state_dir``: where the
    Batch API backend keeps its batch records; default ``$MOLOCH_CACHE/batches``)."""
    if spec.backend == "fake":
        from .fake import FakeBackend

        return FakeBackend(model=spec.model)
    if spec.backend == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(spec)
    if spec.backend == "openai-batch":
        from ..paths import cache_dir
        from .openai_batch import OpenAIBatchBackend

        return OpenAIBatchBackend(spec, state_dir or cache_dir() / "batches")
    if spec.backend == "transformers":
        from .hf import warm_backend

        return warm_backend(spec)
    if spec.backend == "vllm":
        try:
            from .vllm_backend import VLLMBackend
        except ImportError as err:
            raise ModelError(
                f"backend 'vllm' for {spec.model!r} needs vLLM ({err}): install the gpu extra "
                f"(pip install -e '.[gpu]') on a CUDA machine, use vLLM's CPU environment "
                f"(nox -s vllm builds .nox/vllm), or choose another backend"
            ) from err
        return VLLMBackend(spec)
    raise ModelError(f"unknown backend {spec.backend!r} for {spec.model!r}")


def preflight(spec: ModelSpec) -> None:
    """Check, before any stage starts, that ``spec``'s model can answer: a local model's
    weights can be found, a server is reachable and takes its key. Raises ModelError."""
    backend = make_backend(spec)
    check = getattr(backend, "check", None)
    if check is not None:
        check()


def get_llm(
    spec: ModelSpec,
    *,
    cache: CallCache | str | Path | bool | None = None,
    mode: CallMode | None = None,
    role: str = "llm",
    backend: Backend | None = None,
) -> LLM:
    """A cached client for one role.

    ``cache``: None or True for the shared cache (``$MOLOCH_CACHE/calls.sqlite``),
    a path or a CallCache for another file, False for none. ``mode``: ``live``
    or ``replay``; None reads ``$MOLOCH_LLM_MODE`` (default live). ``backend``
    replaces the one the spec names (tests pass a scripted FakeBackend).
    """
    if cache is None or cache is True:
        cache = CallCache()
    elif cache is False:
        cache = None
    elif not isinstance(cache, CallCache):
        cache = CallCache(cache)
    # The Batch API's records go beside the run's call cache (its run folder).
    state_dir = cache.path.parent / "batches" if cache is not None else None
    backend = backend or make_backend(spec, state_dir)
    # A remote server bounds requests in flight by max_concurrency, so a batch
    # must be at least that large to use it; local backends batch on the device.
    batch = spec.batch_size
    if spec.backend == "openai":
        batch = max(batch, spec.max_concurrency)
    return LLM(backend, cache=cache, mode=mode, role=role, batch_size=batch)
