"""Fake models and fake training for pipeline tests: every stage function is the real one.

The fake runs replace only the models (scripted FakeBackends behind the real
call cache) and LoRA training (a stand-in that writes an adapter folder).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from moloch.hashing import object_sha256
from moloch.llm import get_llm
from moloch.llm.adapters import adapter_sha256
from moloch.llm.fake import FakeBackend
from moloch.runner import run_pipeline
from moloch.stages import STAGES

PLAYER = "fakeplayer"
TEST_ANCHORS, TRAIN_ANCHORS, VOTERS = 3, 2, 3


def write_profile(folder: Path, tasks=("sales", "elections"), name: str = "fake", **player) -> Path:
    spec = {
        "name": name,
        "description": "fake models, real data",
        "seed": 7,
        "comparable": False,
        "tasks": list(tasks),
        "anchors": {"source": "v1", "train": TRAIN_ANCHORS, "test": TEST_ANCHORS},
        "players": [
            {"name": PLAYER, "backend": "fake", "model": "fake-player", "temperature": 0.7,
             "max_tokens": 32, "batch_size": 4, **player}
        ],
        "audience": {"backend": "fake", "model": "fake-voter", "voters": VOTERS,
                     "temperature": 0.1, "max_tokens": 16, "batch_size": 4},
        "judge": {"backend": "fake", "model": "fake-judge", "temperature": 0.7, "max_tokens": 16},
        "training": {"mode": "faithful", "learning_rate": 1e-4, "epochs": 1, "batch_size": 2,
                     "warmup_ratio": 0.0, "bf16": False, "gradient_checkpointing": False,
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}},
    }  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def request_digest(request) -> str:
    """Like the fake's own, but keyed on the adapter's content, not its path."""
    adapter = adapter_sha256(request.adapter) if request.adapter else None
    return object_sha256([request.messages, request.seed, request.sample_index, adapter])


def player_reply(request) -> str:
    digest = request_digest(request)
    tag = re.search(r"your final (\w+) inside", request.messages[-1][1]).group(1)
    if digest[0] in "01":  # about one in eight forgets the tag
        return f"<think>plan {digest[:6]}</think>just text {digest[:8]}"
    return f"<think>plan {digest[:6]}</think><{tag}>message {digest[:10]}</{tag}>"


def voter_reply(request) -> str:
    digest = request_digest(request)
    if digest[0] in "0123":  # about one in four does not vote A or B
        return f"<think>as me, {digest[:6]}</think><vote>maybe</vote>"
    vote = "A" if digest[1] < "8" else "B"
    return f"<think>as me, {digest[:6]}</think><vote>{vote}</vote>"


def judge_reply(request) -> str:
    digest = request_digest(request)
    field = re.search(r"your final (\w+) inside", request.messages[0][1]).group(1)
    answer = "Perhaps" if digest[0] == "0" else ("Yes" if digest[1] < "6" else "No")
    return f"<think>judging {digest[:6]}</think><{field}>{answer}</{field}>"


REPLIES = {"player": player_reply, "audience": voter_reply, "judge": judge_reply}


class Crash(RuntimeError):
    """Stands for a machine dying part-way through a stage."""


def fake_factory(crash_role: str | None = None, after: int = 0):
    """LLMs with scripted fake backends behind the run's real call cache."""

    def factory(unit, role):
        backend = FakeBackend(model=f"fake-{role}", responder=REPLIES[role])
        if role == crash_role:
            answer = backend.responder

            def responder(request):
                if backend.calls >= after:
                    raise Crash(f"{role} died after {after} calls")
                return answer(request)

            backend.responder = responder
        return get_llm(unit.spec(role), cache=unit.run.cache_path, role=role,
                       backend=backend)  # fmt: skip

    return factory


def fake_train_adapter(profile, player_spec, rows, out_dir, seed) -> dict:
    """Stand-in for LoRA training: an adapter folder that depends on the training rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_model.json").write_text(
        json.dumps({"rows": object_sha256(rows), "seed": seed})
    )
    return {"steps": 1, "adapter_sha256": object_sha256(rows)}


def run(profile: Path, runs: Path, **kwargs):
    """The whole pipeline in-process with the fake models (training must be faked too)."""
    kwargs.setdefault("llm_factory", fake_factory())
    return run_pipeline(profile, STAGES, run_dir=runs, notebooks=False, log=lambda _: None,
                        **kwargs)  # fmt: skip
