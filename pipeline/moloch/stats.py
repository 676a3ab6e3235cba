"""Interval estimates for the study's statistics, as tidy rows.

- Win rate of the second method of a pair: the authors' statistic (per duel, the share of
  valid votes that went to the second method; then the mean over duels), with a cluster
  bootstrap over duels or, optionally, a two-stage bootstrap (duels, then voters in a duel).
- Probe rate: the share of valid "Yes" labels, with a Wilson score interval.
- Trained vs base, paired by anchor: the difference of rates and the relative change
  (rate(trained) / rate(base) - 1), with a paired bootstrap over anchors.

Bootstrap intervals are BCa where BCa is defined and a percentile interval where it is not
(a degenerate bootstrap distribution, e.g. all labels 0); ``Estimate.interval_method`` says
which.
Every result records its seed, sample size, invalid count and number of resamples, and every
cell also carries a sensitivity range: the estimate with every invalid vote or label counted
as one outcome, then as the other. Rates and changes are fractions (0.05 = 5 %).

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
    two_stage: bool = False,
    decimals: int | None = None,
) -> Estimate:
    """Win rate of the second method of one pair (one task, model and pair).

    ``votes``: one row per ballot with anchor_id (the duel) and choice. Duels with no valid
    vote are excluded and counted in ``n_excluded``. ``decimals=2`` rounds each duel's share
    as the authors did before averaging. ``two_stage`` resamples voters within each resampled
    duel too (with binary votes, resampling a duel's voters is a binomial draw).
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
        two_stage,
        decimals,
    )


def win_rate_from_counts(
    second: np.ndarray,
    valid: np.ndarray,
    n_invalid: int,
    seed: int,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    two_stage: bool = False,
    decimals: int | None = None,
) -> Estimate:
    """``win_rate`` from per-duel counts: votes for the second method and valid votes."""
    second, valid = np.asarray(second), np.asarray(valid)
    keep = valid > 0
    n_valid = valid[keep]
    share = second[keep] / n_valid
    scheme = "two_stage_bootstrap" if two_stage else "cluster_bootstrap"
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
    point_share = np.round(share, decimals) if decimals is not None else share
    theta = float(point_share.mean())
    rng = np.random.default_rng(seed)
    if two_stage:

        def stat(idx: np.ndarray) -> np.ndarray:
            return (rng.binomial(n_valid[idx], share[idx]) / n_valid[idx]).mean(axis=1)

    else:

        def stat(idx: np.ndarray) -> np.ndarray:
            return point_share[idx].mean(axis=1)

    boot = _resample(rng, share.size, resamples, stat)
    lo, hi, kind = bca_interval(theta, boot, _loo_means(point_share), confidence)
    return Estimate(theta, lo, hi, f"{scheme}/{kind}", **common)


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


