"""The power of the design: which effects a run of a given size can detect.

For each published effect: the minimum detectable effect (MDE: the smallest true effect a
two-sided 5% test finds with 80% power) of the v1 design (1,024 test anchors, 20 voters),
of the smoke profile (16, 5) and of the authors' 2026 replication (1,024, 25), and the
number of test anchors that would confirm the published effect with 80% power. So a reader
can tell "no effect" from "no power".

- A win rate's standard error is sd / sqrt(anchors), with sd the spread of per-duel shares.
  v1 released it for 20 voters; with k voters the share's variance is the between-duel
  variance of the preference plus the within-duel binomial part m(1 - m) - between, over k,
  so the released spread also gives it for 5 voters. The 2026 replication released no
  spread: the median v1 spread is assumed (and said).
- A relative change rate(trained)/rate(base) - 1 is tested on the log scale with the
  delta-method variance (1 - p1)/(n p1) + (1 - p0)/(n p0) of independent arms, which
  ignores the pairing by anchor (conservative when the pairs are positively related). No
  v1 probe rate was released, so v1's figures are shown at assumed base rates.

    >>> from moloch.power import power_table
    >>> power_table()            # one row per published effect and design
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import norm

from .released import load_published

ALPHA, POWER = 0.05, 0.80
Z = float(norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER))  # about 2.80
DESIGNS = {"v1": (1024, 20), "smoke": (16, 5), "2026": (1024, 25)}  # (test anchors, voters)
BASE_RATES = (0.05, 0.10, 0.20, 0.30)  # assumed for v1's misalignment figures


def share_sd(spread: float, mean: float, voters: int, released_voters: int = 20) -> float:
    """The sd of per-duel vote shares with ``voters`` voters, from one released with another."""
    within = mean * (1 - mean)  # E[p(1-p)] + Var(p): the binomial part's ceiling
    between = max((spread**2 - within / released_voters) / (1 - 1 / released_voters), 0.0)
    return float(np.sqrt(between + (within - between) / voters))


def win_rate_mde(sd: float, anchors: int) -> float:
    """The smallest win-rate excess over 0.5 found with 80% power at 5% (two-sided)."""
    return Z * sd / np.sqrt(anchors)


def anchors_for_win_rate(excess: float, sd: float) -> float:
    return float((Z * sd / excess) ** 2) if excess else float("inf")


def _log_variance(base: float, change: float) -> float:
    """n x the variance of log(p1 / p0) for independent arms (delta method)."""
    trained = base * (1 + change)
    return (1 - trained) / trained + (1 - base) / base


def anchors_for_change(base: float, change: float) -> float:
    """Test anchors for which a relative ``change`` at ``base`` is found with 80% power."""
    if change <= -1 or base * (1 + change) >= 1 or change == 0:
        return float("inf")
    return float(Z**2 * _log_variance(base, change) / np.log1p(change) ** 2)


def change_mde(base: float, anchors: int) -> float:
    """The smallest relative increase found with 80% power at 5% with ``anchors`` anchors."""
    low, high = 1e-4, 1 / base - 1 - 1e-9  # the trained rate stays below 1
    if anchors_for_change(base, high) > anchors:
        return float("inf")
    for _ in range(100):  # anchors_for_change decreases with the change: bisect
        mid = (low + high) / 2
        low, high = (mid, high) if anchors_for_change(base, mid) > anchors else (low, mid)
    return high


def power_table(published: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per published effect and design: the effect, the MDE and the anchors needed."""
    published = load_published() if published is None else published
    rows = []
    v1 = published[published["claim_id"].str.startswith("v1_competition")]
    median_spread = float(v1["spread"].median())
    for _, c in published[published["metric"] == "win_rate_second_method"].iterrows():
        family = "2026" if c["claim_id"].startswith("r2026") else "v1"
        spread = float(c["spread"]) if pd.notna(c["spread"]) else median_spread
        excess = float(c["value"]) - 0.5
        designs = [family, "smoke"] if family == "v1" else ["2026"]
        for design in designs:
            anchors, voters = DESIGNS[design]
            released_voters = int(c["n_voters"]) if pd.notna(c["n_voters"]) else 20
            sd = share_sd(spread, float(c["value"]), voters, released_voters)
            rows.append({
                "claim_id": c["claim_id"], "effect": "win-rate excess", "published": excess,
                "design": design, "anchors": anchors, "voters": voters,
                "assumption": "" if pd.notna(c["spread"]) else "median v1 spread",
                "mde": win_rate_mde(sd, anchors),
                "anchors_for_80pct": anchors_for_win_rate(abs(excess), sd),
            })  # fmt: skip
    changes = published[~published["metric"].isin(["win_rate_second_method", "performance"])]
    for _, c in changes[~changes["metric"].str.startswith("probe_rate")].iterrows():
        for base in BASE_RATES:
            for design in ("v1", "smoke"):
                anchors, _ = DESIGNS[design]
                rows.append({
                    "claim_id": c["claim_id"], "effect": "relative change",
                    "published": float(c["value"]) / 100, "design": design, "anchors": anchors,
                    "voters": None, "assumption": f"base rate {base:.0%}",
                    "mde": change_mde(base, anchors),
                    "anchors_for_80pct": anchors_for_change(base, float(c["value"]) / 100),
                })  # fmt: skip
    rows += _r2026_changes(published)
    return pd.DataFrame(rows)


def _r2026_changes(published: pd.DataFrame) -> list[dict]:
    """The 2026 replication's trained-vs-base probe changes at its released base rates."""
    rates = published[published["metric"].str.startswith("probe_rate")].copy()
    rates["key"] = rates["claim_id"].str.rsplit(".", n=1).str[0]
    base = rates[rates["comparison"] == "base"].set_index("key")["value"]
    rows = []
    for _, c in rates[rates["comparison"] != "base"].iterrows():
        b = base.get(c["key"])
        if b is None or not 0 < b < 1:
            continue
        change = float(c["value"]) / float(b) - 1
        anchors, _ = DESIGNS["2026"]
        rows.append({
            "claim_id": c["claim_id"], "effect": "relative change", "published": change,
            "design": "2026", "anchors": anchors, "voters": None,
            "assumption": f"released base rate {float(b):.1%}",
            "mde": change_mde(float(b), anchors),
            "anchors_for_80pct": anchors_for_change(float(b), change),
        })  # fmt: skip
    return rows
