"""Generation with vLLM's offline engine (the paper profile's players; CUDA, or its CPU build).

``VLLMBackend(spec)`` starts one ``vllm.LLM`` engine for ``spec.model`` on first
use (vLLM is imported only then; this module imports without it). Each request
is chat-templated with the model's tokenizer (``enable_thinking`` passed on),
sent as token ids, and sampled with its own seed (:func:`moloch.seeds.sampling_seed`),
so vLLM's per-request generator makes it independent of the batch. Players'
LoRA adapters are served per request: each adapter folder gets a stable
integer id (from its resolved path) in a :class:`LoraRegistry`.

The pure helpers (:func:`sampling_kwargs`, :class:`LoraRegistry`) need no vLLM
and are unit-tested everywhere; the engine itself where vLLM is installed: its CPU
build in ``nox -s vllm`` (tests/test_vllm_engine.py), its CUDA build on a GPU.
The engine's memory and parallelism come from the profile (``engine:``,
:class:`moloch.config.VLLMEngine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..config import ModelSpec, VLLMEngine
from ..errors import ModelError
from ..hashing import object_sha256
from ..seeds import sampling_seed
from .adapters import adapter_name
from .base import ChatRequest, Completion, refuse_answer_format
from .embedded import check_source, resolve_model, weights_identity
from .sampling import model_defaults, resolve

MAX_LORA_RANK = 16  # the study's LoRA rank (docs/protocol.md §5)
INSTALL_HINT = "pip install '.[gpu]' (vLLM, on a Linux machine with a CUDA GPU)"


def sampling_kwargs(request: ChatRequest, defaults: dict, min_tokens: int = 0) -> dict:
    """The ``vllm.SamplingParams`` arguments of one request (temperature 0: greedy).

    ``defaults``: the model's top_k/top_p (``moloch.llm.sampling``), for what the request
    leaves unset; given explicitly, since vLLM's own default would leave top_k off.
    """
    top_k, top_p = resolve(request, defaults)
    return {
        "n": 1,
        "temperature": request.temperature,
        "top_p": top_p,
        "top_k": top_k or -1,  # vLLM: -1 is no cut
        "max_tokens": request.max_tokens,
        "min_tokens": min_tokens,
        "seed": sampling_seed(request.seed, request.sample_index, request.messages),
    }


class LoraRegistry:
    """Adapter folder -> (name, integer id) for ``LoRARequest``; same folder, same id.

    Ids come from the folder's resolved path, so they are the same in every
    process; a clash between two folders (1 in ~10^9) is an error, not a mix-up.
    """

    def __init__(self):
        self._by_id: dict[int, str] = {}

    def lookup(self, path: str | Path) -> tuple[str, int, str]:
        """(name, int id >= 1, resolved path) of an adapter folder."""
        folder = Path(path).expanduser().resolve()
        if not (folder / "adapter_config.json").is_file():
            raise ModelError(
                f"LoRA adapter {folder} has no adapter_config.json: train it first or fix the path"
            )
        lora_id = int(object_sha256(str(folder))[:8], 16) % (2**31 - 1) + 1
        known = self._by_id.setdefault(lora_id, str(folder))
        if known != str(folder):
            raise ModelError(f"LoRA adapters {known} and {folder} got the same id: rename one")
        return adapter_name(folder), lora_id, str(folder)


class VLLMBackend:
    """Backend over a vLLM offline engine; see the module docstring."""

    name = "vllm"

    def __init__(self, spec: ModelSpec, **engine_kwargs):
        self.spec = spec
        self.engine_kwargs = engine_kwargs  # extra vllm.LLM arguments, over spec.engine
        self.loras = LoraRegistry()
        self._engine = None
        self.sampling_defaults: dict | None = None  # the model's top_k/top_p, once started

    def check(self) -> None:
        """Preflight: vLLM is importable and the weights can be found (nothing is started)."""
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ModelError(
                f"backend 'vllm' for {self.spec.model!r} needs vLLM, which is not installed: "
                f"{INSTALL_HINT}"
            )
        check_source(self.spec.model, self.spec.revision)

    def identity(self) -> dict:
        weights = weights_identity(self.name, self.spec.model, self.spec.revision)
        return {**weights, "dtype": self.engine_kwargs.get("dtype", self.spec.dtype)}

    def engine(self):
        """The vllm.LLM engine, started on first use."""
        if self._engine is not None:
            return self._engine
        try:
            import vllm
        except ImportError as err:
            raise ModelError(
                f"backend 'vllm' for {self.spec.model!r} needs vLLM, which is not importable "
                f"({err}); install it with: {INSTALL_HINT}, or choose the transformers backend"
            ) from err
        source = resolve_model(self.spec.model)
        settings = self.spec.engine or VLLMEngine()
        kwargs = {
            "model": str(source),
            "revision": None if isinstance(source, Path) else self.spec.revision,
            "enable_lora": True,
            "max_lora_rank": MAX_LORA_RANK,
            "dtype": self.spec.dtype,
            **settings.model_dump(),
            **self.engine_kwargs,
        }
        try:
            self.sampling_defaults = model_defaults(source, kwargs["revision"])
            self._engine = vllm.LLM(**kwargs)
        except Exception as err:  # vLLM raises many types; all mean "cannot serve this model"
            raise ModelError(
                f"vLLM could not start {self.spec.model!r} ({source}): {err}. Check the model "
                f"id, that a CUDA GPU is visible, and the GPU memory settings."
            ) from err
        return self._engine

    def close(self) -> None:
        """Stop the engine and the processes it spawned (before the interpreter exits)."""
        if self._engine is not None:
            core = getattr(self._engine.llm_engine, "engine_core", None)
            if core is not None:
                core.shutdown()
            self._engine = None

    def _prompt(self, tokenizer, request: ChatRequest) -> tuple[str, list[int]]:
        """The chat-templated prompt text and its token ids."""
        extra = {}
        if request.enable_thinking is not None:
            extra["enable_thinking"] = request.enable_thinking
        text = tokenizer.apply_chat_template(
            request.as_openai_messages(), tokenize=False, add_generation_prompt=True, **extra
        )
        # The template holds the special tokens; v1 let the tokenizer add its own too.
        return text, tokenizer(text, add_special_tokens=request.add_special_tokens).input_ids

    def _lora(self, lora_request_cls, path: str):
        name, lora_id, folder = self.loras.lookup(path)
        return lora_request_cls(lora_name=name, lora_int_id=lora_id, lora_path=folder)

    def generate(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        return self.generate_batch(requests)

    def generate_batch(
        self, requests: Sequence[ChatRequest], min_new_tokens: int | None = None
    ) -> list[Completion]:
        """Answer every request in order; ``min_new_tokens`` forbids stopping earlier."""
        refuse_answer_format(self.name, requests)
        engine = self.engine()  # first: it says what to install when vLLM is missing
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        if any(r.max_tokens is None for r in requests):
            raise ModelError("the vllm backend needs max_tokens on every request")
        tokenizer = engine.get_tokenizer()
        rendered = [self._prompt(tokenizer, r) for r in requests]
        prompts = [{"prompt_token_ids": ids} for _, ids in rendered]
        params = [
            SamplingParams(**sampling_kwargs(r, self.sampling_defaults, min_new_tokens or 0))
            for r in requests
        ]
        loras = [self._lora(LoRARequest, r.adapter) if r.adapter else None for r in requests]
        outputs = engine.generate(prompts, params, lora_request=loras, use_tqdm=False)
        if len(outputs) != len(requests):
            raise ModelError(f"vLLM answered {len(outputs)} of {len(requests)} requests")
        completions = []
        for out, lora, (text, _) in zip(outputs, loras, rendered, strict=True):
            best = out.outputs[0]
            completions.append(
                Completion(
                    text=best.text,
                    prompt_tokens=len(out.prompt_token_ids),
                    completion_tokens=len(best.token_ids),
                    finish_reason=best.finish_reason or "stop",
                    meta={"adapter": lora.lora_name if lora else None, "prompt": text},
                )
            )
        return completions
