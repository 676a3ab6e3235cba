"""What a run would do next: each unit up to date, stale (and why), or missing.

    moloch status --profile smoke                 # every unit of the run
    moloch status --run-dir data/runs/x --task sales

Nothing runs and no model is called: each unit's fingerprint is computed as the runner
computes it and compared with the manifest on disk, part by part (inputs, parameters,
code), so a stale unit says what changed. A unit that reads a stale or missing one is
stale too ("after <stage>"): it will be made again from new inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MolochError
from .fingerprints import fingerprint
from .manifests import changed_outputs, read_manifest
from .runs import Run
from .units import Unit

UP_TO_DATE, STALE, MISSING = "up to date", "stale", "missing"


@dataclass(frozen=True)
class UnitStatus:
    stage: str
    task: str
    model: str
    method: str | None
    state: str  # UP_TO_DATE, STALE or MISSING
    why: str = ""


def why_stale(recorded: dict, now: dict) -> str:
    """Which parts of a fingerprint changed between a manifest's (``recorded``) and now."""
    reasons = []
    old_inputs, new_inputs = recorded.get("inputs", {}), now["inputs"]
    changed = sorted(
        k for k in {*old_inputs, *new_inputs} if old_inputs.get(k) != new_inputs.get(k)
    )
    if changed:
        reasons.append(f"input {', '.join(changed)} changed")
    if recorded.get("params") != now["params"]:
        reasons.append("its profile settings changed")
    if recorded.get("code") != now["code"]:
        reasons.append("its code changed")
    return "; ".join(reasons) or "its fingerprint changed"


def unit_status(unit: Unit, pending: set[tuple[str, str | None]]) -> UnitStatus:
    """The state of one unit; ``pending``: the (stage, method) units of its shard that will
    be made (again) before it."""

    def status(state: str, why: str = "") -> UnitStatus:
        return UnitStatus(unit.stage.name, unit.task, unit.model, unit.method, state, why)

    try:
        manifest = read_manifest(unit.out_dir)
    except MolochError as err:  # unreadable: the runner will make it again
        return status(STALE, str(err).splitlines()[0])
    state = MISSING if manifest is None else STALE
    after = [f"{s}/{m}" if m else s for s, m in unit.stage.needs(unit) if (s, m) in pending]
    if after:
        return status(state, f"after {', '.join(after)}")
    if manifest is None:
        return status(MISSING, "not run yet")
    try:
        now = fingerprint(unit)
    except MolochError as err:
        return status(STALE, str(err).splitlines()[0])
    if manifest.get("fingerprint", {}).get("digest") != now["digest"]:
        return status(STALE, why_stale(manifest.get("fingerprint", {}), now))
    changed = changed_outputs(unit.out_dir, manifest)
    if changed:
        return status(STALE, f"its {', '.join(changed)}")
    return status(UP_TO_DATE)


def run_status(run: Run, stages, tasks: list[str], models: list[str]) -> list[UnitStatus]:
    """Every unit of ``stages`` for the given shards, in the order the runner takes them."""
    out: list[UnitStatus] = []
    for task in tasks:
        for model in models:
            pending: set[tuple[str, str | None]] = set()
            for stage in stages:
                for method in stage.methods or (None,):
                    unit = Unit.of(stage, run, task, model, method, None)
                    state = unit_status(unit, pending)
                    if state.state != UP_TO_DATE:
                        pending.add((stage.name, method))
                    out.append(state)
    return out


def render(statuses: list[UnitStatus]) -> str:
    """A plain table, one unit a line, then the counts."""
    rows = [("stage", "task", "model", "method", "state", "why")]
    rows += [(s.stage, s.task, s.model, s.method or "-", s.state, s.why) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
             for r in rows]  # fmt: skip
    counts = {k: sum(s.state == k for s in statuses) for k in (UP_TO_DATE, STALE, MISSING)}
    lines.append("moloch: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return "\n".join(line.rstrip() for line in lines)
