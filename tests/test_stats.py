"""Statistics: hand-made tables with known answers, and properties under hypothesis."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from moloch import stats
from moloch.errors import DataError

FLIP = {"first": "second", "second": "first"}


def votes_table(duels: list[list[str | None]], pair: str = "base-rft") -> pd.DataFrame:
    """One row per ballot; duels[i] lists the choices of duel i's voters."""
    rows = [
        {"task": "sales", "model": "m", "pair": pair, "anchor_id": f"sales/test/{i:04d}"}
        | {"voter": v, "choice": c, "valid": c is not None}
        for i, choices in enumerate(duels)
        for v, c in enumerate(choices)
    ]
    return pd.DataFrame(rows)


def labels_table(method: str, labels: list[int | None], probe: str = "sales_q1") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "task": "sales",
            "model": "m",
            "method": method,
            "probe_id": probe,
            "anchor_id": [f"sales/test/{i:04d}" for i in range(len(labels))],
            "label": labels,
            "valid": [x is not None for x in labels],
        }
    )


# ---------------------------------------------------------------- win rate


def test_win_rate_is_mean_of_duel_shares_and_counts_invalid():
    duels = [
        ["second", "second", "first", "first"],  # 0.5
        ["second", "second", "second", None],  # 1.0 over 3 valid votes
        ["first", "first", "first", "second"],  # 0.25
        [None, None, None, None],  # no valid vote: excluded
    ]
    est = stats.win_rate(votes_table(duels), seed=1, resamples=500)
    assert est.estimate == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    assert (est.n, est.n_invalid, est.n_excluded) == (3, 5, 1)
    assert est.seed == 1 and est.resamples == 500 and est.confidence == 0.95
    assert est.ci_low <= est.estimate <= est.ci_high


def test_win_rate_rounds_shares_like_the_authors_when_asked():
    duels = [["second"] * 2 + ["first"] + [None]]  # 2/3 -> 0.67
    assert stats.win_rate(votes_table(duels), 0, 100, decimals=2).estimate == 0.67


def test_win_rate_is_seeded():
    rng = np.random.default_rng(3)
    duels = [list(rng.choice(["first", "second"], 20)) for _ in range(50)]
    a = stats.win_rate(votes_table(duels), seed=9, resamples=1000)
    b = stats.win_rate(votes_table(duels), seed=9, resamples=1000)
    c = stats.win_rate(votes_table(duels), seed=10, resamples=1000)
    assert a == b and (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)


def test_win_rate_bca_agrees_with_scipy():
    rng = np.random.default_rng(5)
    prefs = rng.beta(2, 2, 200)
    duels = [list(np.where(rng.random(20) < p, "second", "first")) for p in prefs]
    est = stats.win_rate(votes_table(duels), seed=2, resamples=20_000)
    shares = np.array([np.mean(np.array(d) == "second") for d in duels])
    ref = sps.bootstrap(
        (shares,), np.mean, n_resamples=20_000, method="BCa", random_state=np.random.default_rng(2)
    ).confidence_interval
    assert est.interval_method == "cluster_bootstrap/bca"
    assert est.ci_low == pytest.approx(ref.low, abs=0.003)
    assert est.ci_high == pytest.approx(ref.high, abs=0.003)


def test_degenerate_votes_fall_back_to_percentile():
    est = stats.win_rate(votes_table([["second"] * 5] * 10), seed=0, resamples=200)
    assert (est.estimate, est.ci_low, est.ci_high) == (1.0, 1.0, 1.0)
    assert est.interval_method == "cluster_bootstrap/percentile"


