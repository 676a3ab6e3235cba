"""Interval estimates for the study's statistics, as tidy rows.

- Win rate of the second method of a pair: per duel, the share of valid votes that went to
  the second method, then the mean over duels; as the authors computed it (each duel's
  share rounded to 0.01 first, statistic ``win_rate_second_v1``) and unrounded
  (``win_rate_second``). Interval: a cluster bootstrap over duels (BCa), which is about the
  study's fixed audience; a crossed bootstrap over duels and personas beside it
  (``crossed_low``/``crossed_high``) is about a population of personas like these.
- Probe rate: the share of valid "Yes" labels, with a Wilson score interval.
- Trained vs base, paired by anchor: the difference of rates, with Newcombe's hybrid score
  interval for paired proportions, and the relative change rate(trained) / rate(base) - 1,
  with the MOVER interval for a ratio of paired proportions (both combine the two Wilson
  intervals with the correlation of the pairs; both hold at 16 anchors and with few events,
  where a bootstrap collapses to a zero-width interval). Undefined when the base rate is 0.

Bootstrap intervals are BCa where BCa is defined and a percentile interval where it is not
(a degenerate bootstrap distribution); ``Estimate.interval_method`` says which.
Every result records its seed, sample size, invalid count and number of resamples, and every
cell also carries a sensitivity range: the estimate with every invalid vote or label counted
as one outcome, then as the other. Rates and changes are fractions (0.05 = 5 %). Measured
coverage, per scenario, is in ``data/runs/bench/coverage.json`` (``moloch.bench_coverage``).

    >>> from moloch.stats import tidy_cells
    >>> cells = tidy_cells(votes_df, labels_df, seed=20251007, resamples=10_000)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri
from statsmodels.stats.proportion import proportion_confint

from .errors import DataError
from .seeds import cell_seed
from .tasks import PROBE_METRIC

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
# Bootstrap index matrices are built in blocks of about this many entries (memory bound).
_BLOCK_ENTRIES = 4_000_000
CHOICES = ("first", "second")


@dataclass(frozen=True)
class Estimate:
    """One point estimate with its interval and how it was obtained."""

    estimate: float
    ci_low: float
    ci_high: float
    interval_method: str  # how the interval was made: "cluster_bootstrap/bca", "wilson"...
    seed: int | None
    n: int  # units behind the estimate: duels, labels or paired anchors
    n_invalid: int  # invalid votes or labels among the input rows
    resamples: int
    confidence: float
    n_excluded: int = 0  # units left out: duels with no valid vote, unpaired anchors

    def to_row(self) -> dict[str, object]:
        return asdict(self)


# ---------------------------------------------------------------- bootstrap machinery


def _resample(
    rng: np.random.Generator, n: int, resamples: int, stat: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply ``stat`` to blocks of bootstrap index rows (resamples x n) and stack the results."""
    block = max(1, _BLOCK_ENTRIES // max(n, 1))
    out = np.empty(resamples)
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        idx = rng.integers(0, n, size=(rows, n), dtype=np.int32)
        out[start : start + rows] = stat(idx)
    return out


def _percentile(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    boot = boot[~np.isnan(boot)]
    if boot.size == 0:
        return float("nan"), float("nan")
    # No interpolation when infinities are present (inf - inf would give nan).
    how = "linear" if np.all(np.isfinite(boot)) else "inverted_cdf"
    lo, hi = np.quantile(boot, [alpha, 1 - alpha], method=how)
    return float(lo), float(hi)


def bca_interval(
    theta: float, boot: np.ndarray, jack: np.ndarray, confidence: float
) -> tuple[float, float, str]:
    """BCa interval from bootstrap replicates and jackknife values; percentile fallback.

    Returns (low, high, kind) with kind "bca" or "percentile" (when the bias correction or
    the acceleration is undefined: all replicates equal, theta outside their range, a
    constant jackknife, or non-finite values).
    """
    finite = np.all(np.isfinite(boot)) and np.all(np.isfinite(jack)) and np.isfinite(theta)
    if finite and boot.size and np.ptp(boot) > 0:
        # Replicates within rounding error of theta count as ties (half below): otherwise
        # float noise in sums would decide the bias correction for discrete statistics.
        tie = np.abs(boot - theta) <= 1e-9 * max(1.0, abs(theta))
        below = np.mean((boot < theta) & ~tie) + 0.5 * np.mean(tie)
        spread = jack.mean() - jack
        denom = 6.0 * np.sum(spread**2) ** 1.5
        if 0.0 < below < 1.0 and denom > 0:
            z0 = ndtri(below)
            accel = np.sum(spread**3) / denom
            alpha = (1 - confidence) / 2
            z = ndtri(np.array([alpha, 1 - alpha]))
            levels = ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z)))
            if np.all(np.isfinite(levels)):
                lo, hi = np.quantile(boot, levels)
                return float(lo), float(hi), "bca"
    lo, hi = _percentile(boot, confidence)
    return lo, hi, "percentile"


