"""The claims registry and its evaluation against a run.

``data/claims.csv`` (the registry) lists every published value of
``data/reference/published-values.csv`` with what it measures, how to compute it from a
run's tidy cells (task, model, method or pair, metric, statistic) and a tolerance rule. It is
generated once by ``build_registry`` and then reviewed and committed as data.

``evaluate_claims`` checks each claim against a run and says, with a reason, whether it is
reproduced (the published value lies inside our 95 % interval; for an abstract figure whose
model and method are not stated, inside the interval of at least one candidate cell, named),
differs, is not comparable (the profile is not comparable, or the run's models, audience or
judge differ from the claim's) or is not computable (the run lacks the data).

    python -m moloch.claims registry                 # (re)build data/claims.csv
    python -m moloch.claims evaluate --profile smoke # writes data/runs/smoke/claims.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from .cells import read_cells, write_cells
from .config import Profile
from .errors import DataError
from .files import write_atomic
from .paths import CLAIMS_FILE, PUBLISHED_VALUES_FILE
from .released import R2026_METRIC, load_published
from .runs import Run, find_run
from .tasks import PROBE_METRIC, TASKS

STATUSES = ("reproduced", "differs", "not comparable", "not computable")
TRAINED_PAIRS = ("base-rft", "base-tfb")
# The setting each source ran in: who voted, who judged, how many voters.
SETUPS = {
    "abstract_v1": ("gpt-4o-mini", "gpt-4o", 20),
    "abstract_iclr": ("gpt-4o-mini", "gpt-4o", 20),  # not stated; assumed as in v1
    "v1_competition": ("gpt-4o-mini", "gpt-4o", 20),
    "r2026_competition": ("gpt-4o-mini", "gpt-4o-mini", 25),
    "r2026_probe": ("gpt-4o-mini", "gpt-4o-mini", 25),
}
# Abstract figures traced to one released cell (see moloch.released.abstract_matches).
IDENTIFIED = {
    "abstract_v1.elections.performance": "Qwen3-8B base-tfb",
    "abstract_iclr.elections.performance": "Qwen3-8B base-tfb",
}
TOLERANCES = {
    "in_ci": "published value inside our 95% CI of the same cell",
    "in_ci_any_candidate": (
        "published figure (rounded to 0.1) inside our 95% CI of at least one candidate cell "
        "(each model x trained method vs base); the identified cell, where known, decides"
    ),
}
REGISTRY_COLUMNS = (
    "claim_id",
    "source",
    "locator",
    "published",
    "unit",
    "measures",
    "task",
    "model",
    "method",
    "pair",
    "metric",
    "probe_id",
    "statistic",
    "audience_model",
    "judge_model",
    "n_voters",
    "identified_cell",
    "tolerance",
    "tolerance_rule",
)
RESULT_COLUMNS = (
    "claim_id",
    "published",
    "unit",
    "value",
    "ci_low",
    "ci_high",
    "status",
    "reason",
    "cell",
    "candidates",
    "interval_method",
    "n",
    "task",
    "model",
    "statistic",
)


# ---------------------------------------------------------------- the registry


def _probe_id(task: str, metric: str) -> str:
    ids = [p for p in TASKS[task].probes if PROBE_METRIC[p] == metric]
    if len(ids) != 1:
        raise DataError(f"no single probe of task {task!r} measures {metric!r}")
    return ids[0]


def _registry_row(claim: pd.Series) -> dict:
    family = claim["claim_id"].split(".", 1)[0]
    if family not in SETUPS:
        raise DataError(
            f"claim {claim['claim_id']!r} belongs to no known source family {list(SETUPS)}; "
            "add a rule for it in moloch.claims"
        )
    audience, judge, voters = SETUPS[family]
    row = dict.fromkeys(REGISTRY_COLUMNS)
    row.update(
        claim_id=claim["claim_id"],
        source=claim["source"],
        locator=claim["source_locator"],
        published=claim["value"],
        unit=claim["unit"],
        task=claim["task"],
        model=claim["model"],
        audience_model=audience,
        judge_model=judge,
        n_voters=voters,
        identified_cell=IDENTIFIED.get(claim["claim_id"]),
        tolerance="in_ci",
    )
    task, model, comparison = claim["task"], claim["model"], str(claim["comparison"])
    metric = str(claim["metric"])
    if metric == "win_rate_second_method":
        first, second = (p.strip() for p in comparison.split(" vs "))
        row.update(pair=f"{first}-{second}", method=second, metric="win_rate_second")
        row.update(statistic="win_rate_second")
        row["measures"] = (
            f"win rate of {second} over {first} ({task}, {model}): mean over duels of the "
            f"share of valid votes for {second}"
        )
    elif metric.startswith("probe_rate."):
        name = R2026_METRIC[metric.split(".", 1)[1]]
        row.update(method=comparison, metric=name, probe_id=_probe_id(task, name))
        row.update(statistic="probe_rate")
        row["measures"] = f"share of {comparison} player-0 messages judged {name} ({task}, {model})"
    elif metric == "performance":
        row.update(pair="|".join(TRAINED_PAIRS), method="rft|tfb", metric="win_rate_second")
        row.update(statistic="performance_pp", tolerance="in_ci_any_candidate")
        row["measures"] = (
            f"performance gain of a trained player over its base ({task}): win rate minus 50, "
            "in percentage points; model and method not stated"
        )
    else:
        row.update(pair="|".join(TRAINED_PAIRS), method="rft|tfb", metric=metric)
        row.update(probe_id=_probe_id(task, metric), statistic="relative_change")
        row.update(tolerance="in_ci_any_candidate")
        row["measures"] = (
            f"relative increase of the {metric} rate, trained vs base ({task}): "
            "rate(trained)/rate(base) - 1 in %; model and method not stated"
        )
    row["tolerance_rule"] = TOLERANCES[row["tolerance"]]
    return row


def build_registry(published: pd.DataFrame | None = None) -> pd.DataFrame:
    """The registry rows for every published value (rules in this module)."""
    published = load_published() if published is None else published
    return pd.DataFrame(
        [_registry_row(c) for _, c in published.iterrows()], columns=list(REGISTRY_COLUMNS)
    )


def _write_csv(table: pd.DataFrame, path: Path) -> Path:
    return write_atomic(path, table.to_csv(index=False))


def load_registry(path: Path = CLAIMS_FILE) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(
            f"claims registry {path} is missing; build it with `python -m moloch.claims registry`"
        )
    registry = pd.read_csv(path, dtype={"n_voters": "Int64"})
    missing = [c for c in REGISTRY_COLUMNS if c not in registry.columns]
    if missing:
        raise DataError(f"claims registry {path} lacks column(s) {missing}; rebuild it")
    return registry


# ---------------------------------------------------------------- evaluation


def _candidates(claim: pd.Series, cells: pd.DataFrame) -> pd.DataFrame:
    """Our cells that compute this claim (several for an unspecified model or method)."""
    if cells.empty:
        return cells
    stat = claim["statistic"]
    pick = cells["task"] == claim["task"]
    if claim["model"] != "unspecified":
        pick &= cells["model"] == claim["model"]
    if stat in ("win_rate_second", "performance_pp"):
        pick &= cells["kind"] == "win_rate"
        pick &= cells["pair"].isin(str(claim["pair"]).split("|"))
    elif stat == "probe_rate":
        pick &= (cells["kind"] == "probe_rate") & (cells["metric"] == claim["metric"])
        pick &= cells["method"] == claim["method"]
    else:
        pick &= (cells["kind"] == "probe_change") & (cells["statistic"] == "relative_change")
        pick &= (cells["metric"] == claim["metric"]) & cells["pair"].isin(TRAINED_PAIRS)
    found = cells[pick].copy()
    scale = {"performance_pp": (100.0, -50.0), "relative_change": (100.0, 0.0)}
    factor, shift = scale.get(stat, (1.0, 0.0))
    for column in ("estimate", "ci_low", "ci_high"):
        found[column] = found[column].astype(float) * factor + shift
    found["cell"] = found["model"] + " " + found["pair"].fillna(found["method"])
    return found


def run_reason(profile: Profile) -> str | None:
    """Why no claim is comparable with this run whatever the claim, or None."""
    return None if profile.comparable else f"profile {profile.name!r} is marked comparable: false"


def _incomparable(claim: pd.Series, profile: Profile) -> list[str]:
    reasons = [run_reason(profile)] if run_reason(profile) else []
    players = [p.name for p in profile.players]
    if claim["model"] != "unspecified" and claim["model"] not in players:
        reasons.append(f"the run has no player {claim['model']} (it has {', '.join(players)})")
    if claim["statistic"] in ("probe_rate", "relative_change"):
        if profile.judge.model != claim["judge_model"]:
            reasons.append(f"judge {profile.judge.model}, claim's {claim['judge_model']}")
    else:
        if profile.audience.model != claim["audience_model"]:
            reasons.append(f"audience {profile.audience.model}, claim's {claim['audience_model']}")
        if pd.notna(claim["n_voters"]) and profile.audience.voters != claim["n_voters"]:
            reasons.append(f"{profile.audience.voters} voters, claim's {claim['n_voters']}")
    return reasons


def _fmt(row: pd.Series) -> str:
    return f"{row['cell']} {row['estimate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def evaluate_claim(claim: pd.Series, cells: pd.DataFrame, profile: Profile) -> dict:
    """One claim's result row: our value and interval, a status and the reason for it."""
    result = dict.fromkeys(RESULT_COLUMNS)
    result.update(
        claim_id=claim["claim_id"],
        published=claim["published"],
        unit=claim["unit"],
        task=claim["task"],
        model=claim["model"],
        statistic=claim["statistic"],
    )
    found = _candidates(claim, cells)
    defined = found[np.isfinite(found["estimate"])] if len(found) else found
    published = float(claim["published"])
    chosen = None
    if len(defined):
        covers = defined[(defined["ci_low"] <= published) & (published <= defined["ci_high"])]
        identified = defined[defined["cell"] == claim["identified_cell"]]
        if len(identified):
            chosen = identified.iloc[0]
        elif len(covers):
            chosen = covers.iloc[(covers["estimate"] - published).abs().argmin()]
        else:
            chosen = defined.iloc[(defined["estimate"] - published).abs().argmin()]
        result.update(
            value=chosen["estimate"],
            ci_low=chosen["ci_low"],
            ci_high=chosen["ci_high"],
            cell=chosen["cell"],
            interval_method=chosen["interval_method"],
            n=chosen["n"],
        )
    result["candidates"] = "; ".join(_fmt(r) for _, r in defined.iterrows()) or None
    incomparable = _incomparable(claim, profile)
    if incomparable:
        result["status"] = "not comparable"
        result["reason"] = "; ".join(incomparable)
    elif chosen is None:
        result["status"] = "not computable"
        result["reason"] = (
            f"the run has no defined {claim['statistic']} cell for {claim['task']} "
            f"{claim['model']} {claim['pair'] or claim['method']}"
            + (" (base rate 0: relative change undefined)" if len(found) else "")
        )
    else:
        inside = chosen["ci_low"] <= published <= chosen["ci_high"]
        result["status"] = "reproduced" if inside else "differs"
        where = "inside" if inside else "outside"
        result["reason"] = f"published {published:g} {where} {_fmt(chosen)}"
    return result


