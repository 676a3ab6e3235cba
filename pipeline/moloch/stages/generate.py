"""Stage 6, test generation (docs/protocol.md §6): every method's player, every test anchor."""

from __future__ import annotations

from .. import players
from ..files import write_jsonl
from ..tasks import METHODS
from ..units import Stage, Unit
from .common import adapter_dir, invalid_counts, prepared


def generate(unit: Unit) -> dict:
    """Reads the test prompts (and the method's adapter); writes ``generations.jsonl``."""
    test = prepared(unit, "test")
    adapter = adapter_dir(unit, unit.method)
    rows = players.generate(
        unit.llm("player"), unit.task, unit.model, unit.method, unit.player, test,
        unit.profile.seed, adapter=str(adapter) if adapter else None,
        desc=f"{unit.task} {unit.method} players",
    )  # fmt: skip
    write_jsonl(unit.out_dir / "generations.jsonl", rows)
    return {
        "counts": {"anchors": len(test), "generations": len(rows)},
        "invalid": {"messages": invalid_counts(rows, "messages")},
        "adapter": str(adapter) if adapter else None,
        "untrained": unit.method != "base" and adapter is None,
    }


def needs(unit: Unit) -> list[tuple[str, str | None]]:
    return [("prepare", None)] + ([("train", unit.method)] if unit.method != "base" else [])


STAGE = Stage(
    "generate", "06_generate.ipynb", generate, needs,
    profile_keys=("seed", "players"), methods=METHODS, roles=("player",),
)  # fmt: skip