def test_crossed_interval_widens_where_personas_disagree():
    # Voters 0-9 always prefer the second method and 10-19 the first: a persona effect.
    duels = [["second"] * 10 + ["first"] * 10] * 40
    votes = votes_table(duels)
    fixed = stats.win_rate(votes, seed=0, resamples=2000)
    low, high = stats.crossed_interval(votes, seed=0, resamples=2000)
    assert fixed.ci_high - fixed.ci_low == 0.0  # the fixed audience: no doubt at all
    assert low < 0.4 and high > 0.6  # a population of such personas: wide
    agree = votes_table([["second"] * 12 + ["first"] * 8 for _ in range(40)])
    a_low, a_high = stats.crossed_interval(agree, seed=0, resamples=2000)
    assert a_low <= 0.6 <= a_high


def test_no_valid_vote_at_all_is_undefined():
    est = stats.win_rate(votes_table([[None, None]]), seed=0, resamples=10)
    assert est.interval_method == "undefined" and math.isnan(est.estimate) and est.n_excluded == 1


def test_bad_votes_tables_are_named():
    with pytest.raises(DataError, match="choice value.*'maybe'"):
        stats.win_rate(votes_table([["first", "maybe"]]), seed=0)
    with pytest.raises(DataError, match="lacks column.*choice"):
        stats.win_rate(pd.DataFrame({"anchor_id": ["a"]}), seed=0)
    mixed = pd.concat([votes_table([["first"]]), votes_table([["second"]], pair="base-tfb")])
    with pytest.raises(DataError, match="mixes pair"):
        stats.win_rate(mixed, seed=0)


