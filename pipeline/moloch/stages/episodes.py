"""Stage 2, training episodes (docs/protocol.md §4): two base players per train anchor, voted on."""

from __future__ import annotations

from .. import audience, competition, players
from ..files import write_jsonl
from ..units import Stage, Unit
from .common import invalid_counts, personas, prepared


def episodes(unit: Unit) -> dict:
    """Reads the train prompts and voters; writes ``candidates.jsonl`` and ``votes.jsonl``."""
    train = prepared(unit, "train")
    candidates = players.generate(
        unit.llm("player"), unit.task, unit.model, "base", unit.player, train, unit.profile.seed,
        desc=f"{unit.task} episode players",
    )  # fmt: skip
    write_jsonl(unit.out_dir / "candidates.jsonl", candidates)
    duels = competition.episode_duels(candidates, [r["anchor_id"] for r in train])
    votes = audience.cast_votes(
        unit.llm("audience"), unit.profile.audience, unit.task, unit.model, personas(unit), duels,
        unit.profile.seed, desc=f"{unit.task} episode votes",
    )  # fmt: skip
    write_jsonl(unit.out_dir / "votes.jsonl", votes)
    return {
        "counts": {"anchors": len(train), "candidates": len(candidates), "votes": len(votes)},
        "invalid": {
            "messages": invalid_counts(candidates, "messages"),
            "votes": invalid_counts(votes, "votes"),
        },
    }


STAGE = Stage(
    "episodes", "02_episodes.ipynb", episodes, lambda unit: [("prepare", None)],
    profile_keys=("seed", "players", "audience"), roles=("player", "audience"),
)  # fmt: skip
