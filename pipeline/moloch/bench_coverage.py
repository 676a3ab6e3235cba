"""Coverage and verdict benchmark: do the intervals hold, and can a verdict be trusted?

Two parts, written to ``data/runs/bench/coverage.json`` and ``data/runs/bench/verdicts.json``:

1. **Coverage per scenario** (never pooled): for every interval type the package uses, the
   share of nominal 95% intervals that contain a known truth, over the regimes runs live in:
   n in {16, 64, 256, 1,024} duels or anchors, k in {5, 20} voters, per-duel preference spread
   like v1's (about 0.27), rates 0.01 to 0.35 and paired rates from sparse (0.02) to common.
   Each scenario is ``supported`` (coverage within the goal), ``conservative`` (above it:
   valid but wide) or ``fails`` (below it), next to the regime ``moloch.stats.coverage_regime``
   assigns it, so the rule the report flags runs with is checked against measurement.
   A persona-effect scenario shows which population each win-rate interval is about.
2. **Verdict error rates per claim family** (``moloch.claims.decide`` on simulated cells):
   the share of ``reproduced`` verdicts under a null truth (no effect) and the shares of
   each verdict under the truth = published value plus the authors' own sampling noise, at
   the paper's design (1,024 anchors, 20 voters) and the smoke profile's (16, 5).

    python -m moloch.bench_coverage                  # the full benchmark (a few minutes)
    python -m moloch.bench_coverage --sims 100       # a quick look
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit, logit

from . import stats
from .claims import decide, load_registry
from .files import write_atomic
from .paths import runs_dir
from .seeds import cell_seed

SEED = 20251007
RESAMPLES = 2_000
SIMS = 1_000
SCORE_SIMS = 4_000  # closed-form intervals are cheap: more data sets
GOAL = (0.93, 0.97)
CONCENTRATION = 3.0  # per-duel preference ~ Beta(m c, (1 - m) c): per-duel share sd ~0.27
WIN_MEAN = 0.55
SIZES = (16, 64, 256, 1024)
RATES = (0.01, 0.05, 0.15, 0.35)
# Paired (trained, base) labels: base rate, trained rate, and P(both yes) (positively related).
PAIRED = {
    "sparse": (0.03, 0.02, 0.01),
    "moderate": (0.15, 0.10, 0.06),
    "common": (0.35, 0.30, 0.20),
}
PERSONA_SD = 0.8  # persona effect on the log-odds of preferring the second method
DESIGNS = {"paper": (1024, 20), "smoke": (16, 5)}  # (test anchors, voters)


@dataclass(frozen=True)
class Scenario:
    kind: str  # cluster_win_rate | probe_rate | paired_difference | paired_ratio
    size: int
    voters: int | None = None
    param: str | float | None = None  # probe_rate: the rate; paired: a PAIRED key


def scenarios() -> list[Scenario]:
    out = [Scenario("cluster_win_rate", n, k) for n in SIZES for k in (5, 20)]
    out += [Scenario("probe_rate", n, None, p) for n in SIZES for p in RATES]
    out += [
        Scenario(kind, n, None, name)
        for kind in ("paired_difference", "paired_ratio")
        for n in SIZES
        for name in PAIRED
    ]
    return out


def _joint(name: str) -> tuple[float, float, float, float]:
    """P(t, b) for (1,1), (1,0), (0,1), (0,0) of a PAIRED scenario."""
    t, b, both = PAIRED[name]
    return both, t - both, b - both, 1 - t - b + both


def truth(s: Scenario) -> float:
    if s.kind == "cluster_win_rate":
        return WIN_MEAN
    if s.kind == "probe_rate":
        return float(s.param)
    t, b, _ = PAIRED[s.param]
    return t - b if s.kind == "paired_difference" else t / b - 1


def _draw_votes(rng, n: int, k: int, mean: float, concentration: float = CONCENTRATION):
    """Votes for the second method per duel (k voters each)."""
    pref = rng.beta(mean * concentration, (1 - mean) * concentration, n)
    return rng.binomial(k, pref), np.full(n, k)


def _draw_labels(rng, n: int, joint) -> tuple[np.ndarray, np.ndarray]:
    cell = rng.choice(4, size=n, p=joint)
    return np.isin(cell, (0, 1)).astype(float), np.isin(cell, (0, 2)).astype(float)


def _interval(s: Scenario, rng, resamples: int) -> tuple[float, float, int]:
    """(low, high, events) of one simulated data set."""
    if s.kind == "cluster_win_rate":
        second, valid = _draw_votes(rng, s.size, s.voters, WIN_MEAN)
        est = stats.win_rate_from_counts(second, valid, 0, int(rng.integers(2**32)), resamples)
        return est.ci_low, est.ci_high, s.size
    if s.kind == "probe_rate":
        k = int(rng.binomial(s.size, s.param))
        low, high, _ = stats.rate_interval(k, s.size)
        return low, high, min(k, s.size - k)
    t, b = _draw_labels(rng, s.size, _joint(s.param))
    if s.kind == "paired_difference":
        return (*stats.newcombe_difference(t, b), int(min(t.sum(), b.sum())))
    if b.sum() == 0:
        return float("nan"), float("nan"), 0
    low, high = stats.mover_ratio(t, b)
    return low - 1, high - 1, int(min(t.sum(), b.sum()))


def status(coverage: float) -> str:
    if coverage < GOAL[0]:
        return "fails"
    return "supported" if coverage <= GOAL[1] else "conservative"


def run_scenario(s: Scenario, sims: int, resamples: int, seed: int) -> dict:
    """Coverage of one scenario's intervals over simulated data sets."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    sims = sims if s.kind == "cluster_win_rate" else max(sims, SCORE_SIMS)
    rows = np.array([_interval(s, rng, resamples) for _ in range(sims)], dtype=float)
    low, high, events = rows[:, 0], rows[:, 1], rows[:, 2]
    defined = np.isfinite(low)
    target = truth(s)
    covered = (low <= target) & (target <= high)
    coverage = float(covered[defined].mean()) if defined.any() else float("nan")
    finite = defined & np.isfinite(high)
    expected_events = s.size * (PAIRED[s.param][1] if s.kind.startswith("paired") else 1.0)
    if s.kind == "probe_rate":
        expected_events = s.size * min(s.param, 1 - s.param)
    return {
        "kind": s.kind,
        "size": s.size,
        "voters": s.voters,
        "param": s.param,
        "truth": target,
        "n_sims": int(sims),
        "undefined": int((~defined).sum()),
        "coverage": coverage,
        "status": status(coverage),
        "regime_rule": stats.coverage_regime(s.kind, s.size, expected_events),
        "mean_width": float(np.mean((high - low)[finite])) if finite.any() else float("nan"),
        "median_events": float(np.median(events)),
        "seed": seed,
        "time_s": round(time.perf_counter() - start, 2),
    }