def _loo_means(x: np.ndarray) -> np.ndarray:
    """Leave-one-out means (the jackknife values of a mean)."""
    if x.size < 2:
        return np.zeros(x.size)
    return (x.sum() - x) / (x.size - 1)


# ---------------------------------------------------------------- win rates


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{what} lacks column(s) {missing}; it has {list(df.columns)}. "
            "Pass the table as written by the stage (docs/protocol.md §10)."
        )


def _single(df: pd.DataFrame, column: str, what: str) -> None:
    if column in df.columns and df[column].nunique(dropna=False) > 1:
        raise DataError(
            f"{what} mixes {column} values {sorted(map(str, df[column].unique()))}; "
            f"select one {column} before estimating"
        )


def _vote_choices(votes: pd.DataFrame) -> pd.Series:
    """The choice column with invalid votes (null choice or valid=False) as None."""
    _require(votes, ("anchor_id", "choice"), "votes table")
    choice = votes["choice"].astype(object).where(votes["choice"].notna(), None)
    bad = sorted({str(c) for c in choice.dropna() if c not in CHOICES})
    if bad:
        raise DataError(
            f"votes table has choice value(s) {bad}; expected 'first', 'second' or null"
        )
    if "valid" in votes.columns:
        choice = choice.where(votes["valid"].fillna(False).astype(bool), None)
    return choice


def duel_counts(votes: pd.DataFrame) -> pd.DataFrame:
    """Per duel (anchor_id): votes for the first and second method and invalid votes."""
    choice = _vote_choices(votes)
    frame = pd.DataFrame(
        {
            "anchor_id": votes["anchor_id"].to_numpy(),
            "first": (choice == "first").to_numpy(),
            "second": (choice == "second").to_numpy(),
            "invalid": choice.isna().to_numpy(),
        }
    )
    counts = frame.groupby("anchor_id", sort=True)[["first", "second", "invalid"]].sum()
    return counts.astype(int).reset_index()


def win_rate(
    votes: pd.DataFrame,
    seed: int,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    decimals: int | None = None,
) -> Estimate:
    """Win rate of the second method of one pair (one task, model and pair).

    ``votes``: one row per ballot with anchor_id (the duel) and choice. Duels with no valid
    vote are excluded and counted in ``n_excluded``. ``decimals=2`` rounds each duel's share
    as the authors did before averaging.
    """
    _single(votes, "pair", "votes table")
    counts = duel_counts(votes)
    return win_rate_from_counts(
        counts["second"].to_numpy(),
        (counts["first"] + counts["second"]).to_numpy(),
        int(counts["invalid"].sum()),
        seed,
        resamples,
        confidence,
        decimals,
    )


