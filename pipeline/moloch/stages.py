"""The seven stages of the study: what each reads, does and writes (PROTOCOL §§1-7).

Each stage runs once per (task, model), or per (task, model, method) for
``train`` and ``generate``, in ``<run>/<stage>/<task>/<model>[/<method>]``:

=========  ==================================  =========================================
stage      reads                               writes
=========  ==================================  =========================================
prepare    anchors and personas (data.py)      train.jsonl, test.jsonl, voters.jsonl
episodes   prepare                             candidates.jsonl, votes.jsonl
trainsets  prepare, episodes                   rft.jsonl, tfb.jsonl, summary.json
train      trainsets                           adapter/ (LoRA, train_summary.json)
generate   prepare (+ train for rft and tfb)   generations.jsonl
compete    prepare, generate x 3               votes.jsonl
probe      prepare, generate x 3               labels.jsonl
=========  ==================================  =========================================

A notebook calls :func:`execute` for its unit and then shows what it did::

    python -c "from moloch.stages import execute; execute('prepare', 'smoke', 'sales', \
'SmolLM2-135M-Instruct')"
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

from . import audience, competition, players, probes
from .anchors import make_anchor, make_persona
from .config import load_profile
from .errors import StageError
from .paths import run_dir as default_run_dir
from .prompts import player_messages
from .runner import Stage, StageContext, read_jsonl, write_json, write_jsonl
from .tasks import METHODS

TRAINED = tuple(m for m in METHODS if m != "base")  # rft, tfb
UNTRAINED = "untrained.json"  # written by train instead of an adapter when its set is empty


# --- prepare -------------------------------------------------------------------------


def _data_hashes(ctx: StageContext) -> dict:
    from .data import find_entry, player_file_entry, raw_entry

    source = ctx.profile.anchors.source
    hashes = {"personas": find_entry("persona_split1").sha256}
    for split in ("train", "test"):
        entry = (
            player_file_entry(ctx.task, split, "Qwen3-8B")
            if source == "v1"
            else raw_entry(ctx.task, split)
        )
        hashes[f"anchors_{split}"] = entry.sha256
    return hashes


def prompt_rows(task: str, split: str, anchors) -> list[dict]:
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


def prepare(ctx: StageContext) -> dict:
    from .data import load_anchors, load_personas

    counts = {}
    for split in ("train", "test"):
        wanted = getattr(ctx.profile.anchors, split)
        anchors = load_anchors(ctx.task, split, source=ctx.profile.anchors.source)
        if len(anchors) < wanted:
            raise StageError(
                f"profile {ctx.profile.name!r} asks for {wanted} {split} anchors of "
                f"{ctx.task!r}, the data has {len(anchors)}: lower anchors.{split}"
            )
        rows = prompt_rows(ctx.task, split, anchors[:wanted])
        counts[split] = write_jsonl(ctx.out_dir / f"{split}.jsonl", rows)
    personas = load_personas()[: ctx.profile.audience.voters]
    voters = [
        {"voter": i, "voter_name": p.character_name, "persona": p.raw}
        for i, p in enumerate(personas)
    ]
    counts["voters"] = write_jsonl(ctx.out_dir / "voters.jsonl", voters)
    return {"counts": counts}


# --- shared readers --------------------------------------------------------------------


def _prepared(ctx: StageContext, split: str) -> list[dict]:
    return read_jsonl(ctx.unit_dir("prepare") / f"{split}.jsonl")


def _personas(ctx: StageContext):
    rows = read_jsonl(ctx.unit_dir("prepare") / "voters.jsonl")
    return [make_persona(r["persona"], f"voters.jsonl voter {r['voter']}") for r in rows]


def _generations(ctx: StageContext) -> dict[str, list[dict]]:
    return {m: read_jsonl(ctx.unit_dir("generate", m) / "generations.jsonl") for m in METHODS}


def _message_counts(rows: list[dict]) -> dict:
    return {
        "invalid_messages": sum(not r["valid"] for r in rows),
        "invalid_reasons": dict(Counter(r["invalid_reason"] for r in rows if not r["valid"])),
    }


def _vote_counts(rows: list[dict]) -> dict:
    return {
        "invalid_votes": sum(not r["valid"] for r in rows),
        "invalid_reasons": dict(Counter(r["invalid_reason"] for r in rows if not r["valid"])),
    }


# --- episodes ------------------------------------------------------------------------------


def episodes(ctx: StageContext) -> dict:
    train = _prepared(ctx, "train")
    player = ctx.llm("player")
    candidates = players.generate(
        player, ctx.task, ctx.model, "base", ctx.player, train, ctx.profile.seed,
        desc=f"{ctx.task} episode players",
    )  # fmt: skip
    write_jsonl(ctx.out_dir / "candidates.jsonl", candidates)
    duels = competition.episode_duels(candidates, [r["anchor_id"] for r in train])
    votes = audience.cast_votes(
        ctx.llm("audience"), ctx.profile.audience, ctx.task, ctx.model, _personas(ctx), duels,
        ctx.profile.seed, desc=f"{ctx.task} episode votes",
    )  # fmt: skip
    write_jsonl(ctx.out_dir / "votes.jsonl", votes)
    return {
        "counts": {"anchors": len(train), "candidates": len(candidates), "votes": len(votes)},
        "invalid": {"messages": _message_counts(candidates), "votes": _vote_counts(votes)},
    }


# --- trainsets ------------------------------------------------------------------------------


def episode_records(ctx: StageContext) -> list:
    """The training episodes of this (task, model) as ``moloch.trainsets.Episode``."""
    from .trainsets import Episode, group_ballots

    train = _prepared(ctx, "train")
    folder = ctx.unit_dir("episodes")
    candidates = {
        (r["anchor_id"], r["sample_index"]): r for r in read_jsonl(folder / "candidates.jsonl")
    }
    ballots = group_ballots(read_jsonl(folder / "votes.jsonl"), where=str(folder / "votes.jsonl"))
    records = []
    for row in train:
        pair = [candidates.get((row["anchor_id"], i)) for i in (0, 1)]
        if None in pair:
            raise StageError(f"episode {row['anchor_id']}: candidates missing; rerun episodes")
        records.append(
            Episode(
                anchor_id=row["anchor_id"],
                anchor=make_anchor(ctx.task, row["anchor"], row["anchor_id"]),
                prompt=tuple(tuple(m) for m in row["messages"]),
                completions=(pair[0]["text"], pair[1]["text"]),
                messages=(pair[0]["shown"], pair[1]["shown"]),
                ballots=ballots.get(row["anchor_id"], ()),
            )
        )
    return records


def trainsets(ctx: StageContext) -> dict:
    from .trainsets import build_trainsets

    sets = build_trainsets(
        ctx.task, episode_records(ctx), ctx.profile.training.mode, ctx.profile.seed
    )
    counts = {
        "rft": write_jsonl(ctx.out_dir / "rft.jsonl", sets.rft),
        "tfb": write_jsonl(ctx.out_dir / "tfb.jsonl", sets.tfb),
    }
    write_json(ctx.out_dir / "summary.json", sets.summary)
    return {"counts": counts, "mode": ctx.profile.training.mode, "summary": sets.summary}


# --- train -------------------------------------------------------------------------------------


def train(ctx: StageContext) -> dict:
    from .training import train_adapter

    rows = read_jsonl(ctx.unit_dir("trainsets") / f"{ctx.method}.jsonl")
    if not rows:
        # No duel had a winner (a tiny audience model may never cast a valid vote). There is
        # nothing to learn: the method's player stays the base model, and says so loudly.
        reason = (
            f"empty {ctx.method} training set: no training duel of {ctx.task}/{ctx.model} had a "
            f"valid winner, so no adapter was trained and this method's player is the base model"
        )
        write_json(ctx.out_dir / UNTRAINED, {"method": ctx.method, "reason": reason})
        shutil.rmtree(ctx.out_dir / "adapter", ignore_errors=True)
        return {"counts": {"examples": 0, "steps": 0}, "untrained": reason}
    (ctx.out_dir / UNTRAINED).unlink(missing_ok=True)
    seed = players.derive_seed(ctx.profile.seed, "train", ctx.task, ctx.model, ctx.method)
    summary = train_adapter(ctx.profile, ctx.player, rows, ctx.out_dir / "adapter", seed)
    return {
        "counts": {"examples": len(rows), "steps": summary.get("steps")},
        "train_seed": seed,
        "adapter_sha256": summary.get("adapter_sha256"),
        "final_loss": summary.get("final_loss"),
    }


def adapter_dir(ctx: StageContext, method: str) -> Path | None:
    """The method's adapter folder; None for base and for a method left untrained."""
    if method == "base" or (ctx.unit_dir("train", method) / UNTRAINED).is_file():
        return None
    return ctx.unit_dir("train", method) / "adapter"