def persona_effect(sims: int, resamples: int, seed: int, n: int = 64, k: int = 20) -> dict:
    """Which population each win-rate interval is about, when personas differ in taste.

    Each duel has a preference p_i; persona j shifts its log-odds by u_j ~ N(0, 0.8). The
    cluster interval is about the fixed audience drawn; the crossed interval about the
    population of personas. Coverage of the population's win rate by each.
    """
    rng = np.random.default_rng(seed)
    population = float(
        expit(logit(rng.beta(WIN_MEAN * 3, (1 - WIN_MEAN) * 3, 200_000))
              + rng.normal(0, PERSONA_SD, 200_000)).mean()
    )  # fmt: skip
    start = time.perf_counter()
    cluster = crossed = fixed = 0
    for _ in range(sims):
        pref = logit(np.clip(rng.beta(WIN_MEAN * 3, (1 - WIN_MEAN) * 3, n), 1e-6, 1 - 1e-6))
        taste = rng.normal(0, PERSONA_SD, k)
        prob = expit(pref[:, None] + taste[None, :])
        audience = float(prob.mean())  # the win rate for this very audience
        votes = rng.random((n, k)) < prob
        table = pd.DataFrame(
            {"anchor_id": np.repeat(np.arange(n), k), "voter": np.tile(np.arange(k), n),
             "choice": np.where(votes.ravel(), "second", "first")}
        )  # fmt: skip
        s = int(rng.integers(2**32))
        est = stats.win_rate(table, s, resamples)
        low, high = stats.crossed_interval(table, s, resamples)
        cluster += est.ci_low <= population <= est.ci_high
        fixed += est.ci_low <= audience <= est.ci_high
        crossed += low <= population <= high
    return {
        "duels": n,
        "voters": k,
        "persona_sd": PERSONA_SD,
        "n_sims": sims,
        "population_truth": population,
        "cluster_covers_this_audience": fixed / sims,
        "cluster_covers_the_population": cluster / sims,
        "crossed_covers_the_population": crossed / sims,
        "seed": seed,
        "time_s": round(time.perf_counter() - start, 2),
    }


