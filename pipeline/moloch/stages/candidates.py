"""Stage 2, training candidates (docs/protocol.md §4): the base player writes two per train anchor.

The player half of a training episode, a stage of its own so that a job that
holds a GPU for the player never waits on the audience's API calls (stage 3).
"""

from __future__ import annotations

from .. import players
from ..files import write_jsonl
from ..units import Stage, Unit
from .common import invalid_counts, prepared


def candidates(unit: Unit) -> dict:
    """Reads the train prompts; writes ``candidates.jsonl`` (two samples per train anchor)."""
    train = prepared(unit, "train")
    rows = players.generate(
        unit.llm("player"), unit.task, unit.model, "base", unit.player, train, unit.profile.seed,
        desc=f"{unit.task} episode players",
    )  # fmt: skip
    write_jsonl(unit.out_dir / "candidates.jsonl", rows)
    return {
        "counts": {"anchors": len(train), "candidates": len(rows)},
        "invalid": {"messages": invalid_counts(rows, "messages")},
    }


STAGE = Stage(
    "candidates", "02_candidates.ipynb", candidates, lambda unit: [("prepare", None)],
    profile_keys=("seed", "players"), roles=("player",),
)  # fmt: skip