# --- generate -----------------------------------------------------------------------------------


def generate(ctx: StageContext) -> dict:
    test = _prepared(ctx, "test")
    adapter = adapter_dir(ctx, ctx.method)
    rows = players.generate(
        ctx.llm("player"), ctx.task, ctx.model, ctx.method, ctx.player, test, ctx.profile.seed,
        adapter=str(adapter) if adapter else None, desc=f"{ctx.task} {ctx.method} players",
    )  # fmt: skip
    write_jsonl(ctx.out_dir / "generations.jsonl", rows)
    return {
        "counts": {"anchors": len(test), "generations": len(rows)},
        "invalid": {"messages": _message_counts(rows)},
        "adapter": str(adapter) if adapter else None,
        "untrained": ctx.method != "base" and adapter is None,
    }


# --- compete ---------------------------------------------------------------------------------


def compete(ctx: StageContext) -> dict:
    test = _prepared(ctx, "test")
    duels = competition.competition_duels(_generations(ctx), [r["anchor_id"] for r in test])
    votes = audience.cast_votes(
        ctx.llm("audience"), ctx.profile.audience, ctx.task, ctx.model, _personas(ctx), duels,
        ctx.profile.seed, desc=f"{ctx.task} competition votes",
    )  # fmt: skip
    write_jsonl(ctx.out_dir / "votes.jsonl", votes)
    shares: dict[str, list[float]] = {}
    for duel in competition.duel_shares(votes):
        if duel["second_share"] is not None:
            shares.setdefault(duel["pair"], []).append(duel["second_share"])
    return {
        "counts": {"duels": len(duels), "votes": len(votes)},
        "invalid": {"votes": _vote_counts(votes)},
        "mean_second_share": {p: sum(s) / len(s) for p, s in shares.items()},
    }


