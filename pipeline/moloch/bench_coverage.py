"""Coverage benchmark: do the nominal 95 % intervals of ``moloch.stats`` cover the truth?

Simulates data sets with a known truth for each interval type (cluster and two-stage
bootstrap win rates, Wilson probe rates, paired bootstrap differences and ratios), at the
paper's size (1,024 duels or anchors, 20 voters) and a smaller one, and writes the share of
intervals that contain the truth, their mean width, the seed and the time taken to
``data/runs/bench/coverage.json``. The bootstrap uses 2,000 resamples here (10,000 in a
run) to fit in a few minutes on 2 CPU cores. Goal: every type's coverage in [0.93, 0.97].

    python -m moloch.bench_coverage                  # 500 data sets per scenario
    python -m moloch.bench_coverage --sims 100       # a quick look
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import stats
from .files import write_atomic
from .paths import runs_dir
from .seeds import cell_seed

SEED = 20251007
RESAMPLES = 2_000
SIMS = 500
WILSON_SIMS = 4_000  # Wilson intervals are closed-form: cheap, so more data sets
GOAL = (0.93, 0.97)
VOTERS = 20
INVALID_RATE = 0.02  # share of unparseable votes
# Per-duel preference ~ Beta(mean * c, (1 - mean) * c): with c = 3 the per-duel vote share
# has a standard deviation near 0.27, like the v1 competitions (0.22-0.33).
PREFERENCE_MEAN, CONCENTRATION = 0.55, 3.0
# Trained vs base labels per anchor: P(t, b) for (1,1), (1,0), (0,1), (0,0).
# Base rate 0.10, trained rate 0.15: difference 0.05, relative change +50 %.
JOINT = (0.06, 0.09, 0.04, 0.81)


@dataclass(frozen=True)
class Scenario:
    kind: str  # interval type
    size: int  # duels, labels or anchors
    param: float | None = None  # Wilson: the true rate


SCENARIOS = (
    Scenario("cluster_win_rate", 1024),
    Scenario("cluster_win_rate", 64),
    Scenario("two_stage_win_rate", 1024),
    Scenario("two_stage_win_rate", 64),
    Scenario("wilson_rate", 1024, 0.02),
    Scenario("wilson_rate", 1024, 0.15),
    Scenario("wilson_rate", 128, 0.15),
    Scenario("paired_difference", 1024),
    Scenario("paired_difference", 128),
    Scenario("ratio", 1024),
    Scenario("ratio", 256),
)


def _votes(rng: np.random.Generator, duels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-duel votes for the second method, valid votes and total invalid votes."""
    pref = rng.beta(PREFERENCE_MEAN * CONCENTRATION, (1 - PREFERENCE_MEAN) * CONCENTRATION, duels)
    invalid = rng.binomial(VOTERS, INVALID_RATE, duels)
    valid = VOTERS - invalid
    return rng.binomial(valid, pref), valid, int(invalid.sum())


def _labels(rng: np.random.Generator, anchors: int) -> tuple[np.ndarray, np.ndarray]:
    cell = rng.choice(4, size=anchors, p=JOINT)
    return np.isin(cell, (0, 1)).astype(float), np.isin(cell, (0, 2)).astype(float)


def _one(scenario: Scenario, rng: np.random.Generator, resamples: int) -> tuple[float, float]:
    """(ci_low, ci_high) of one simulated data set; the truth is ``truth(scenario)``."""
    seed = int(rng.integers(2**32))
    if scenario.kind.endswith("win_rate"):
        second, valid, invalid = _votes(rng, scenario.size)
        two_stage = scenario.kind.startswith("two_stage")
        est = stats.win_rate_from_counts(
            second, valid, invalid, seed, resamples, two_stage=two_stage
        )
    else:
        t, b = _labels(rng, scenario.size)
        statistic = "difference" if scenario.kind == "paired_difference" else "relative_change"
        est = stats.paired_change_from_arrays(t, b, seed, statistic, resamples)
    return est.ci_low, est.ci_high


def truth(scenario: Scenario) -> float:
    if scenario.kind.endswith("win_rate"):
        return PREFERENCE_MEAN
    if scenario.kind == "wilson_rate":
        return float(scenario.param)
    rate_t, rate_b = JOINT[0] + JOINT[1], JOINT[0] + JOINT[2]
    return rate_t - rate_b if scenario.kind == "paired_difference" else rate_t / rate_b - 1


def run_scenario(scenario: Scenario, sims: int, resamples: int, seed: int) -> dict:
    """Coverage of one scenario's intervals over ``sims`` simulated data sets."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    if scenario.kind == "wilson_rate":
        sims = max(sims, WILSON_SIMS)
        k = rng.binomial(scenario.size, scenario.param, sims)
        bounds = np.array([stats.wilson(int(x), scenario.size) for x in k])
    else:
        one: Callable[[], tuple[float, float]] = lambda: _one(scenario, rng, resamples)  # noqa: E731
        bounds = np.array([one() for _ in range(sims)])
    lo, hi = bounds[:, 0], bounds[:, 1]
    target = truth(scenario)
    finite = np.isfinite(lo) & np.isfinite(hi)
    return {
        "kind": scenario.kind,
        "size": scenario.size,
        "param": scenario.param,
        "truth": target,
        "n_sims": int(sims),
        "coverage": float(np.mean((lo <= target) & (target <= hi))),
        "mean_width": float(np.mean((hi - lo)[finite])) if finite.any() else float("nan"),
        "undefined": int((~finite).sum()),
        "seed": seed,
        "time_s": round(time.perf_counter() - start, 2),
    }


def run(sims: int = SIMS, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Every scenario; coverage pooled per interval type."""
    results = [
        run_scenario(s, sims, resamples, cell_seed(seed, s.kind, s.size, s.param))
        for s in SCENARIOS
    ]
    types: dict[str, dict] = {}
    for kind in dict.fromkeys(s.kind for s in SCENARIOS):
        rows = [r for r in results if r["kind"] == kind]
        n = sum(r["n_sims"] for r in rows)
        coverage = sum(r["coverage"] * r["n_sims"] for r in rows) / n
        types[kind] = {
            "coverage": coverage,
            "n_sims": n,
            "mean_width": float(np.mean([r["mean_width"] for r in rows])),
            "seed": seed,
            "time_s": round(sum(r["time_s"] for r in rows), 2),
            "within_goal": GOAL[0] <= coverage <= GOAL[1],
            "scenarios": rows,
        }
    return {
        "confidence": stats.DEFAULT_CONFIDENCE,
        "goal": list(GOAL),
        "resamples": resamples,
        "sims_per_scenario": sims,
        "seed": seed,
        "note": f"bootstrap with {resamples} resamples (runs use {stats.DEFAULT_RESAMPLES})",
        "types": types,
    }


def write(report: dict, path: Path) -> Path:
    return write_atomic(path, json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=SIMS, help="data sets per scenario")
    parser.add_argument("--resamples", type=int, default=RESAMPLES)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=runs_dir() / "bench" / "coverage.json")
    args = parser.parse_args(argv)
    report = run(args.sims, args.resamples, args.seed)
    path = write(report, args.out)
    for kind, row in report["types"].items():
        flag = "ok" if row["within_goal"] else "OUTSIDE GOAL"
        print(
            f"{kind:20s} coverage {row['coverage']:.3f} ({row['n_sims']} sims, "
            f"mean width {row['mean_width']:.4f}, {row['time_s']:.1f} s) {flag}"
        )
        for s in row["scenarios"]:
            print(f"    size {s['size']:5d} param {s['param']}: {s['coverage']:.3f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
