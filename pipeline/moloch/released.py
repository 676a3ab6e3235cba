"""What the authors released, re-analysed offline (no model, a few seconds).

Reads ``data/reference/published-values.csv`` and writes tidy tables to
``data/runs/released/`` for the report:

- ``v1_competition.csv``: the 18 v1 competition aggregates (mean and population std of the
  per-duel vote share over 1,024 duels, 20 voters) with 95 % normal (z) intervals and the
  excess over 50 % in percentage points.
- ``abstract_candidates.csv``: for every abstract performance figure (v1 and ICLR), the value
  each v1 cell of its task gives under each plausible definition, and whether it rounds to
  the published figure.
- ``relative_pairs.csv`` / ``relative_summary.csv``: the integer (base, trained) counts out of
  1,024 whose relative change rounds to each abstract misalignment figure, with Katz log
  intervals for the ratio.
- ``r2026_competition.csv``, ``r2026_probe_rates.csv``, ``r2026_probe_changes.csv``: the
  authors' 2026 replication with the intervals its published precision allows.

    python -m moloch.released                 # writes data/runs/released/*.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtri
from statsmodels.stats.proportion import confint_proportions_2indep

from .errors import DataError
from .files import write_atomic
from .paths import PUBLISHED_VALUES_FILE, runs_dir
from .stats import DEFAULT_CONFIDENCE, wilson

N_ITEMS = 1024  # duels per competition and labels per probe cell in every release
PUBLISHED_COLUMNS = ("claim_id", "source", "task", "model", "metric", "comparison", "value")
# Definitions of a "performance gain" in percent, from the second method's win rate w.
DEFINITIONS = {
    "win_rate_minus_half_pp": lambda w: (w - 0.5) * 100,
    "odds_minus_one_pct": lambda w: (w / (1 - w) - 1) * 100,
    "ratio_to_half_pct": lambda w: (w / 0.5 - 1) * 100,
}
ROUNDING = 0.05  # abstract figures have one decimal
# The 2026 replication's names for the v1 probes' metrics.
R2026_METRIC = {
    "fabrication": "disinformation",
    "misrepresentation": "deceptive_marketing",
    "populist_rhetoric": "populist_rhetoric",
    "harmful_behaviour": "harmful_behaviour",
}


def _z(confidence: float) -> float:
    return float(ndtri(0.5 + confidence / 2))


def load_published(path: Path = PUBLISHED_VALUES_FILE) -> pd.DataFrame:
    """The published-values table, checked for the columns this module reads."""
    if not path.is_file():
        raise DataError(f"published values file {path} is missing; restore it from git")
    table = pd.read_csv(path)
    missing = [c for c in PUBLISHED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; it has {list(table.columns)}")
    return table


def _pair(comparison: str) -> str:
    """'base vs tfb' -> 'base-tfb'."""
    return "-".join(part.strip() for part in comparison.split(" vs "))


# ---------------------------------------------------------------- v1 competition


def v1_competition(published: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE) -> pd.DataFrame:
    """Intervals for the 18 v1 aggregates from their mean and population std.

    Interval: mean +/- z * s / sqrt(n), with s the sample std recovered from the population
    std (s = std * sqrt(n / (n - 1))) and z the normal quantile; with n - 1 = 1,023 degrees
    of freedom the t quantile is larger by under 0.1 %.
    """
    rows = published[published["claim_id"].str.startswith("v1_competition.")].copy()
    n = rows["n_prompts"].fillna(N_ITEMS).astype(int)
    se = rows["spread"] * np.sqrt(n / (n - 1)) / np.sqrt(n)
    z = _z(confidence)
    out = pd.DataFrame(
        {
            "claim_id": rows["claim_id"],
            "task": rows["task"],
            "model": rows["model"],
            "pair": rows["comparison"].map(_pair),
            "mean": rows["value"],
            "std": rows["spread"],
            "n": n,
            "n_voters": rows["n_voters"].astype("Int64"),
            "se": se,
            "ci_low": rows["value"] - z * se,
            "ci_high": rows["value"] + z * se,
        }
    )
    out["excess_pp"] = (out["mean"] - 0.5) * 100
    out["excess_ci_low_pp"] = (out["ci_low"] - 0.5) * 100
    out["excess_ci_high_pp"] = (out["ci_high"] - 0.5) * 100
    out["excludes_half"] = (out["ci_low"] > 0.5) | (out["ci_high"] < 0.5)
    out["interval"] = f"normal (z), {confidence:.0%}, sample sd from population sd"
    return out.reset_index(drop=True)


# ---------------------------------------------------------------- abstract figures


def candidate_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The v1 cells plus averages an abstract might quote (task, model, pair, mean).

    Averages of the trained-vs-base win rates: per model over the two methods, per method
    over the two models, and over all four cells of a task.
    """
    single = cells[["task", "model", "pair", "mean"]].copy()
    trained = single[single["pair"].isin(("base-rft", "base-tfb"))]
    groups = [
        (
            trained.groupby(["task", "model"])["mean"].mean().reset_index(),
            "mean(base-rft, base-tfb)",
        ),
        (
            trained.groupby(["task", "pair"])["mean"].mean().reset_index(),
            None,  # keeps its pair; the model is the average
        ),
        (trained.groupby("task")["mean"].mean().reset_index(), "mean(base-rft, base-tfb)"),
    ]
    frames = [single]
    for frame, pair in groups:
        frame = frame.copy()
        if "model" not in frame.columns:
            frame["model"] = "mean over models"
        if pair is not None:
            frame["pair"] = pair
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def abstract_candidates(published: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Each abstract performance figure against every v1 candidate of its task, by definition."""
    claims = published[
        published["claim_id"].str.startswith("abstract_") & (published["metric"] == "performance")
    ]
    candidates = candidate_cells(cells)
    rows = []
    for claim in claims.itertuples():
        for cell in candidates[candidates["task"] == claim.task].itertuples():
            for name, define in DEFINITIONS.items():
                value = float(define(cell.mean))
                rows.append(
                    {
                        "claim_id": claim.claim_id,
                        "published": claim.value,
                        "task": claim.task,
                        "model": cell.model,
                        "pair": cell.pair,
                        "candidate_kind": "average"
                        if "mean" in f"{cell.model} {cell.pair}"
                        else "cell",
                        "win_rate": cell.mean,
                        "definition": name,
                        "value": value,
                        "difference": value - claim.value,
                        "matches_rounding": abs(value - claim.value) <= ROUNDING + 1e-9,
                    }
                )
    return pd.DataFrame(rows)


def abstract_matches(candidates: pd.DataFrame) -> pd.DataFrame:
    """One row per abstract figure: the cells (and definitions) that round to it, if any."""
    rows = []
    for claim_id, group in candidates.groupby("claim_id", sort=False):
        hits = group[group["matches_rounding"]]
        nearest = group.loc[group["difference"].abs().idxmin()]
        rows.append(
            {
                "claim_id": claim_id,
                "published": group["published"].iloc[0],
                "n_candidates": len(group),
                "n_matches": len(hits),
                "matches": "; ".join(
                    f"{h.model} {h.pair} ({h.definition}: {h.value:.3f})" for h in hits.itertuples()
                ),
                "nearest": f"{nearest.model} {nearest.pair} ({nearest.definition}: "
                f"{nearest.value:.3f})",
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- relative figures


def count_pairs(figure_pct: float, n: int = N_ITEMS) -> pd.DataFrame:
    """Integer counts (base b, trained t) out of n whose 100 (t / b - 1) rounds to the figure."""
    b = np.arange(1, n + 1)[:, None]
    t = np.arange(0, n + 1)[None, :]
    change = 100 * (t / b - 1)
    bi, ti = np.nonzero(np.abs(change - figure_pct) <= ROUNDING + 1e-9)
    return pd.DataFrame({"base_count": bi + 1, "trained_count": ti})


def katz_ratio_interval(
    trained: np.ndarray, base: np.ndarray, n: int = N_ITEMS, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[np.ndarray, np.ndarray]:
    """Katz log interval for the ratio of two independent proportions (statsmodels 'log')."""
    lo, hi = confint_proportions_2indep(
        np.asarray(trained),
        n,
        np.asarray(base),
        n,
        compare="ratio",
        method="log",
        alpha=1 - confidence,
    )
    return np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)


def relative_pairs(
    published: pd.DataFrame, n: int = N_ITEMS, confidence: float = DEFAULT_CONFIDENCE
) -> pd.DataFrame:
    """Every count pair behind every abstract misalignment figure, with a Katz interval."""
    claims = published[
        published["claim_id"].str.startswith("abstract_") & (published["metric"] != "performance")
    ]
    frames = []
    for claim in claims.itertuples():
        pairs = count_pairs(claim.value, n)
        lo, hi = katz_ratio_interval(pairs["trained_count"], pairs["base_count"], n, confidence)
        pairs.insert(0, "claim_id", claim.claim_id)
        pairs.insert(1, "figure_pct", claim.value)
        pairs["base_rate"] = pairs["base_count"] / n
        pairs["trained_rate"] = pairs["trained_count"] / n
        pairs["change_pct"] = 100 * (pairs["trained_count"] / pairs["base_count"] - 1)
        pairs["ci_low_pct"] = 100 * (lo - 1)
        pairs["ci_high_pct"] = 100 * (hi - 1)
        pairs["excludes_zero"] = lo > 1
        frames.append(pairs)
    return pd.concat(frames, ignore_index=True)


def relative_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per figure: how many count pairs fit, the smallest, and when its interval excludes 0."""
    rows = []
    for claim_id, group in pairs.groupby("claim_id", sort=False):
        smallest = group.loc[group["base_count"].idxmin()]
        significant = group[group["excludes_zero"]]
        rows.append(
            {
                "claim_id": claim_id,
                "figure_pct": group["figure_pct"].iloc[0],
                "n_pairs": len(group),
                "smallest_pair": f"{smallest.trained_count}/{smallest.base_count}",
                "smallest_base_rate": smallest.base_rate,
                "smallest_ci_pct": f"[{smallest.ci_low_pct:.1f}, {smallest.ci_high_pct:.1f}]",
                "min_base_count_excluding_zero": (
                    int(significant["base_count"].min()) if len(significant) else None
                ),
                "share_excluding_zero": float(group["excludes_zero"].mean()),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- 2026 replication


def r2026_competition(
    published: pd.DataFrame, v1: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE
) -> pd.DataFrame:
    """2026 win rates (3 d.p., no spread released) with two bounds on their interval.

    "bound": the widest the interval can be. A per-duel share in [0, 1] with mean w has a
    variance at most w (1 - w) (Bhatia-Davis), so half-width <= z sqrt(w (1 - w) / n).
    "v1sd": assuming the largest per-duel std seen in v1 (an assumption, not a bound).
    """
    rows = published[published["claim_id"].str.startswith("r2026_competition.")]
    w, n = rows["value"].to_numpy(), rows["n_prompts"].fillna(N_ITEMS).to_numpy()
    z = _z(confidence)
    half_bound = z * np.sqrt(w * (1 - w) / n)
    v1_sd = float(v1["std"].max())
    half_v1 = z * v1_sd * np.sqrt(n / (n - 1)) / np.sqrt(n)
    out = pd.DataFrame(
        {
            "claim_id": rows["claim_id"].to_numpy(),
            "task": rows["task"].to_numpy(),
            "model": rows["model"].to_numpy(),
            "pair": rows["comparison"].map(_pair).to_numpy(),
            "win_rate": w,
            "excess_pp": (w - 0.5) * 100,
            "ci_low_bound": w - half_bound,
            "ci_high_bound": w + half_bound,
            "ci_low_v1sd": w - half_v1,
            "ci_high_v1sd": w + half_v1,
        }
    )
    out["excludes_half_bound"] = (out["ci_low_bound"] > 0.5) | (out["ci_high_bound"] < 0.5)
    out["excludes_half_v1sd"] = (out["ci_low_v1sd"] > 0.5) | (out["ci_high_v1sd"] < 0.5)
    out["v1_sd_assumed"] = v1_sd
    return out


def _counts(rate: float, n: int) -> tuple[int, int, int]:
    """(nearest, lowest, highest) integer count k with k / n rounding to ``rate`` at 3 d.p."""
    lo = int(np.ceil((rate - 0.0005) * n - 1e-9))
    hi = int(np.floor((rate + 0.0005) * n + 1e-9))
    return int(round(rate * n)), lo, hi


def r2026_probe_rates(
    published: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE
) -> pd.DataFrame:
    """2026 probe rates as counts out of 1,024 (every label assumed valid) with Wilson intervals."""
    rows = []
    for r in published[published["claim_id"].str.startswith("r2026_probe.")].itertuples():
        n = int(r.n_prompts) if pd.notna(r.n_prompts) else N_ITEMS
        k, k_lo, k_hi = _counts(r.value, n)
        lo, hi = wilson(k, n, confidence)
        source_metric = r.metric.split(".", 1)[1]
        rows.append(
            {
                "claim_id": r.claim_id,
                "task": r.task,
                "model": r.model,
                "metric": R2026_METRIC.get(source_metric, source_metric),
                "source_metric": source_metric,
                "method": r.comparison,
                "rate": r.value,
                "n": n,
                "count": k,
                "count_min": k_lo,
                "count_max": k_hi,
                "ci_low": lo,
                "ci_high": hi,
            }
        )
    return pd.DataFrame(rows)


def r2026_probe_changes(
    rates: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE
) -> pd.DataFrame:
    """Trained vs base in the 2026 replication, treating the two arms as independent.

    The labels are paired by prompt but only the rates were released, so the intervals are
    for independent proportions (Newcombe for the difference, Katz log for the ratio); a
    positive pairing correlation would make the true intervals narrower.
    """
    keys = ["task", "model", "metric"]
    base = rates[rates["method"] == "base"].set_index(keys)
    trained = rates[rates["method"] != "base"]
    rows = []
    for r in trained.itertuples():
        key = (r.task, r.model, r.metric)
        if key not in base.index:
            continue
        b = base.loc[key]
        d_lo, d_hi = confint_proportions_2indep(
            r.count,
            r.n,
            b["count"],
            b["n"],
            compare="diff",
            method="newcomb",
            alpha=1 - confidence,
        )
        rel = r.count / b["count"] - 1 if b["count"] else float("nan")
        if b["count"] and r.count:
            q_lo, q_hi = confint_proportions_2indep(
                r.count,
                r.n,
                b["count"],
                b["n"],
                compare="ratio",
                method="log",
                alpha=1 - confidence,
            )
        else:
            q_lo = q_hi = float("nan")
        rows.append(
            {
                "task": r.task,
                "model": r.model,
                "metric": r.metric,
                "method": r.method,
                "base_rate": b["rate"],
                "trained_rate": r.rate,
                "difference": r.count / r.n - b["count"] / b["n"],
                "diff_ci_low": float(d_lo),
                "diff_ci_high": float(d_hi),
                "relative_change_pct": 100 * rel,
                "rel_ci_low_pct": 100 * (float(q_lo) - 1),
                "rel_ci_high_pct": 100 * (float(q_hi) - 1),
                "excludes_zero": bool(d_lo > 0 or d_hi < 0),
                "interval": "independent proportions: Newcombe (difference), Katz log (ratio)",
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- all of it


def analyse(
    published: pd.DataFrame | None = None, confidence: float = DEFAULT_CONFIDENCE
) -> dict[str, pd.DataFrame]:
    """Every table of the re-analysis, by file stem."""
    published = load_published() if published is None else published
    v1 = v1_competition(published, confidence)
    candidates = abstract_candidates(published, v1)
    pairs = relative_pairs(published, N_ITEMS, confidence)
    rates = r2026_probe_rates(published, confidence)
    return {
        "v1_competition": v1,
        "abstract_candidates": candidates,
        "abstract_matches": abstract_matches(candidates),
        "relative_pairs": pairs,
        "relative_summary": relative_summary(pairs),
        "r2026_competition": r2026_competition(published, v1, confidence),
        "r2026_probe_rates": rates,
        "r2026_probe_changes": r2026_probe_changes(rates, confidence),
    }


def write_tables(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    """Write each table to ``out_dir/<stem>.csv`` atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        write_atomic(out_dir / f"{stem}.csv", t.to_csv(index=False)) for stem, t in tables.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=runs_dir() / "released")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE)
    args = parser.parse_args(argv)
    paths = write_tables(analyse(confidence=args.confidence), args.out)
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
