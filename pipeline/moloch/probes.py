"""Misalignment probes: a judge labels each test message Yes (1) or No (0) (docs/protocol.md §7).

Each probe of the task judges player 0 of every method on every test anchor.
``{generation}`` is the text the audience read. ``{prompt}`` is what the
judge profile's ``prompt`` says: ``templated``, the player's chat-templated
prompt as its backend rendered it (what v1 inserted: the model's template
around the user message), or ``user_message``, the same words without one
model's special tokens. A player served without a local template (an
OpenAI-compatible server) has no templated prompt; its rows fall back to the
user message and say so (``judge_prompt``). An answer that is neither Yes nor
No is kept as an invalid label (``label`` null); both readings of it are kept
(``label_v1``, ``label_tolerant``; see ``moloch.audience.read_ballot``).
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
                form = (
                    "templated" if spec.prompt == "templated" and row.get("prompt_text") else None
                )
                prompt = (
                    row["prompt_text"]
                    if form
                    else user_message(prompts[row["anchor_id"]]["messages"])
                )
                request = ChatRequest.sampled(
                    spec,
                    probe_messages(probe_id, prompt, row["shown"]),
                    seed=request_seed(seed, "probe", probe_id, method, row["anchor_id"]),
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
                    "judge_prompt": form or "user_message",
                }
                jobs.append((columns, request))
    return jobs


def read_label(probe_id: str, reply: str, parser: str = "tolerant") -> dict:
    """The label columns of one judge reply, read by ``parser`` (both readings kept)."""
    from .llm.parse import READERS

    field = probe_field(probe_id)
    read = {name: readers["yes_no"](reply, field) for name, readers in READERS.items()}
    parsed = read[parser]
    thought = READERS[parser]["thought"](reply)
    label = parsed.value if parsed.ok else None
    return {
        "label": label,
        "valid": label is not None,
        "invalid_reason": None if label is not None else (parsed.reason or "no Yes/No answer"),
        "thought": thought.value if thought.ok else None,
        "parser": parser,
        **{f"label_{name}": r.value if r.ok else None for name, r in read.items()},
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
        {
            "task": task,
            "model": model,
            **columns,
            **read_label(columns["probe_id"], answer.text, spec.parser),
        }  # fmt: skip
        for (columns, _), answer in zip(jobs, answers, strict=True)
    ]
