"""Re-analysis of the released aggregates: known arithmetic, offline and fast."""

import math
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moloch import released
from moloch.paths import PIPELINE_DIR

PUBLISHED = released.load_published()


@pytest.fixture(scope="module")
def tables():
    start = time.perf_counter()
    out = released.analyse(PUBLISHED)
    assert time.perf_counter() - start < 30
    return out


def test_v1_competition_intervals(tables):
    v1 = tables["v1_competition"].set_index("claim_id")
    assert len(v1) == 18 and (v1["n"] == 1024).all()
    row = v1.loc["v1_competition.elections.Qwen3-8B.base-tfb"]
    assert row["excess_pp"] == pytest.approx(4.896484375)
    half = 1.959964 * 0.25945086001791956 * math.sqrt(1024 / 1023) / 32
    assert row["ci_low"] == pytest.approx(0.54896484375 - half, abs=1e-6)
    assert row["ci_high"] == pytest.approx(0.54896484375 + half, abs=1e-6)
    assert bool(row["excludes_half"])
    assert not v1.loc["v1_competition.sales.Llama-3.1-8B-Instruct.rft-tfb", "excludes_half"]


def test_abstract_elections_figure_is_qwen_tfb_and_sales_is_no_single_cell(tables):
    matches = tables["abstract_matches"].set_index("claim_id")
    elections = matches.loc["abstract_v1.elections.performance", "matches"]
    assert elections == "Qwen3-8B base-tfb (win_rate_minus_half_pp: 4.896)"
    cand = tables["abstract_candidates"]
    sales = cand[(cand["claim_id"] == "abstract_v1.sales.performance") & cand["matches_rounding"]]
    assert (sales["candidate_kind"] == "cell").sum() == 0
    # Every definition is tried on every single cell of the task.
    per_claim = cand[cand["candidate_kind"] == "cell"].groupby("claim_id").size()
    assert (per_claim == 6 * len(released.DEFINITIONS)).all()


def test_count_pairs_for_188_6_percent():
    pairs = released.count_pairs(188.6)
    assert (35, 101) in set(zip(pairs["base_count"], pairs["trained_count"], strict=True))
    assert pairs["base_count"].min() == 35
    change = 100 * (pairs["trained_count"] / pairs["base_count"] - 1)
    assert (change.round(1) == 188.6).all()


@settings(max_examples=25, deadline=None)
@given(figure=st.integers(-999, 3000).map(lambda x: x / 10), n=st.integers(1, 60))
def test_count_pairs_matches_brute_force(figure, n):
    pairs = released.count_pairs(figure, n)
    found = set(zip(pairs["base_count"], pairs["trained_count"], strict=True))
    brute = {
        (b, t)
        for b in range(1, n + 1)
        for t in range(n + 1)
        if abs(100 * (t / b - 1) - figure) <= 0.05 + 1e-9
    }
    assert found == brute


def test_katz_interval_formula():
    lo, hi = released.katz_ratio_interval(np.array([101]), np.array([35]))
    se = math.sqrt(1 / 101 - 1 / 1024 + 1 / 35 - 1 / 1024)
    log_ratio = math.log(101 / 35)
    assert lo[0] == pytest.approx(math.exp(log_ratio - 1.959964 * se), rel=1e-5)
    assert hi[0] == pytest.approx(math.exp(log_ratio + 1.959964 * se), rel=1e-5)


def test_relative_summary_has_every_misalignment_figure(tables):
    summary = tables["relative_summary"].set_index("claim_id")
    assert len(summary) == 10
    row = summary.loc["abstract_v1.social_media.disinformation"]
    assert row["smallest_pair"] == "101/35" and row["min_base_count_excluding_zero"] == 35


def test_r2026_counts_and_bounds(tables):
    assert released._counts(0.038, 1024) == (39, 39, 39)
    k, lo, hi = released._counts(0.5, 1024)
    assert (k, lo, hi) == (512, 512, 512) and released._counts(0.011, 1024)[1:] == (11, 11)
    comp = tables["r2026_competition"].set_index("claim_id")
    assert len(comp) == 42
    row = comp.loc["r2026_competition.social_media.Llama-3.3-70B-Instruct.base-tfb"]
    half = 1.959964 * math.sqrt(0.444 * 0.556 / 1024)
    assert row["ci_high_bound"] == pytest.approx(0.444 + half, abs=1e-6)
    assert row["excludes_half_bound"]
    changes = tables["r2026_probe_changes"]
    assert len(changes) == 46 and changes["diff_ci_low"].le(changes["difference"]).all()
    assert (tables["r2026_probe_rates"]["metric"] != "fabrication").all()


def test_write_tables_and_notebook(tmp_path, tables):
    paths = released.write_tables(tables, tmp_path / "released")
    assert {p.stem for p in paths} == set(tables)
    back = pd.read_csv(tmp_path / "released" / "v1_competition.csv")
    assert list(back["claim_id"]) == list(tables["v1_competition"]["claim_id"])
    papermill = pytest.importorskip("papermill")
    notebook = PIPELINE_DIR / "analysis" / "released.ipynb"
    papermill.execute_notebook(
        str(notebook),
        str(tmp_path / "out.ipynb"),
        parameters={"out_dir": str(tmp_path / "nb")},
        progress_bar=False,
    )
    assert (tmp_path / "nb" / "relative_summary.csv").is_file()
