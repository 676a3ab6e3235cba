"""Run profiles: every knob of a run, as plain data validated on load.

A profile is a YAML file (``pipeline/moloch/profiles/<name>.yaml`` or any
path). Every stage reads only its profile, so a run is fully described by it.
Unknown keys and wrong types are errors that name the key and the file.

    >>> from moloch.config import load_profile
    >>> profile = load_profile("smoke")
    >>> profile.anchors.test
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ProfileError
from .paths import PROFILES_DIR
from .tasks import TASKS

DEFAULT_PROFILE = "smoke"

Backend = Literal["transformers", "vllm", "openai", "openai-batch", "fake"]
REMOTE_BACKENDS = ("openai", "openai-batch")  # an API's models: no local budget needed
# How closely a run follows the authors' v1 code (see TrainingSpec.mode).
Fidelity = Literal["faithful", "corrected"]
FIDELITY: tuple[str, ...] = ("faithful", "corrected")
# Names that become folder names: letters, digits, '.', '_' and '-', starting with one of the
# first two (no '/' or '..': a name never leaves its run folder).
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$"
# How answers are read: "v1" exactly as the authors' code read them, "tolerant" the
# package's parser (moloch.llm.parse). Both are always applied; the profile picks the one used.
Parser = Literal["v1", "tolerant"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VLLMEngine(Strict):
    """Settings of a vLLM engine (backend ``vllm``) that decide where it fits, not what it says:
    they are not part of the model's identity or the call-cache key."""

    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0,
        description="share of the GPU's memory the engine takes (CPU build: of the RAM; 0.9 "
        "fails to start on a 24 GiB machine, 0.1-0.25 works)",
    )  # fmt: skip
    max_model_len: int | None = Field(
        default=None, gt=0, description="longest prompt + reply in tokens; None: the model's"
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one engine spans")
    max_num_seqs: int = Field(default=256, ge=1, description="sequences decoded at once")
    max_loras: int = Field(default=4, ge=1, description="LoRA adapters held at once")
    enable_chunked_prefill: bool = Field(
        default=True,
        description="split long prompts across steps; false on vLLM's CPU build, whose "
        "0.32.0 crashes ('CPU Generator does not use offset') when a seeded request is split",
    )
    max_num_batched_tokens: int | None = Field(
        default=None, gt=0, description="tokens per engine step; None: vLLM's default"
    )

    @model_validator(mode="after")
    def _whole_prompts_fit(self):
        if not self.enable_chunked_prefill and (
            self.max_num_batched_tokens is None
            or self.max_model_len is None
            or self.max_num_batched_tokens < self.max_model_len
        ):
            raise ValueError(
                "enable_chunked_prefill: false needs max_model_len and max_num_batched_tokens "
                "at least as large (a whole prompt must fit in one step)"
            )
        return self


class ModelSpec(Strict):
    """Which model answers a role, where, and how it samples."""

    backend: Backend
    model: str = Field(description="HF id, 'embedded' (SmolLM2 from PyPI) or an API model name")
    revision: str | None = Field(
        default=None, description="a commit of the model's repository, or a dated API snapshot"
    )
    temperature: float = Field(ge=0.0, le=2.0)
    top_p: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="None: the model's own generation default (local backends), none sent (openai)",
    )
    top_k: int | None = Field(default=None, gt=0, description="None: as top_p")
    max_tokens: int | None = Field(
        gt=0, description="reply budget; None (no limit, as v1's audience and judge): openai only"
    )
    batch_size: int = Field(default=8, gt=0)
    max_concurrency: int = Field(default=8, gt=0, description="openai backend: requests in flight")
    timeout_s: float = Field(
        default=60.0, gt=0, description="openai backend: a request's deadline (then retried)"
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, description="openai backend: how long a connection may take"
    )
    retry_base_s: float = Field(
        default=1.0, gt=0, description="openai backend: the first back-off before a retry"
    )
    batch_poll_s: float = Field(
        default=30.0, gt=0, description="openai-batch backend: seconds between two polls"
    )
    batch_max_requests: int = Field(
        default=50_000, gt=0, le=50_000, description="openai-batch backend: lines per batch"
    )
    served_adapters: Literal["refuse", "by_name"] = Field(
        default="refuse",
        description="openai backend, a request with a LoRA adapter: refuse it (an endpoint "
        "would silently answer with its base model), or send it to the served LoRA module "
        "named moloch.llm.adapters.adapter_name(folder) (vllm serve --lora-modules NAME=PATH)",
    )
    base_url_env: str = "OPENAI_BASE_URL"
    api_key_env: str = "OPENAI_API_KEY"
    enable_thinking: bool | None = Field(
        default=None, description="passed to the chat template (Qwen3's thinking mode)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="local backends' arithmetic: auto = float32 on CPU, bfloat16 on CUDA "
        "(vLLM: the model's own); it changes answers, so it is part of the model's identity",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="transformers backend: auto = CUDA when there is one"
    )
    add_special_tokens: bool = Field(
        default=False,
        description="tokenise the chat-templated prompt with the tokenizer's special tokens too, "
        "as v1 did (Llama-3.1's prompts then begin with two BOS tokens)",
    )
    force_answer: bool = Field(
        default=False,
        description="voters and judges: force the reply's <think> and answer tags by "
        "constrained decoding (transformers backend, or vllm serve's structured outputs "
        "through the openai backend; for tiny models, not the paper)",
    )
    engine: VLLMEngine | None = Field(
        default=None, description="vllm backend: the engine's settings (None: the defaults)"
    )

    @model_validator(mode="after")
    def _local_needs_a_budget(self):
        if self.max_tokens is None and self.backend not in REMOTE_BACKENDS:
            raise ValueError(f"max_tokens: the {self.backend} backend needs a number")
        if self.engine is not None and self.backend != "vllm":
            raise ValueError(f"engine: settings of a vLLM engine, not of backend {self.backend}")
        return self