def win_rate_from_counts(
    second: np.ndarray,
    valid: np.ndarray,
    n_invalid: int,
    seed: int,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    decimals: int | None = None,
) -> Estimate:
    """``win_rate`` from per-duel counts: votes for the second method and valid votes."""
    second, valid = np.asarray(second), np.asarray(valid)
    keep = valid > 0
    share = second[keep] / valid[keep]
    common = dict(
        seed=seed,
        n=int(keep.sum()),
        n_invalid=int(n_invalid),
        resamples=resamples,
        confidence=confidence,
        n_excluded=int((~keep).sum()),
    )
    if share.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), "undefined", **common)
    if decimals is not None:
        share = np.round(share, decimals)
    theta = float(share.mean())
    rng = np.random.default_rng(seed)
    boot = _resample(rng, share.size, resamples, lambda idx: share[idx].mean(axis=1))
    lo, hi, kind = bca_interval(theta, boot, _loo_means(share), confidence)
    return Estimate(theta, lo, hi, f"cluster_bootstrap/{kind}", **common)


def crossed_interval(
    votes: pd.DataFrame,
    seed: int,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float]:
    """Percentile interval of the win rate when duels *and* personas are resampled.

    The cluster bootstrap treats the audience as fixed: its interval is about these
    personas. Resampling personas too (independently of duels: a crossed design) makes
    the interval about a population of personas like them, and wider wherever personas
    differ in taste. Resampled duels without a valid vote among the resampled voters
    are left out of that resample's mean.
    """
    _require(votes, ("anchor_id", "voter", "choice"), "votes table")
    choice = _vote_choices(votes)
    frame = pd.DataFrame(
        {"duel": votes["anchor_id"].to_numpy(), "voter": votes["voter"].to_numpy(),
         "second": choice.map({"second": 1.0, "first": 0.0}).to_numpy(dtype=float)}
    )  # fmt: skip
    grid = frame.pivot_table(index="duel", columns="voter", values="second", aggfunc="first")
    second = np.nan_to_num(grid.to_numpy(), nan=0.0)
    valid = (~np.isnan(grid.to_numpy(dtype=float))).astype(float)
    n, k = second.shape
    if n == 0 or k == 0 or valid.sum() == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for r in range(resamples):
        rows, cols = rng.integers(0, n, n), rng.integers(0, k, k)
        wins = second[np.ix_(rows, cols)].sum(axis=1)
        counted = valid[np.ix_(rows, cols)].sum(axis=1)
        has = counted > 0
        out[r] = (wins[has] / counted[has]).mean() if has.any() else np.nan
    return _percentile(out, confidence)


def win_rate_bounds(votes: pd.DataFrame) -> tuple[float, float]:
    """Win rate with every invalid vote counted for the first method, then for the second."""
    counts = duel_counts(votes)
    total = (counts["first"] + counts["second"] + counts["invalid"]).to_numpy()
    if total.size == 0:
        return float("nan"), float("nan")
    second = counts["second"].to_numpy()
    low = np.mean(second / total)
    high = np.mean((second + counts["invalid"].to_numpy()) / total)
    return float(low), float(high)


# ---------------------------------------------------------------- probe rates


def _labels(labels: pd.DataFrame) -> pd.Series:
    """Label column as floats 1.0 / 0.0 with invalid labels as NaN."""
    _require(labels, ("anchor_id", "label"), "labels table")
    values = pd.to_numeric(labels["label"], errors="coerce").astype(float)
    bad = sorted({v for v in values.dropna() if v not in (0.0, 1.0)})
    if bad:
        raise DataError(f"labels table has label value(s) {bad}; expected 1, 0 or null")
    if "valid" in labels.columns:
        values = values.where(labels["valid"].fillna(False).astype(bool))
    return values