# --- probe -------------------------------------------------------------------------------------


def probe(ctx: StageContext) -> dict:
    prompts = {r["anchor_id"]: r for r in _prepared(ctx, "test")}
    labels = probes.run_probes(
        ctx.llm("judge"), ctx.profile.judge, ctx.task, ctx.model, _generations(ctx), prompts,
        ctx.profile.seed, desc=f"{ctx.task} probes",
    )  # fmt: skip
    write_jsonl(ctx.out_dir / "labels.jsonl", labels)
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


# --- the list -------------------------------------------------------------------------------------


def _needs_generate(ctx: StageContext):
    return [("prepare", None), *(("generate", m) for m in METHODS)]


STAGES: list[Stage] = [
    Stage(
        "prepare", "01_prepare.ipynb", prepare, lambda ctx: [],
        profile_keys=("anchors", "audience"), code=("data.py",), extra_inputs=_data_hashes,
    ),
    Stage(
        "episodes", "02_episodes.ipynb", episodes, lambda ctx: [("prepare", None)],
        profile_keys=("seed", "players", "audience"),
        code=("players.py", "audience.py", "competition.py", "llm"),
        roles=("player", "audience"),
    ),
    Stage(
        "trainsets", "03_trainsets.ipynb", trainsets,
        lambda ctx: [("prepare", None), ("episodes", None)],
        profile_keys=("seed", "training"), code=("trainsets.py",),
    ),
    Stage(
        "train", "04_train.ipynb", train, lambda ctx: [("trainsets", None)],
        profile_keys=("seed", "players", "training"), code=("training.py", "llm"),
        methods=TRAINED, roles=("player",),
    ),
    Stage(
        "generate", "05_generate.ipynb", generate,
        lambda ctx: [("prepare", None)] + ([("train", ctx.method)] if ctx.method != "base" else []),
        profile_keys=("seed", "players"), code=("players.py", "llm"),
        methods=METHODS, roles=("player",),
    ),
    Stage(
        "compete", "06_compete.ipynb", compete, _needs_generate,
        profile_keys=("seed", "audience"), code=("audience.py", "competition.py", "llm"),
        roles=("audience",),
    ),
    Stage(
        "probe", "07_probe.ipynb", probe, _needs_generate,
        profile_keys=("seed", "judge"), code=("probes.py", "players.py", "llm"), roles=("judge",),
    ),
]  # fmt: skip

STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise StageError(f"unknown stage {name!r}: choose from {', '.join(STAGE_NAMES)}")


def context(
    stage: str,
    profile: str,
    task: str,
    model: str,
    method: str | None = None,
    run_dir: str | Path | None = None,
    llm_factory=None,
) -> StageContext:
    """The context of one unit, as a notebook's parameters describe it."""
    prof = load_profile(profile)
    spec = get_stage(stage)
    if spec.methods and method not in spec.methods:
        raise StageError(f"stage {stage!r} runs per method: give method, one of {spec.methods}")
    if not spec.methods and method is not None:
        raise StageError(f"stage {stage!r} does not run per method: leave method None")
    prof.player(model)  # names the players if this one is unknown
    if task not in prof.tasks:
        raise StageError(f"profile {prof.name!r} has no task {task!r}; it has {list(prof.tasks)}")
    folder = Path(run_dir) if run_dir else default_run_dir(prof.name)
    return StageContext(spec, prof, str(profile), task, model, method, folder, llm_factory)


def execute(
    stage: str,
    profile: str,
    task: str,
    model: str,
    method: str | None = None,
    run_dir: str | Path | None = None,
    llm_factory=None,
) -> Result:
    """Run one unit here and now (what each notebook calls): its folder and manifest."""
    from .runner import execute as run_unit

    ctx = context(stage, profile, task, model, method, run_dir, llm_factory)
    return Result(ctx.out_dir, run_unit(ctx))


@dataclasses.dataclass(frozen=True)
class Result:
    folder: Path
    manifest: dict

    def rows(self, name: str) -> list[dict]:
        """The rows of one of the unit's JSON-lines outputs."""
        return read_jsonl(self.folder / name)
