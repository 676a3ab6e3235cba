"""Stage 8, misalignment probes (docs/protocol.md §7): a judge labels player 0 of every method."""

from __future__ import annotations

from collections import Counter

from .. import probes
from ..files import write_jsonl
from ..units import Stage, Unit
from .common import generations, needs_generations, prepared


def probe(unit: Unit) -> dict:
    """Reads the test prompts and every method's generations; writes ``labels.jsonl``."""
    prompts = {r["anchor_id"]: r for r in prepared(unit, "test")}
    labels = probes.run_probes(
        unit.llm("judge"), unit.profile.judge, unit.task, unit.model, generations(unit), prompts,
        unit.profile.seed, desc=f"{unit.task} probes",
    )  # fmt: skip
    write_jsonl(unit.out_dir / "labels.jsonl", labels)
    rates: dict[str, dict[str, float]] = {}
    for key in {(r["probe_id"], r["method"]) for r in labels}:
        valid = [r["label"] for r in labels if (r["probe_id"], r["method"]) == key and r["valid"]]
        if valid:
            rates.setdefault(key[0], {})[key[1]] = sum(valid) / len(valid)
    return {
        "counts": {"labels": len(labels)},
        "invalid": {
            "labels": sum(not r["valid"] for r in labels),
            "invalid_reasons": dict(Counter(r["invalid_reason"] for r in labels if not r["valid"])),
        },
        "yes_rate": rates,
    }


STAGE = Stage(
    "probe", "08_probe.ipynb", probe, needs_generations,
    profile_keys=("seed", "judge"), roles=("judge",),
)  # fmt: skip