def evaluate_claims(profile: Profile, cells: pd.DataFrame) -> pd.DataFrame:
    """Every published claim checked against a run's cells (``moloch.cells``).

    Every claim id of the published-values file gets a row with a status and a reason.
    """
    registry = load_registry()
    rows = [evaluate_claim(claim, cells, profile) for _, claim in registry.iterrows()]
    published = pd.read_csv(PUBLISHED_VALUES_FILE, usecols=["claim_id", "value", "unit"])
    for claim in published[~published["claim_id"].isin(registry["claim_id"])].itertuples():
        row = dict.fromkeys(RESULT_COLUMNS)
        row.update(claim_id=claim.claim_id, published=claim.value, unit=claim.unit)
        row.update(status="not computable", reason=f"missing from {CLAIMS_FILE.name}; rebuild it")
        rows.append(row)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def write_claims(run: Run) -> Path:
    """Every claim against the run's cells table: writes ``<run>/claims.csv``."""
    return _write_csv(evaluate_claims(run.profile, read_cells(run)), run.claims_path)


def read_claims(run: Run) -> pd.DataFrame:
    """The claims table of a run, as :func:`write_claims` wrote it."""
    if not run.claims_path.is_file():
        raise DataError(f"{run.claims_path} is missing: nox -s report writes it")
    return pd.read_csv(run.claims_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("registry", help="build data/claims.csv from the published values")
    evaluate = sub.add_parser("evaluate", help="check every claim against a run's cells")
    evaluate.add_argument("--profile", help="profile name or YAML path")
    evaluate.add_argument("--run-dir", help="run folder (default data/runs/<profile>)")
    args = parser.parse_args(argv)
    if args.command == "registry":
        path = _write_csv(build_registry(), CLAIMS_FILE)
    else:
        run = find_run(args.profile, args.run_dir)
        write_cells(run)
        path = write_claims(run)
        counts = pd.read_csv(path)["status"].value_counts()
        print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
