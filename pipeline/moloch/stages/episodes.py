"""Stage 3, training episodes (docs/protocol.md §4): every voter votes on the two candidates."""

from __future__ import annotations

from .. import audience, competition
from ..files import read_jsonl, write_jsonl
from ..units import Stage, Unit
from .common import invalid_counts, personas, prepared


def episodes(unit: Unit) -> dict:
    """Reads the train prompts, voters and candidates; writes ``votes.jsonl``."""
    train = prepared(unit, "train")
    candidates = read_jsonl(unit.unit_dir("candidates") / "candidates.jsonl")
    duels = competition.episode_duels(candidates, [r["anchor_id"] for r in train])
    votes = audience.cast_votes(
        unit.llm("audience"), unit.profile.audience, unit.task, unit.model, personas(unit), duels,
        unit.profile.seed, desc=f"{unit.task} episode votes",
    )  # fmt: skip
    write_jsonl(unit.out_dir / "votes.jsonl", votes)
    return {
        "counts": {"anchors": len(train), "duels": len(duels), "votes": len(votes)},
        "invalid": {"votes": invalid_counts(votes, "votes")},
    }


STAGE = Stage(
    "episodes", "03_episodes.ipynb", episodes,
    lambda unit: [("prepare", None), ("candidates", None)],
    profile_keys=("seed", "audience"), roles=("audience",),
)  # fmt: skip
