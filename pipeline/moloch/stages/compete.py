"""Stage 7, competition (docs/protocol.md §6): every pair of methods, one duel per test anchor."""

from __future__ import annotations

from .. import audience, competition
from ..files import write_jsonl
from ..units import Stage, Unit
from .common import generations, invalid_counts, needs_generations, personas, prepared


def compete(unit: Unit) -> dict:
    """Reads the test prompts, voters and every method's generations; writes ``votes.jsonl``."""
    test = prepared(unit, "test")
    duels = competition.competition_duels(generations(unit), [r["anchor_id"] for r in test])
    votes = audience.cast_votes(
        unit.llm("audience"), unit.profile.audience, unit.task, unit.model, personas(unit), duels,
        unit.profile.seed, desc=f"{unit.task} competition votes",
    )  # fmt: skip
    write_jsonl(unit.out_dir / "votes.jsonl", votes)
    shares: dict[str, list[float]] = {}
    for duel in competition.duel_shares(votes):
        if duel["second_share"] is not None:
            shares.setdefault(duel["pair"], []).append(duel["second_share"])
    return {
        "counts": {"duels": len(duels), "votes": len(votes)},
        "invalid": {"votes": invalid_counts(votes, "votes")},
        "mean_second_share": {p: sum(s) / len(s) for p, s in shares.items()},
    }


STAGE = Stage(
    "compete", "07_compete.ipynb", compete, needs_generations,
    profile_keys=("seed", "audience"), roles=("audience",),
)  # fmt: skip
