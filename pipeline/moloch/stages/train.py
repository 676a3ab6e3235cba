"""Stage 5, training (docs/protocol.md §5): one LoRA adapter per (task, model, trained method)."""

from __future__ import annotations

import shutil

from ..files import read_jsonl, write_json
from ..seeds import request_seed
from ..tasks import TRAINED
from ..units import Stage, Unit
from .common import UNTRAINED


def train(unit: Unit) -> dict:
    """Reads ``<method>.jsonl`` of trainsets; writes ``adapter/`` (or ``untrained.json``)."""
    from ..training import train_adapter

    rows = read_jsonl(unit.unit_dir("trainsets") / f"{unit.method}.jsonl")
    if not rows:
        # No duel had a winner (a tiny audience model may never cast a valid vote). There is
        # nothing to learn: the method's player stays the base model, and says so loudly.
        reason = (
            f"empty {unit.method} training set: no training duel of {unit.task}/{unit.model} had "
            f"a valid winner, so no adapter was trained and this method's player is the base model"
        )
        write_json(unit.out_dir / UNTRAINED, {"method": unit.method, "reason": reason})
        shutil.rmtree(unit.out_dir / "adapter", ignore_errors=True)
        return {"counts": {"examples": 0, "steps": 0}, "untrained": reason}
    (unit.out_dir / UNTRAINED).unlink(missing_ok=True)
    seed = request_seed(unit.profile.seed, "train", unit.task, unit.model, unit.method)
    summary = train_adapter(unit.profile, unit.player, rows, unit.out_dir / "adapter", seed)
    return {
        "counts": {"examples": len(rows), "steps": summary.get("steps")},
        "train_seed": seed,
        "adapter_sha256": summary.get("adapter_sha256"),
        "final_loss": summary.get("final_loss"),
    }


STAGE = Stage(
    "train", "05_train.ipynb", train, lambda unit: [("trainsets", None)],
    profile_keys=("seed", "players", "training"), methods=TRAINED, roles=("player",),
)  # fmt: skip
