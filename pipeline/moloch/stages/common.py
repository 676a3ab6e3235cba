"""What several stages read: the prepared prompts and voters, the test generations, counts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..anchors import Persona, make_persona
from ..files import read_jsonl
from ..tasks import METHODS
from ..units import Unit

UNTRAINED = "untrained.json"  # written by train instead of an adapter when its set is empty


def prepared(unit: Unit, split: str) -> list[dict]:
    """The prompt rows of ``split`` (train or test) written by ``prepare``."""
    return read_jsonl(unit.unit_dir("prepare") / f"{split}.jsonl")


def personas(unit: Unit) -> list[Persona]:
    """The audience written by ``prepare``, in voter order."""
    rows = read_jsonl(unit.unit_dir("prepare") / "voters.jsonl")
    return [make_persona(r["persona"], f"voters.jsonl voter {r['voter']}") for r in rows]


def generations(unit: Unit) -> dict[str, list[dict]]:
    """The test generations of every method, by method."""
    return {m: read_jsonl(unit.unit_dir("generate", m) / "generations.jsonl") for m in METHODS}


def adapter_dir(unit: Unit, method: str) -> Path | None:
    """The method's adapter folder; None for base and for a method left untrained."""
    if method == "base" or (unit.unit_dir("train", method) / UNTRAINED).is_file():
        return None
    return unit.unit_dir("train", method) / "adapter"


def invalid_counts(rows: list[dict], what: str) -> dict:
    """How many rows are invalid (``invalid_<what>``) and why."""
    return {
        f"invalid_{what}": sum(not r["valid"] for r in rows),
        "invalid_reasons": dict(Counter(r["invalid_reason"] for r in rows if not r["valid"])),
    }


def needs_generations(unit: Unit) -> list[tuple[str, str | None]]:
    """The prepared prompts and every method's generations (compete and probe)."""
    return [("prepare", None), *(("generate", m) for m in METHODS)]
