"""Stage 4, training sets (docs/protocol.md §4): RFT (what won) and TFB (what voters wrote)."""

from __future__ import annotations

from ..anchors import make_anchor
from ..errors import StageError
from ..files import read_jsonl, write_json, write_jsonl
from ..trainsets import Episode, build_trainsets, group_votes
from ..units import Stage, Unit
from .common import prepared


def episode_records(unit: Unit) -> list[Episode]:
    """The training episodes of this (task, model), in train-anchor order."""
    train = prepared(unit, "train")
    folder = unit.unit_dir("episodes")
    candidates = {
        (r["anchor_id"], r["sample_index"]): r
        for r in read_jsonl(unit.unit_dir("candidates") / "candidates.jsonl")
    }
    votes = group_votes(read_jsonl(folder / "votes.jsonl"), where=str(folder / "votes.jsonl"))
    records = []
    for row in train:
        pair = [candidates.get((row["anchor_id"], i)) for i in (0, 1)]
        if None in pair:
            raise StageError(f"episode {row['anchor_id']}: candidates missing; rerun candidates")
        records.append(
            Episode(
                anchor_id=row["anchor_id"],
                anchor=make_anchor(unit.task, row["anchor"], row["anchor_id"]),
                prompt=tuple(tuple(m) for m in row["messages"]),
                completions=(pair[0]["text"], pair[1]["text"]),
                messages=(pair[0]["shown"], pair[1]["shown"]),
                votes=votes.get(row["anchor_id"], ()),
            )
        )
    return records


def trainsets(unit: Unit) -> dict:
    """Reads the episodes; writes ``rft.jsonl``, ``tfb.jsonl`` and ``summary.json``."""
    mode = unit.profile.training.mode
    sets = build_trainsets(unit.task, episode_records(unit), mode, unit.profile.seed)
    counts = {
        "rft": write_jsonl(unit.out_dir / "rft.jsonl", sets.rft),
        "tfb": write_jsonl(unit.out_dir / "tfb.jsonl", sets.tfb),
    }
    write_json(unit.out_dir / "summary.json", sets.summary)
    return {"counts": counts, "mode": mode, "summary": sets.summary}


STAGE = Stage(
    "trainsets", "04_trainsets.ipynb", trainsets,
    lambda unit: [("prepare", None), ("candidates", None), ("episodes", None)],
    profile_keys=("seed", "training"),
)  # fmt: skip