# --- verdicts --------------------------------------------------------------------------------


def _simulated_cell(rng, claim, design, truth_value: float, resamples: int, base_rate: float):
    """(estimate, low, high, n) of one simulated cell of ``claim`` at ``design``."""
    n, k = design
    stat = claim["statistic"]
    if stat in ("win_rate_second_v1", "performance_pp"):
        win = truth_value if stat != "performance_pp" else 0.5 + truth_value / 100
        second, valid = _draw_votes(rng, n, k, float(np.clip(win, 0.01, 0.99)))
        est = stats.win_rate_from_counts(
            second, valid, 0, int(rng.integers(2**32)), resamples, decimals=2
        )
        scale, shift = (100.0, -50.0) if stat == "performance_pp" else (1.0, 0.0)
        return (
            est.estimate * scale + shift,
            est.ci_low * scale + shift,
            est.ci_high * scale + shift,
            n,
        )
    if stat == "probe_rate":
        rate = float(np.clip(truth_value, 0.0, 1.0))
        yes = int(rng.binomial(n, rate))
        low, high, _ = stats.rate_interval(yes, n)
        return yes / n, low, high, n
    # relative change in %: the trained rate is base * (1 + truth / 100)
    trained = float(np.clip(base_rate * (1 + truth_value / 100), 0.0, 1.0))
    both = min(trained, base_rate) * 0.5
    joint = (both, trained - both, base_rate - both, 1 - trained - base_rate + both)
    t, b = _draw_labels(rng, n, joint)
    est = stats.paired_change_from_arrays(t, b, "relative_change")
    return est.estimate * 100, est.ci_low * 100, est.ci_high * 100, n


def _null(claim) -> float:
    """The value the claim's statistic takes when there is no effect."""
    return {"win_rate_second_v1": 0.5, "performance_pp": 0.0, "relative_change": 0.0}.get(
        claim["statistic"], float(claim["published"]) + 2 * float(claim["margin"])
    )