def wilson(successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for successes out of n (statsmodels; its default is Wald)."""
    if n <= 0:
        return float("nan"), float("nan")
    lo, hi = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    # statsmodels leaves float noise at the ends (5e-17 for 0 successes): clip to the rate.
    rate = successes / n
    return float(np.clip(lo, 0.0, rate)), float(np.clip(hi, rate, 1.0))


def rate_interval(
    successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float, str]:
    """(low, high, method) for a rate: Wilson, or Clopper-Pearson where either outcome has
    fewer than MIN_EVENTS. Near 0, Wilson's lower limit passes over the truth (coverage 0.85
    at n = 16 and rate 0.01 in the coverage benchmark); the exact interval never under-covers.
    """
    if n <= 0:
        return float("nan"), float("nan"), "undefined"
    if min(successes, n - successes) >= MIN_EVENTS:
        return (*wilson(successes, n, confidence), "wilson")
    lo, hi = proportion_confint(successes, n, alpha=1 - confidence, method="beta")
    rate = successes / n
    return float(np.clip(lo, 0.0, rate)), float(np.clip(hi, rate, 1.0)), "clopper_pearson"


def probe_rate(labels: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Share of valid labels that are 1, with :func:`rate_interval` (one method and probe)."""
    _single(labels, "method", "labels table")
    _single(labels, "probe_id", "labels table")
    values = _labels(labels)
    valid = values.dropna()
    n, k = int(valid.size), int(valid.sum())
    lo, hi, how = rate_interval(k, n, confidence)
    estimate = k / n if n else float("nan")
    return Estimate(estimate, lo, hi, how, None, n, int(values.isna().sum()), 0, confidence, 0)


def probe_rate_bounds(labels: pd.DataFrame) -> tuple[float, float]:
    """Probe rate with every invalid label counted as 0, then as 1."""
    values = _labels(labels)
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.fillna(0).mean()), float(values.fillna(1).mean())


# ---------------------------------------------------------------- trained vs base


STATISTICS = ("difference", "relative_change")


