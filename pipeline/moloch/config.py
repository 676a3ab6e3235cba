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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ProfileError
from .paths import PROFILES_DIR
from .tasks import TASKS

DEFAULT_PROFILE = "smoke"

Backend = Literal["transformers", "vllm", "openai", "fake"]
# How closely a run follows the authors' v1 code (see TrainingSpec.mode).
Fidelity = Literal["faithful", "corrected"]
FIDELITY: tuple[str, ...] = ("faithful", "corrected")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    """Which model answers a role, where, and how it samples."""

    backend: Backend
    model: str = Field(description="HF id, 'embedded' (SmolLM2 from PyPI) or an API model name")
    revision: str | None = None
    temperature: float = Field(ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(gt=0)
    batch_size: int = Field(default=8, gt=0)
    max_concurrency: int = Field(default=8, gt=0, description="openai backend: requests in flight")
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
    force_answer: bool = Field(
        default=False,
        description="voters and judges: force the reply's <think> and answer tags by "
        "constrained decoding (transformers backend; for tiny models, not the paper)",
    )


class PlayerSpec(ModelSpec):
    """A player model: the agent that competes and is fine-tuned."""

    name: str = Field(description="short id used in paths, e.g. 'Qwen3-8B'")
    samples: int = Field(default=2, ge=2, description="players per anchor (docs/protocol.md §2)")


class AnchorSpec(Strict):
    source: Literal["v1", "raw"] = "v1"
    train: int = Field(gt=0, le=1024)
    test: int = Field(gt=0, le=1024)


class AudienceSpec(ModelSpec):
    voters: int = Field(gt=0, le=20, description="first k personas of split1.json")


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
    max_steps: int = Field(default=-1, description="-1: train for `epochs`")
    max_length: int = Field(default=4096, gt=0)


class StatsSpec(Strict):
    resamples: int = Field(default=10_000, gt=0)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)


class Profile(Strict):
    name: str
    description: str
    seed: int = Field(description="master seed: every generator is derived from it")
    tasks: tuple[str, ...]
    anchors: AnchorSpec
    players: tuple[PlayerSpec, ...]
    audience: AudienceSpec
    judge: ModelSpec
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
        return tasks

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
            what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"  key '{key}': {what}")
        raise ProfileError(
            f"profile {path} is invalid:\n"
            + "\n".join(problems)
            + "\nFix these keys and run again."
        ) from None
