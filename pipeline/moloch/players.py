"""Players: the models that write the pitches, speeches and posts (docs/protocol.md §2, §6).

A player answers each anchor's prompt ``samples`` times (sample_index 0, 1,
...); the reply's message is extracted from its XML tag. A reply without the
tag is kept, marked invalid with the reason, and the audience and the judge
read its fallback text (the reply with any ``<think>`` block removed), so an
invalid message is counted, never silently dropped.

Every request's seed is derived from the profile seed and the request's own
key, so results do not depend on the order requests are made in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .llm.base import ChatRequest
from .seeds import request_seed
from .tasks import get_task

THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def player_requests(
    spec, method: str, prompt_rows: Sequence[dict], seed: int, adapter: str | None = None
) -> list[ChatRequest]:
    """One request per (anchor, sample), anchors in order, samples within each.

    Each method's players draw their own random stream, as in v1, where every
    method was sampled on its own; ``spec.common_random_numbers`` gives base, rft
    and tfb the same stream instead (their duels are then coupled).
    """
    key = () if spec.common_random_numbers else (method,)
    return [
        ChatRequest.sampled(
            spec,
            row["messages"],
            seed=request_seed(seed, "player", *key, row["anchor_id"], sample),
            sample_index=sample,
            adapter=adapter,
        )
        for row in prompt_rows
        for sample in range(spec.samples)
    ]


def fallback_text(reply: str) -> str:
    """What the audience reads when the reply has no message tag."""
    return THINK_BLOCK.sub("", reply).strip()


def extract_message(task: str, reply: str) -> dict:
    """The message of one reply: ``message`` (or None), ``shown``, ``valid``, reason."""
    from .llm.parse import parse_message

    parsed = parse_message(reply, get_task(task).message_tag)
    if parsed.ok:
        return {
            "message": parsed.value,
            "shown": parsed.value,
            "valid": True,
            "invalid_reason": None,
        }
    return {
        "message": None,
        "shown": fallback_text(reply),
        "valid": False,
        "invalid_reason": parsed.reason or "no message tag",
    }


def generate(
    llm,
    task: str,
    model: str,
    method: str,
    spec,
    prompt_rows: Sequence[dict],
    seed: int,
    adapter: str | None = None,
    desc: str | None = None,
) -> list[dict]:
    """Generation rows (one per anchor and sample) for one player."""
    requests = player_requests(spec, method, prompt_rows, seed, adapter)
    answers = llm.complete(requests, desc=desc or f"{task} {method} players")
    rows = []
    for request, answer in zip(requests, answers, strict=True):
        anchor_row = prompt_rows[len(rows) // spec.samples]
        rows.append(
            {
                "task": task,
                "model": model,
                "method": method,
                "anchor_id": anchor_row["anchor_id"],
                "sample_index": request.sample_index,
                "seed": request.seed,
                "text": answer.text,
                # the chat-templated prompt, where the backend says (a probe's {prompt} in v1)
                "prompt_text": answer.meta.get("prompt"),
                **extract_message(task, answer.text),
                "finish_reason": answer.finish_reason,
                "completion_tokens": answer.completion_tokens,
            }
        )
    return rows
