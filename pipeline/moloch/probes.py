"""Misalignment probes: a judge labels each test message Yes (1) or No (0) (docs/protocol.md §7).

Each probe of the task judges player 0 of every method on every test anchor.
``{prompt}`` is the player's full user message and ``{generation}`` the text
the audience read. v1 inserted the *chat-templated* prompt string (the
model's template around the same user message); we insert the user message
itself, which is the same words without one model's special tokens, so the
judge sees the same content whatever the player model is. An answer that is
neither Yes nor No is kept as an invalid label (``label`` null).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .llm.base import AnswerFormat, ChatRequest
from .prompts import probe_field, probe_messages
from .seeds import request_seed
from .tasks import PROBE_METRIC, get_task


def user_message(messages: Sequence[Sequence[str]]) -> str:
    """The player's user message (the ``{prompt}`` a probe shows the judge)."""
    return next(text for role, text in messages if role == "user")


def probe_jobs(
    spec,
    task: str,
    generations: Mapping[str, Sequence[Mapping]],
    prompts: Mapping[str, Mapping],
    seed: int,
) -> list[tuple[dict, ChatRequest]]:
    """(label columns, judge request) for every probe x method x anchor (player 0)."""
    jobs = []
    for probe_id in get_task(task).probes:
        for method, rows in generations.items():
            for row in rows:
                if row["sample_index"] != 0:
                    continue
                prompt = user_message(prompts[row["anchor_id"]]["messages"])
                request = ChatRequest(
                    messages=probe_messages(probe_id, prompt, row["shown"]),
                    temperature=spec.temperature,
                    top_p=spec.top_p,
                    max_tokens=spec.max_tokens,
                    seed=request_seed(seed, "probe", probe_id, method, row["anchor_id"]),
                    enable_thinking=spec.enable_thinking,
                    answer_format=AnswerFormat.tagged(probe_field(probe_id), ("Yes", "No"))
                    if spec.force_answer
                    else None,
                )
                columns = {
                    "method": method,
                    "probe_id": probe_id,
                    "metric": PROBE_METRIC[probe_id],
                    "anchor_id": row["anchor_id"],
                    "message_valid": row["valid"],
                }
                jobs.append((columns, request))
    return jobs


def as_label(value) -> int | None:
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return int(value.strip().lower() == "yes")
    return None


def read_label(probe_id: str, reply: str) -> dict:
    from .llm.parse import parse_thought, parse_yes_no

    parsed = parse_yes_no(reply, probe_field(probe_id))
    thought = parse_thought(reply)
    label = as_label(parsed.value) if parsed.ok else None
    return {
        "label": label,
        "valid": label is not None,
        "invalid_reason": None if label is not None else (parsed.reason or "no Yes/No answer"),
        "thought": thought.value if thought.ok else None,
        "reply": reply,
    }


def run_probes(
    llm,
    spec,
    task: str,
    model: str,
    generations: Mapping[str, Sequence[Mapping]],
    prompts: Mapping[str, Mapping],
    seed: int,
    desc: str | None = None,
) -> list[dict]:
    """Label rows (docs/protocol.md §10, probe labels), probe-major, then method, then anchor."""
    jobs = probe_jobs(spec, task, generations, prompts, seed)
    answers = llm.complete([request for _, request in jobs], desc=desc or f"{task} probes")
    return [
        {"task": task, "model": model, **columns, **read_label(columns["probe_id"], answer.text)}
        for (columns, _), answer in zip(jobs, answers, strict=True)
    ]
