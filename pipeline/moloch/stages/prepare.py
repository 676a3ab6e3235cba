"""Stage 1, prepare (docs/protocol.md §1-3): anchors become player prompts, personas voters."""

from __future__ import annotations

import dataclasses

from ..errors import StageError
from ..files import write_jsonl
from ..prompts import player_messages
from ..units import Stage, Unit


def input_hashes(unit: Unit) -> dict:
    """The SHA-256 of the input files this unit reads (anchors of both splits, personas)."""
    from ..data import find_entry, player_file_entry, raw_entry

    source = unit.profile.anchors.source
    hashes = {"personas": find_entry("persona_split1").sha256}
    for split in ("train", "test"):
        entry = (
            player_file_entry(unit.task, split, "Qwen3-8B")
            if source == "v1"
            else raw_entry(unit.task, split)
        )
        hashes[f"anchors_{split}"] = entry.sha256
    return hashes


def prompt_rows(task: str, split: str, anchors) -> list[dict]:
    """One row per anchor: its id, fields and the player messages built from it."""
    return [
        {
            "anchor_id": f"{task}/{split}/{index:04d}",
            "task": task,
            "split": split,
            "index": index,
            "anchor": dataclasses.asdict(anchor),
            "messages": [list(m) for m in player_messages(task, anchor)],
        }
        for index, anchor in enumerate(anchors)
    ]


def prepare(unit: Unit) -> dict:
    """Reads the verified inputs; writes ``train.jsonl``, ``test.jsonl`` and ``voters.jsonl``."""
    from ..data import load_anchors, load_personas

    counts = {}
    for split in ("train", "test"):
        wanted = getattr(unit.profile.anchors, split)
        anchors = load_anchors(unit.task, split, source=unit.profile.anchors.source)
        if len(anchors) < wanted:
            raise StageError(
                f"profile {unit.profile.name!r} asks for {wanted} {split} anchors of "
                f"{unit.task!r}, the data has {len(anchors)}: lower anchors.{split}"
            )
        rows = prompt_rows(unit.task, split, anchors[:wanted])
        counts[split] = write_jsonl(unit.out_dir / f"{split}.jsonl", rows)
    chosen = load_personas()[: unit.profile.audience.voters]
    voters = [
        {"voter": i, "voter_name": p.character_name, "persona": p.raw} for i, p in enumerate(chosen)
    ]
    counts["voters"] = write_jsonl(unit.out_dir / "voters.jsonl", voters)
    return {"counts": counts}


STAGE = Stage(
    "prepare", "01_prepare.ipynb", prepare, lambda unit: [],
    profile_keys=("anchors", "audience"), extra_inputs=input_hashes,
)  # fmt: skip