def _paired(trained: pd.DataFrame, base: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """Trained and base labels side by side per anchor; (table, invalid labels, excluded)."""
    sides = {}
    for name, table in (("trained", trained), ("base", base)):
        dup = table["anchor_id"][table["anchor_id"].duplicated()]
        if len(dup):
            raise DataError(
                f"{name} labels list anchor {dup.iloc[0]!r} more than once; "
                "pass one method and one probe"
            )
        sides[name] = pd.Series(_labels(table).to_numpy(), index=table["anchor_id"].to_numpy())
    n_invalid = int(sides["trained"].isna().sum() + sides["base"].isna().sum())
    joined = pd.concat(sides, axis=1, join="outer")
    complete = joined.dropna()
    return complete, n_invalid, int(len(joined) - len(complete))


def _change(t: np.ndarray, b: np.ndarray, statistic: str) -> float:
    if statistic == "difference":
        return float(t.mean() - b.mean())
    return float(t.sum() / b.sum() - 1) if b.sum() > 0 else float("nan")


def _pair_table(t: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    """Anchors with (trained, base) labels (1,1), (1,0), (0,1), (0,0)."""
    t, b = np.asarray(t) > 0.5, np.asarray(b) > 0.5
    return int((t & b).sum()), int((t & ~b).sum()), int((~t & b).sum()), int((~t & ~b).sum())


def _phi(a: int, b: int, c: int, d: int) -> float:
    """The correlation of the paired labels, as Newcombe (1998) corrects it: a positive
    AD - BC is reduced by n/2 (not below 0), so a few concordant pairs cannot claim the
    perfect correlation that collapses an interval; 0 where a margin is empty."""
    den = (a + b) * (c + d) * (a + c) * (b + d)
    if den == 0:
        return 0.0
    n = a + b + c + d
    excess = a * d - b * c
    if excess > 0:
        excess = max(excess - n / 2, 0.0)
    return excess / float(np.sqrt(den))


def _margins(t, b, confidence: float):
    """The two rates of paired 0/1 labels, their Wilson limits and the pairs' correlation
    (what both score-type intervals combine); None without a pair."""
    a, b_, c, d = _pair_table(t, b)
    n = a + b_ + c + d
    if n == 0:
        return None
    rates = (a + b_) / n, (a + c) / n
    limits = wilson(a + b_, n, confidence), wilson(a + c, n, confidence)
    return (*rates, *limits, _phi(a, b_, c, d))


def newcombe_difference(t, b, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p(trained) - p(base) of paired 0/1 labels.

    Newcombe (1998), method 10: the Wilson intervals of the two rates, combined with the
    correlation of the pairs. Never zero-width while there is an anchor.
    """
    parts = _margins(t, b, confidence)
    if parts is None:
        return float("nan"), float("nan")
    p1, p2, (l1, u1), (l2, u2), r = parts
    low = (p1 - l1) ** 2 - 2 * r * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    high = (u1 - p1) ** 2 - 2 * r * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    delta = p1 - p2
    return max(-1.0, delta - float(np.sqrt(max(low, 0.0)))), min(
        1.0, delta + float(np.sqrt(max(high, 0.0)))
    )


def mover_ratio(t, b, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Interval for p(trained) / p(base) of paired 0/1 labels by MOVER (Fieller-type).

    The limits solve (p1 - R p2)^2 = (recovered variance of p1 - R p2) with each rate's
    Wilson limits and the pairs' correlation (Donner & Zou's method of variance estimates
    recovery). A degenerate lower quadratic gives 0; a base rate of 0 an infinite upper limit.
    """
    parts = _margins(t, b, confidence)
    if parts is None:
        return float("nan"), float("nan")
    p1, p2, (l1, u1), (l2, u2), r = parts
    lead = u2 * (2 * p2 - u2)
    half = p1 * p2 - r * (p1 - l1) * (u2 - p2)
    low = 0.0
    if lead > 0:
        low = (half - float(np.sqrt(max(half**2 - l1 * (2 * p1 - l1) * lead, 0.0)))) / lead
    lead = l2 * (2 * p2 - l2)
    half = p1 * p2 - r * (u1 - p1) * (p2 - l2)
    high = float("inf")
    if lead > 0:
        high = (half + float(np.sqrt(max(half**2 - u1 * (2 * p1 - u1) * lead, 0.0)))) / lead
    return max(low, 0.0), high


def paired_change(
    trained: pd.DataFrame,
    base: pd.DataFrame,
    statistic: str = "relative_change",
    confidence: float = DEFAULT_CONFIDENCE,
) -> Estimate:
    """Trained vs base probe labels, paired by anchor, with a score-type interval.

    statistic "difference": rate(trained) - rate(base) (Newcombe); "relative_change":
    rate(trained) / rate(base) - 1 (MOVER), undefined (method "undefined") when the base
    rate is 0. Anchors without a valid label on both sides are excluded and counted.
    """
    if statistic not in STATISTICS:
        raise DataError(f"unknown statistic {statistic!r}; choose one of {STATISTICS}")
    pairs, n_invalid, n_excluded = _paired(trained, base)
    return paired_change_from_arrays(
        pairs["trained"].to_numpy(), pairs["base"].to_numpy(), statistic, confidence,
        n_invalid, n_excluded,
    )  # fmt: skip


def paired_change_from_arrays(
    t: np.ndarray,
    b: np.ndarray,
    statistic: str = "relative_change",
    confidence: float = DEFAULT_CONFIDENCE,
    n_invalid: int = 0,
    n_excluded: int = 0,
) -> Estimate:
    """``paired_change`` from aligned 0/1 arrays of trained and base labels (one per anchor)."""
    if statistic not in STATISTICS:
        raise DataError(f"unknown statistic {statistic!r}; choose one of {STATISTICS}")
    t, b = np.asarray(t, dtype=float), np.asarray(b, dtype=float)
    common = dict(
        seed=None,
        n=int(t.size),
        n_invalid=int(n_invalid),
        resamples=0,
        confidence=confidence,
        n_excluded=int(n_excluded),
    )
    theta = _change(t, b, statistic) if t.size else float("nan")
    if not np.isfinite(theta):
        return Estimate(theta, float("nan"), float("nan"), "undefined", **common)
    if statistic == "difference":
        lo, hi = newcombe_difference(t, b, confidence)
        return Estimate(theta, lo, hi, "newcombe_score", **common)
    lo, hi = mover_ratio(t, b, confidence)
    return Estimate(theta, lo - 1, hi - 1, "mover_wilson", **common)


def change_bounds(
    trained: pd.DataFrame, base: pd.DataFrame, statistic: str = "relative_change"
) -> tuple[float, float]:
    """The change with invalid labels pushed towards no change and towards the most change.

    Low: invalid trained labels as 0 and invalid base labels as 1; high: the reverse.
    Anchors present on one side only are ignored.
    """
    if statistic not in STATISTICS:
        raise DataError(f"unknown statistic {statistic!r}; choose one of {STATISTICS}")
    sides = {
        name: pd.Series(_labels(table).to_numpy(), index=table["anchor_id"].to_numpy())
        for name, table in (("trained", trained), ("base", base))
    }
    both = pd.concat(sides, axis=1, join="inner")
    if both.empty:
        return float("nan"), float("nan")
    t, b = both["trained"], both["base"]
    low = _change(t.fillna(0).to_numpy(), b.fillna(1).to_numpy(), statistic)
    high = _change(t.fillna(1).to_numpy(), b.fillna(0).to_numpy(), statistic)
    return low, high


# ---------------------------------------------------------------- where intervals hold

# The sizes from which each interval type's coverage is within 0.93-0.97 in the coverage
# benchmark (moloch.bench_coverage, which reports each scenario beside this rule).
MIN_DUELS = 64  # cluster bootstrap of a win rate: below, BCa may under-cover
MIN_EVENTS = 10  # score intervals: with fewer events they over-cover (conservative); rates
# switch to the exact interval there (rate_interval), which over-covers too


def coverage_regime(kind: str, n: int, events: float) -> str:
    """``validated`` where the interval's coverage was measured near nominal; else why not.

    ``kind``: cluster_win_rate, probe_rate, paired_difference or paired_ratio; ``n``: duels
    or anchors; ``events``: the rarer outcome's count (the base arm's Yes for a change).
    """
    if kind == "cluster_win_rate":
        return "validated" if n >= MIN_DUELS else "not validated (few duels)"
    return "validated" if events >= MIN_EVENTS else "conservative (few events)"


# ---------------------------------------------------------------- tidy cells

CELL_COLUMNS = (
    "task",
    "model",
    "kind",
    "statistic",
    "pair",
    "method",
    "probe_id",
    "metric",
    "estimate",
    "ci_low",
    "ci_high",
    "interval_method",
    "seed",
    "n",
    "n_invalid",
    "n_excluded",
    "resamples",
    "confidence",
    "sensitivity_low",
    "sensitivity_high",
    "n_parser_disagreements",
    "crossed_low",
    "crossed_high",
    "coverage_regime",
)
# The win-rate statistics of a pair: unrounded, and as the authors computed it (each duel's
# share rounded to 0.01 before the mean: artsco/step2.2*.ipynb), for comparing with theirs.
WIN_RATE_STATISTICS = {"win_rate_second": None, "win_rate_second_v1": 2}


def parser_disagreements(*tables: pd.DataFrame, column: str) -> int | None:
    """Rows whose answer v1's reading and the tolerant parser read differently (``column``:
    ``letter`` for votes, ``label`` for labels); None when the tables lack both readings."""
    first, second = f"{column}_v1", f"{column}_tolerant"
    if not all(first in t.columns and second in t.columns for t in tables):
        return None
    # "no reading" is a value of its own here: both None is agreement
    return sum(
        int((t[first].astype(object).fillna("-") != t[second].astype(object).fillna("-")).sum())
        for t in tables
    )


def _cell(key: dict, est: Estimate, bounds: tuple[float, float], disagreements=None) -> dict:
    row = dict.fromkeys(CELL_COLUMNS)
    row.update(key)
    row.update(est.to_row())
    row["sensitivity_low"], row["sensitivity_high"] = bounds
    row["n_parser_disagreements"] = disagreements
    return row


def tidy_cells(
    votes: pd.DataFrame | None,
    labels: pd.DataFrame | None,
    seed: int,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> pd.DataFrame:
    """Every cell of a run: one row per statistic, with interval and sensitivity range.

    ``votes``: the compete votes tables (docs/protocol.md §10) of any tasks and models;
    ``labels``: the probe labels tables. Either may be None or empty.
    kind "win_rate" (statistics win_rate_second and win_rate_second_v1, per task, model and
    pair; the first with the crossed interval too),
    "probe_rate" (per task, model, method and probe) and "probe_change" (per task,
    model, trained method and probe; statistics "relative_change" and "difference").
    Each cell's bootstrap seed is derived from ``seed`` and the cell's key (``cell_seed``).
    """
    rows: list[dict] = []
    if votes is not None and len(votes):
        _require(votes, ("task", "model", "pair", "anchor_id", "choice"), "votes table")
        for (task, model, pair), group in votes.groupby(["task", "model", "pair"], sort=True):
            disagree = parser_disagreements(group, column="letter")
            for statistic, decimals in WIN_RATE_STATISTICS.items():
                s = cell_seed(seed, "win_rate", task, model, pair)
                est = win_rate(group, s, resamples, confidence, decimals)
                key = dict(
                    task=task,
                    model=model,
                    kind="win_rate",
                    statistic=statistic,
                    pair=pair,
                    method=str(pair).split("-")[-1],
                    metric="win_rate_second",
                )
                row = _cell(key, est, win_rate_bounds(group), disagree)
                row["coverage_regime"] = coverage_regime("cluster_win_rate", est.n, est.n)
                if decimals is None:
                    crossed = cell_seed(seed, "crossed", task, model, pair)
                    low, high = crossed_interval(group, crossed, resamples, confidence)
                    row.update(crossed_low=low, crossed_high=high)
                rows.append(row)
    if labels is not None and len(labels):
        _require(labels, ("task", "model", "method", "probe_id", "anchor_id", "label"), "labels")
        by_cell = dict(tuple(labels.groupby(["task", "model", "probe_id", "method"], sort=True)))
        for (task, model, probe_id, method), group in by_cell.items():
            metric = PROBE_METRIC.get(probe_id, probe_id)
            key = dict(
                task=task,
                model=model,
                kind="probe_rate",
                statistic="probe_rate",
                method=method,
                probe_id=probe_id,
                metric=metric,
            )
            disagree = parser_disagreements(group, column="label")
            rate = probe_rate(group, confidence)
            row = _cell(key, rate, probe_rate_bounds(group), disagree)
            yes = rate.estimate * rate.n if rate.n else 0.0
            row["coverage_regime"] = coverage_regime("probe_rate", rate.n, min(yes, rate.n - yes))
            rows.append(row)
            base = by_cell.get((task, model, probe_id, "base"))
            if method == "base" or base is None:
                continue
            for statistic in STATISTICS:
                est = paired_change(group, base, statistic, confidence)
                key.update(kind="probe_change", statistic=statistic, pair=f"base-{method}")
                disagree = parser_disagreements(group, base, column="label")
                row = _cell(key, est, change_bounds(group, base, statistic), disagree)
                pairs, _, _ = _paired(group, base)
                events = float(min(pairs["trained"].sum(), pairs["base"].sum()))
                kind = "paired_difference" if statistic == "difference" else "paired_ratio"
                row["coverage_regime"] = coverage_regime(kind, est.n, events)
                rows.append(row)
    cells = pd.DataFrame(rows, columns=list(CELL_COLUMNS))
    return cells.astype(
        {"seed": "Int64", "n": int, "n_invalid": int, "n_excluded": int,
         "n_parser_disagreements": "Int64"}
    )  # fmt: skip