duels_strategy = st.lists(
    st.lists(st.sampled_from(["first", "second", None]), min_size=1, max_size=6),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(duels=duels_strategy, seed=st.integers(0, 2**32 - 1))
def test_win_rate_properties(duels, seed):
    votes = votes_table(duels)
    est = stats.win_rate(votes, seed=seed, resamples=200)
    low, high = stats.win_rate_bounds(votes)
    assert 0.0 <= low <= high <= 1.0
    if est.interval_method == "undefined":
        return
    assert 0.0 <= est.ci_low <= est.estimate <= est.ci_high <= 1.0
    assert low - 1e-12 <= est.estimate <= high + 1e-12
    # Relabelling first <-> second mirrors the estimate and the interval.
    flipped = stats.win_rate(
        votes.assign(choice=votes["choice"].map(FLIP)), seed=seed, resamples=200
    )
    assert flipped.estimate == pytest.approx(1 - est.estimate)
    assert flipped.ci_low == pytest.approx(1 - est.ci_high, abs=1e-9)
    assert flipped.ci_high == pytest.approx(1 - est.ci_low, abs=1e-9)


# ---------------------------------------------------------------- probe rates


def test_probe_rate_uses_wilson_not_wald():
    est = stats.probe_rate(labels_table("base", [1] * 10 + [0] * 90 + [None] * 3))
    z = sps.norm.ppf(0.975)
    centre = (0.1 + z**2 / 200) / (1 + z**2 / 100)
    half = z * math.sqrt(0.1 * 0.9 / 100 + z**2 / (4 * 100**2)) / (1 + z**2 / 100)
    assert est.estimate == 0.1 and (est.n, est.n_invalid) == (100, 3)
    assert est.ci_low == pytest.approx(centre - half) and est.ci_high == pytest.approx(
        centre + half
    )
    assert est.interval_method == "wilson"
    assert stats.probe_rate_bounds(labels_table("base", [1, 0, None, None])) == (0.25, 0.75)


def test_probe_rate_with_few_events_is_exact():
    """1 Yes in 16: Wilson's lower limit (0.011) would pass over a true rate of 0.01."""
    est = stats.probe_rate(labels_table("base", [1] + [0] * 15))
    assert est.interval_method == "clopper_pearson"
    assert est.ci_low == pytest.approx(sps.beta.ppf(0.025, 1, 16))
    assert est.ci_high == pytest.approx(sps.beta.ppf(0.975, 2, 15))
    assert est.ci_low < 0.01 < stats.wilson(1, 16)[0]


@given(k=st.integers(0, 300), extra=st.integers(0, 300))
def test_rate_interval_properties(k, extra):
    n = k + extra
    lo, hi, how = stats.rate_interval(k, n)
    if n == 0:
        assert how == "undefined"
        return
    assert 0.0 <= lo <= k / n <= hi <= 1.0 and hi > lo
    assert how == ("wilson" if min(k, extra) >= stats.MIN_EVENTS else "clopper_pearson")


def test_probe_rate_all_invalid_is_undefined():
    assert stats.probe_rate(labels_table("base", [None, None])).interval_method == "undefined"


def test_probe_rate_rejects_bad_labels():
    with pytest.raises(DataError, match="label value"):
        stats.probe_rate(labels_table("base", [1, 2]))


@given(k=st.integers(0, 500), extra=st.integers(0, 500))
def test_wilson_properties(k, extra):
    n = k + extra
    if n == 0:
        return
    lo, hi = stats.wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


# ---------------------------------------------------------------- trained vs base


def test_paired_difference_and_relative_change():
    base = labels_table("base", [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, None])
    trained = labels_table("rft", [1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1])
    diff = stats.paired_change(trained, base, statistic="difference")
    rel = stats.paired_change(trained, base, statistic="relative_change")
    assert diff.estimate == pytest.approx(0.2) and rel.estimate == pytest.approx(1.0)
    assert (rel.n, rel.n_invalid, rel.n_excluded) == (10, 1, 1)
    assert rel.interval_method == "mover_wilson" and rel.ci_low <= 1.0 <= rel.ci_high
    assert diff.interval_method == "newcombe_score" and diff.ci_low <= 0.2 <= diff.ci_high


def test_three_events_against_none_is_no_evidence_of_a_difference():
    """3 vs 0 discordant pairs of 16: exact McNemar p = 0.25, so 0 must stay inside."""
    t = np.array([1, 1, 1] + [0] * 13)
    b = np.zeros(16)
    low, high = stats.newcombe_difference(t, b)
    assert low < 0 < high and high - low > 0.2
    all_yes = np.ones(16)
    low, high = stats.newcombe_difference(all_yes, all_yes)
    assert low < 0 < high  # never the zero-width [0, 0] of a degenerate resample


def test_newcombe_matches_a_published_worked_example():
    # Newcombe (1998), Table II example: a=1, b=1, c=0, d=... ; checked instead by symmetry:
    t, b = np.array([1] * 8 + [0] * 12), np.array([1] * 5 + [0] * 15)
    low, high = stats.newcombe_difference(t, b)
    s_low, s_high = stats.newcombe_difference(b, t)
    assert low == pytest.approx(-s_high) and high == pytest.approx(-s_low)


def test_relative_change_undefined_when_base_rate_is_zero():
    est = stats.paired_change(labels_table("tfb", [1, 0]), labels_table("base", [0, 0]))
    assert est.interval_method == "undefined" and math.isnan(est.estimate)
    low, high = stats.mover_ratio(np.array([1, 0]), np.array([0, 0]))
    assert low >= 0 and math.isinf(high)


def test_paired_change_rejects_duplicate_anchors():
    base = labels_table("base", [1, 0])
    with pytest.raises(DataError, match="more than once"):
        stats.paired_change(pd.concat([base, base]), base)


pairs_strategy = st.lists(
    st.tuples(st.sampled_from([0, 1, None]), st.sampled_from([0, 1, None])),
    min_size=2,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(pairs=pairs_strategy)
def test_paired_change_properties(pairs):
    trained = labels_table("rft", [p[0] for p in pairs])
    base = labels_table("base", [p[1] for p in pairs])
    for statistic in stats.STATISTICS:
        est = stats.paired_change(trained, base, statistic)
        low, high = stats.change_bounds(trained, base, statistic)
        if est.interval_method != "undefined":
            assert est.ci_low <= est.estimate <= est.ci_high
            assert est.ci_high > est.ci_low  # never zero-width while there is a pair
        if statistic == "difference" and est.interval_method != "undefined":
            assert est.ci_low >= -1.0 and est.ci_high <= 1.0
            # Swapping the arms negates the difference and mirrors its interval.
            swapped = stats.paired_change(base, trained, statistic)
            assert swapped.estimate == pytest.approx(-est.estimate)
            assert swapped.ci_low == pytest.approx(-est.ci_high)
        if statistic == "relative_change" and est.interval_method != "undefined":
            assert est.ci_low >= -1.0  # a ratio of rates is never below 0
        if not (math.isnan(low) or math.isnan(high)):
            assert low <= high


# ---------------------------------------------------------------- tidy cells


def _run_tables():
    rng = np.random.default_rng(11)
    votes = pd.concat(
        votes_table([list(rng.choice(["first", "second", None], 5)) for _ in range(12)], pair=p)
        for p in ("base-rft", "base-tfb", "rft-tfb")
    )
    labels = pd.concat(
        labels_table(m, list(rng.choice([0, 1], 12, p=[0.7, 0.3]))) for m in ("base", "rft", "tfb")
    )
    return votes, labels


def test_tidy_cells_one_row_per_cell_reproducibly():
    votes, labels = _run_tables()
    cells = stats.tidy_cells(votes, labels, seed=7, resamples=300)
    kinds = cells.groupby(["kind", "statistic"]).size().to_dict()
    assert kinds == {
        ("win_rate", "win_rate_second"): 3,
        ("win_rate", "win_rate_second_v1"): 3,  # the authors' rounding, beside ours
        ("probe_rate", "probe_rate"): 3,
        ("probe_change", "difference"): 2,
        ("probe_change", "relative_change"): 2,
    }
    assert list(cells.columns) == list(stats.CELL_COLUMNS)
    assert (cells["sensitivity_low"] <= cells["sensitivity_high"]).all()
    assert set(cells.loc[cells.kind == "probe_rate", "metric"]) == {"deceptive_marketing"}
    # Same seed, rows in another order: the same numbers (each cell has its own stream).
    again = stats.tidy_cells(votes.sample(frac=1, random_state=1), labels, seed=7, resamples=300)
    pd.testing.assert_frame_equal(cells, again)
    other = stats.tidy_cells(votes, labels, seed=8, resamples=300)
    assert not cells["ci_low"].equals(other["ci_low"])


def test_tidy_cells_accepts_missing_tables():
    assert stats.tidy_cells(None, None, seed=0).empty


def test_coverage_bench_scenarios_and_verdict_rates_run_and_report(tmp_path):
    from moloch import bench_coverage as bench

    ratio = bench.Scenario("paired_ratio", 10, None, "moderate")
    assert bench.truth(ratio) == pytest.approx(0.5)
    assert bench.truth(bench.Scenario("paired_difference", 10, None, "moderate")) == (
        pytest.approx(0.05)
    )
    scenario = bench.Scenario("cluster_win_rate", 40, 5)
    row = bench.run_scenario(scenario, sims=20, resamples=200, seed=1)
    assert row["n_sims"] == 20 and 0.0 <= row["coverage"] <= 1.0 and row["mean_width"] > 0
    assert row == {**bench.run_scenario(scenario, 20, 200, 1), "time_s": row["time_s"]}
    assert row["regime_rule"] == "not validated (few duels)"
    assert [bench.status(c) for c in (0.90, 0.95, 0.99)] == ["fails", "supported", "conservative"]
    rates = bench.verdict_rates(sims=2, resamples=100, seed=1)
    families = {
        "abstract_v1",
        "abstract_iclr",
        "v1_competition",
        "r2026_competition",
        "r2026_probe",
    }
    assert {r["family"] for r in rates} == families and len(rates) == len(families) * 4
    for r in rates:
        assert r["reproduced"] + r["inconclusive"] + r["differs"] == pytest.approx(1.0)
    path = bench.write({"scenarios": []}, tmp_path / "bench" / "coverage.json")
    assert json.loads(path.read_text()) == {"scenarios": []}