class PlayerSpec(ModelSpec):
    """A player model: the agent that competes and is fine-tuned."""

    name: str = Field(pattern=SAFE_NAME, description="short id used in paths, e.g. 'Qwen3-8B'")
    samples: int = Field(default=2, ge=2, description="players per anchor (docs/protocol.md §2)")
    common_random_numbers: bool = Field(
        default=False,
        description="give the base, rft and tfb players the same random stream per anchor and "
        "sample (a variance-reduction design v1 did not use: it couples the two texts of a duel)",
    )


class AnchorSpec(Strict):
    source: Literal["v1", "raw"] = "v1"
    train: int = Field(gt=0, le=1024)
    test: int = Field(gt=0, le=1024)


class AudienceSpec(ModelSpec):
    voters: int = Field(gt=0, le=20, description="first k personas of split1.json")
    parser: Parser = Field(default="tolerant", description="how votes are read (see Parser)")


class JudgeSpec(ModelSpec):
    parser: Parser = Field(default="tolerant", description="how labels are read (see Parser)")
    prompt: Literal["templated", "user_message"] = Field(
        default="user_message",
        description="what fills a probe's {prompt}: the player's chat-templated prompt as v1 "
        "inserted it, or the user message alone (the same words without one model's tokens)",
    )


class LoraSpec(Strict):
    r: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: tuple[str, ...]


class TrainingSpec(Strict):
    mode: Fidelity = Field(
        description="faithful: the original x3 replication and tie quirk; corrected: ties skipped"
    )
    lora: LoraSpec
    learning_rate: float = Field(gt=0.0)
    epochs: float = Field(gt=0.0)
    batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    scheduler: str = "cosine_with_min_lr"
    min_lr_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    bf16: bool
    gradient_checkpointing: bool
    max_steps: int = Field(default=-1, ge=-1, description="-1: train for `epochs`")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, steps: int) -> int:
        if steps == 0:
            raise ValueError("0 steps trains nothing: give a positive number, or -1 for epochs")
        return steps

    max_length: int = Field(default=4096, gt=0)
    keep_overlength: bool = Field(
        default=False,
        description="keep rows whose completion lies wholly past max_length (no loss, but they "
        "fill batch slots and count as steps), as the TRL v1 used did; trl 1.x drops them",
    )
    attention: Literal["eager", "sdpa"] = Field(
        default="sdpa", description="the attention kernel used in training (v1: eager)"
    )


class StatsSpec(Strict):
    resamples: int = Field(default=10_000, gt=0)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)


class Profile(Strict):
    name: str = Field(pattern=SAFE_NAME, description="the run folder's name: data/runs/<name>")
    description: str
    seed: int = Field(description="master seed: every generator is derived from it")
    tasks: tuple[str, ...]
    anchors: AnchorSpec
    players: tuple[PlayerSpec, ...]
    audience: AudienceSpec
    judge: JudgeSpec
    training: TrainingSpec
    stats: StatsSpec = StatsSpec()
    comparable: bool = Field(
        description="whether this profile's numbers may be compared with the published ones"
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"a task is listed twice: {list(tasks)}")
        return tasks

    @field_validator("players")
    @classmethod
    def _distinct_players(cls, players: tuple[PlayerSpec, ...]) -> tuple[PlayerSpec, ...]:
        names = [p.name for p in players]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"players need distinct names (and at least one): {names}")
        return players

    def player(self, name: str) -> PlayerSpec:
        for p in self.players:
            if p.name == name:
                return p
        raise ProfileError(
            f"profile {self.name!r} has no player {name!r}; it has {[p.name for p in self.players]}"
        )

    def digest(self) -> str:
        """Stable hash of every setting, for manifests and cache keys."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        return path
    path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(
            f"unknown profile {str(name_or_path)!r}: choose one of {available_profiles()} "
            f"or give the path of a .yaml file"
        )
    return path


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> Profile:
    """Read and validate a profile by name (``smoke``, ``paper``) or path."""
    path = profile_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ProfileError(f"profile {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ProfileError(f"profile {path} must be a mapping of keys to values")
    try:
        return Profile.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(part) for part in e["loc"]) or "(top level)"
            what = {
                "extra_forbidden": "unknown key",
                "string_pattern_mismatch": "use letters, digits, '.', '_' and '-' only (it "
                "names a folder)",
            }.get(e["type"], e["msg"])
            problems.append(f"  key '{key}': {what}")
        raise ProfileError(
            f"profile {path} is invalid:\n"
            + "\n".join(problems)
            + "\nFix these keys and run again."
        ) from None