def verdict_rates(sims: int, resamples: int, seed: int, base_rate: float = 0.10) -> list[dict]:
    """Per claim family and design: the verdicts ``decide`` gives on simulated runs.

    An abstract figure has as many candidate cells as trained (model, method) cells (4):
    under the null all have no effect; under the truth one of them carries the published
    figure. Relative changes use a base rate of ``base_rate`` (no v1 rate was released).
    A rate claim (2026 probe rates) has no "no effect": its null is two margins away.
    """
    registry = load_registry()
    rng = np.random.default_rng(seed)
    out = []
    for family, claims in registry.groupby(registry["claim_id"].str.split(".").str[0]):
        for design_name, design in DESIGNS.items():
            for truth_name in ("null", "published"):
                start = time.perf_counter()
                counts = dict.fromkeys(("reproduced", "differs", "inconclusive"), 0)
                for _, claim in claims.iterrows():
                    published = float(claim["published"])
                    pse = None if pd.isna(claim["published_se"]) else float(claim["published_se"])
                    candidates = 1 if claim["tolerance"] == "equivalence" or pd.notna(
                        claim["identified_cell"]) else 4  # fmt: skip
                    for _ in range(sims):
                        value = published + (rng.normal(0, pse) if pse else 0.0)
                        truths = [value if truth_name == "published" else _null(claim)]
                        truths += [_null(claim)] * (candidates - 1)
                        cells = [
                            _simulated_cell(rng, claim, design, v, resamples, base_rate)
                            for v in truths
                        ]
                        usable = [c for c in cells if np.isfinite(c[0])]
                        if not usable:
                            counts["inconclusive"] += 1
                            continue
                        verdict = decide(
                            published, pse, float(claim["margin"]),
                            [c[:3] for c in usable], [c[3] for c in usable], 0.95,
                            0 if candidates == 1 else None,
                        )  # fmt: skip
                        counts[verdict.status] += 1
                total = sum(counts.values())
                out.append(
                    {
                        "family": family,
                        "design": design_name,
                        "anchors": design[0],
                        "voters": design[1],
                        "truth": truth_name,
                        "claims": len(claims),
                        "n_sims": total,
                        **{k: v / total for k, v in counts.items()},
                        "base_rate_assumed": base_rate,
                        "time_s": round(time.perf_counter() - start, 2),
                    }
                )
    return out


# --- the run ---------------------------------------------------------------------------------


def run(sims: int = SIMS, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[dict, dict]:
    from .bench_runtime import machine  # cores, CPU flags and versions, as every benchmark

    started = time.monotonic()
    rows = [
        run_scenario(s, sims, resamples, cell_seed(seed, s.kind, s.size, s.voters, s.param))
        for s in scenarios()
    ]
    coverage = {
        "machine": machine(),
        "confidence": stats.DEFAULT_CONFIDENCE,
        "goal": list(GOAL),
        "resamples": resamples,
        "sims_per_bootstrap_scenario": sims,
        "sims_per_score_scenario": max(sims, SCORE_SIMS),
        "seed": seed,
        "scenarios": rows,
        "persona_effect": persona_effect(max(sims // 5, 50), resamples // 2, seed + 1),
        "summary": {
            kind: {
                s: sum(r["status"] == s for r in rows if r["kind"] == kind)
                for s in ("supported", "conservative", "fails")
            }
            for kind in dict.fromkeys(r["kind"] for r in rows)
        },  # fmt: skip
    }
    coverage["time_s"] = round(time.monotonic() - started, 1)
    verdicts = {
        "machine": coverage["machine"],
        "seed": seed,
        "sims_per_claim": max(sims // 10, 20),
        "resamples": resamples // 4,
        "rates": verdict_rates(max(sims // 10, 20), resamples // 4, seed + 2),
    }
    return coverage, verdicts


def write(report: dict, path: Path) -> Path:
    return write_atomic(path, json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=SIMS, help="data sets per scenario")
    parser.add_argument("--resamples", type=int, default=RESAMPLES)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=runs_dir() / "bench")
    args = parser.parse_args(argv)
    coverage, verdicts = run(args.sims, args.resamples, args.seed)
    paths = [
        write(coverage, args.out / "coverage.json"),
        write(verdicts, args.out / "verdicts.json"),
    ]
    for r in coverage["scenarios"]:
        print(
            f"{r['kind']:18s} n {r['size']:5d} k {r['voters'] or '-':>2} {str(r['param'] or ''):9s}"
            f" coverage {r['coverage']:.3f} {r['status']:12s} (rule: {r['regime_rule']})"
        )
    print("persona effect:", json.dumps(coverage["persona_effect"]))
    for r in verdicts["rates"]:
        print(
            f"{r['family']:18s} {r['design']:5s} {r['truth']:9s} reproduced {r['reproduced']:.3f}"
            f" inconclusive {r['inconclusive']:.3f} differs {r['differs']:.3f}"
        )
    print("wrote", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