def probe_rate(labels: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Share of valid labels that are 1, with a Wilson interval (one method and probe)."""
    _single(labels, "method", "labels table")
    _single(labels, "probe_id", "labels table")
    values = _labels(labels)
    valid = values.dropna()
    n, k = int(valid.size), int(valid.sum())
    lo, hi = wilson(k, n, confidence)
    estimate = k / n if n else float("nan")
    how = "wilson" if n else "undefined"
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


def paired_change(
    trained: pd.DataFrame,
    base: pd.DataFrame,
    seed: int,
    statistic: str = "relative_change",
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Estimate:
    """Trained vs base probe labels, paired by anchor, with a paired bootstrap over anchors.

    statistic "difference": rate(trained) - rate(base); "relative_change":
    rate(trained) / rate(base) - 1, undefined (method "undefined") when the base rate is 0.
    Anchors without a valid label on both sides are excluded and counted.
    """
    if statistic not in STATISTICS:
        raise DataError(f"unknown statistic {statistic!r}; choose one of {STATISTICS}")
    pairs, n_invalid, n_excluded = _paired(trained, base)
    return paired_change_from_arrays(
        pairs["trained"].to_numpy(),
        pairs["base"].to_numpy(),
        seed,
        statistic,
        resamples,
        confidence,
        n_invalid,
        n_excluded,
    )


def paired_change_from_arrays(
    t: np.ndarray,
    b: np.ndarray,
    seed: int,
    statistic: str = "relative_change",
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    n_invalid: int = 0,
    n_excluded: int = 0,
) -> Estimate:
    """``paired_change`` from aligned 0/1 arrays of trained and base labels (one per anchor)."""
    if statistic not in STATISTICS:
        raise DataError(f"unknown statistic {statistic!r}; choose one of {STATISTICS}")
    t, b = np.asarray(t, dtype=float), np.asarray(b, dtype=float)
    common = dict(
        seed=seed,
        n=int(t.size),
        n_invalid=int(n_invalid),
        resamples=resamples,
        confidence=confidence,
        n_excluded=int(n_excluded),
    )
    theta = _change(t, b, statistic) if t.size else float("nan")
    if not np.isfinite(theta):
        return Estimate(theta, float("nan"), float("nan"), "undefined", **common)
    rng = np.random.default_rng(seed)
    if statistic == "difference":
        d = t - b
        boot = _resample(rng, d.size, resamples, lambda idx: d[idx].mean(axis=1))
        jack = _loo_means(d)
    else:

        def stat(idx: np.ndarray) -> np.ndarray:
            tb, bb = t[idx].sum(axis=1), b[idx].sum(axis=1)
            # A resample without a base "Yes": +inf change, or undefined if no "Yes" at all.
            out = np.where(tb > 0, np.inf, np.nan)
            np.divide(tb, bb, out=out, where=bb > 0)
            return out - 1

        boot = _resample(rng, t.size, resamples, stat)
        with np.errstate(divide="ignore", invalid="ignore"):
            jack = (t.sum() - t) / (b.sum() - b) - 1
    lo, hi, kind = bca_interval(theta, boot, jack, confidence)
    return Estimate(theta, lo, hi, f"paired_bootstrap/{kind}", **common)


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
)


def _cell(key: dict, est: Estimate, bounds: tuple[float, float]) -> dict:
    row = dict.fromkeys(CELL_COLUMNS)
    row.update(key)
    row.update(est.to_row())
    row["sensitivity_low"], row["sensitivity_high"] = bounds
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
    kind "win_rate" (statistic win_rate_second, one row per task, model and pair),
    "probe_rate" (per task, model, method and probe) and "probe_change" (per task,
    model, trained method and probe; statistics "relative_change" and "difference").
    Each cell's bootstrap seed is derived from ``seed`` and the cell's key (``cell_seed``).
    """
    rows: list[dict] = []
    if votes is not None and len(votes):
        _require(votes, ("task", "model", "pair", "anchor_id", "choice"), "votes table")
        for (task, model, pair), group in votes.groupby(["task", "model", "pair"], sort=True):
            s = cell_seed(seed, "win_rate", task, model, pair)
            est = win_rate(group, s, resamples, confidence)
            key = dict(
                task=task,
                model=model,
                kind="win_rate",
                statistic="win_rate_second",
                pair=pair,
                method=str(pair).split("-")[-1],
                metric="win_rate_second",
            )
            rows.append(_cell(key, est, win_rate_bounds(group)))
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
            rows.append(_cell(key, probe_rate(group, confidence), probe_rate_bounds(group)))
            base = by_cell.get((task, model, probe_id, "base"))
            if method == "base" or base is None:
                continue
            for statistic in STATISTICS:
                s = cell_seed(seed, statistic, task, model, probe_id, method)
                est = paired_change(group, base, s, statistic, resamples, confidence)
                key.update(kind="probe_change", statistic=statistic, pair=f"base-{method}")
                rows.append(_cell(key, est, change_bounds(group, base, statistic)))
    cells = pd.DataFrame(rows, columns=list(CELL_COLUMNS))
    return cells.astype({"seed": "Int64", "n": int, "n_invalid": int, "n_excluded": int})
