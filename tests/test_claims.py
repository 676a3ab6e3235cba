"""Claims registry and evaluation, on hand-made cells and tiny run tables (no model)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from moloch import claims
from moloch.cells import read_cells, write_cells
from moloch.config import load_profile
from moloch.errors import DataError
from moloch.paths import CLAIMS_FILE, PUBLISHED_VALUES_FILE
from moloch.runs import find_run
from moloch.stats import CELL_COLUMNS, tidy_cells

PUBLISHED = pd.read_csv(PUBLISHED_VALUES_FILE)


def cell(task, model, kind, estimate, lo, hi, **key) -> dict:
    row = dict.fromkeys(CELL_COLUMNS)
    row.update(task=task, model=model, kind=kind, estimate=estimate, ci_low=lo, ci_high=hi)
    row.update(interval_method="test", n=1024, n_invalid=0, n_excluded=0)
    row.update(key)
    return row


def win(task, model, pair, estimate, lo, hi) -> dict:
    return cell(task, model, "win_rate", estimate, lo, hi, pair=pair, statistic="win_rate_second")


def test_registry_covers_every_published_claim_and_is_in_sync():
    registry = claims.load_registry()
    assert len(registry) == len(PUBLISHED) == 145
    assert list(registry["claim_id"]) == list(PUBLISHED["claim_id"])
    assert registry["statistic"].notna().all() and registry["measures"].notna().all()
    assert set(registry["tolerance"]) <= set(claims.TOLERANCES)
    # The committed registry is what the rules give (rebuild it when a rule changes).
    rebuilt = claims.build_registry()
    committed = pd.read_csv(CLAIMS_FILE, dtype={"n_voters": "Int64"})
    for column in ("claim_id", "statistic", "metric", "probe_id", "pair", "method", "tolerance"):
        assert (
            committed[column].fillna("").astype(str).equals(rebuilt[column].fillna("").astype(str))
        ), column


def test_registry_maps_the_2026_probe_names_to_ours():
    registry = claims.build_registry().set_index("claim_id")
    row = registry.loc["r2026_probe.social_media.fabrication.Qwen3-32B.tfb"]
    assert (row["metric"], row["probe_id"], row["method"]) == ("disinformation", "sm_q1", "tfb")
    assert row["judge_model"] == "gpt-4o-mini" and row["n_voters"] == 25


def test_smoke_run_is_never_comparable():
    result = claims.evaluate_claims(load_profile("smoke"), pd.DataFrame(columns=CELL_COLUMNS))
    assert set(result["claim_id"]) == set(PUBLISHED["claim_id"])
    assert (result["status"] == "not comparable").all()
    assert result["reason"].str.contains("comparable: false").all()


def test_paper_profile_without_data_is_not_computable_or_not_comparable():
    empty = pd.DataFrame(columns=CELL_COLUMNS)
    result = claims.evaluate_claims(load_profile("paper"), empty).set_index("claim_id")
    assert result["status"].isin(claims.STATUSES).all() and result["reason"].notna().all()
    assert result.loc["v1_competition.sales.Qwen3-8B.base-tfb", "status"] == "not computable"
    r2026 = result.loc["r2026_competition.sales.Qwen3-8B.base-tfb"]
    assert r2026["status"] == "not comparable" and "25" in r2026["reason"]
    other = result.loc["r2026_probe.sales.misrepresentation.gpt-oss-20b.base"]
    assert other["status"] == "not comparable" and "no player gpt-oss-20b" in other["reason"]


def test_paper_cells_get_verdicts_that_need_precision():
    v1 = dict(statistic="win_rate_second_v1")
    change = dict(statistic="relative_change", metric="disinformation")
    cells = pd.DataFrame(
        [
            win("elections", "Qwen3-8B", "base-tfb", 0.549, 0.539, 0.559) | v1,
            win("elections", "Qwen3-8B", "base-rft", 0.60, 0.59, 0.61) | v1,
            win("elections", "Llama-3.1-8B-Instruct", "base-tfb", 0.52, 0.44, 0.60) | v1,
            cell("social_media", "Llama-3.1-8B-Instruct", "probe_change", 1.9, 1.6, 2.2,
                 pair="base-rft", method="rft", **change),
            cell("social_media", "Qwen3-8B", "probe_change", 0.1, -0.2, 0.4,
                 pair="base-tfb", method="tfb", **change),
            cell("sales", "Qwen3-8B", "probe_change", 0.1, -0.5, float("inf"),
                 pair="base-rft", method="rft", statistic="relative_change",
                 metric="deceptive_marketing"),
        ]
    )  # fmt: skip
    result = claims.evaluate_claims(load_profile("paper"), cells).set_index("claim_id")
    same = result.loc["v1_competition.elections.Qwen3-8B.base-tfb"]
    assert same["status"] == "reproduced" and same["value"] == 0.549
    assert "two one-sided tests" in same["reason"] and same["rule"] == "equivalence"
    assert result.loc["v1_competition.elections.Qwen3-8B.base-rft", "status"] == "differs"
    wide = result.loc["v1_competition.elections.Llama-3.1-8B-Instruct.base-tfb"]
    assert wide["status"] == "inconclusive" and "anchors would decide it" in wide["reason"]
    assert wide["anchors_needed"] > 1024
    # Abstract elections +4.9: decided by the identified cell (Qwen3-8B base-tfb) in points.
    perf = result.loc["abstract_v1.elections.performance"]
    assert perf["status"] == "reproduced" and perf["cell"] == "Qwen3-8B base-tfb"
    assert perf["value"] == pytest.approx(4.9) and perf["ci_low"] == pytest.approx(3.9)
    assert "Llama-3.1-8B-Instruct base-tfb" in perf["candidates"]
    # Abstract +188.6 % disinformation: one of two candidates is close and precise enough.
    dis = result.loc["abstract_v1.social_media.disinformation"]
    assert dis["status"] == "reproduced" and dis["value"] == pytest.approx(190.0)
    assert dis["cell"] == "Llama-3.1-8B-Instruct base-rft" and "0.05/2" in dis["reason"]
    # An unbounded interval covers +14 % but can never reproduce it.
    unbounded = result.loc["abstract_v1.sales.deceptive_marketing"]
    assert unbounded["status"] == "inconclusive" and "unbounded" in unbounded["reason"]
    assert result.loc["abstract_v1.sales.performance", "status"] == "not computable"


def test_decide_counts_both_errors_and_the_number_of_candidates():
    # Published 0.55 with its own SE 0.008; ours 0.55 +- 0.0196 (SE 0.01): equal within 0.03.
    ours = [(0.55, 0.5304, 0.5696)]
    assert claims.decide(0.55, 0.008, 0.03, ours, [1024], 0.95).status == "reproduced"
    # A run 0.025 away differs if the published value's error is ignored, not if it counts:
    off = [(0.575, 0.5554, 0.5946)]
    assert claims.decide(0.55, None, 0.03, off, [1024], 0.95).status == "differs"
    assert claims.decide(0.55, 0.008, 0.03, off, [1024], 0.95).status == "inconclusive"
    # Bonferroni: a candidate that passes alone may not pass as one of four.
    edge = (0.55, 0.5404, 0.5596)  # SE 0.0049: |d| + 1.645 SE = 0.008 < 0.0085
    assert claims.decide(0.55, None, 0.0085, [edge], [1024], 0.95).status == "reproduced"
    four = [edge, (0.40, 0.39, 0.41), (0.41, 0.40, 0.42), (0.42, 0.41, 0.43)]
    assert claims.decide(0.55, None, 0.0085, four, [1024] * 4, 0.95).status == "inconclusive"
    # Differs only if every candidate differs.
    assert claims.decide(0.55, None, 0.01, four[1:], [1024] * 3, 0.95).status == "differs"
    # Inconclusive says how many anchors would decide: here 4x the anchors halve the SE.
    wide = claims.decide(0.55, None, 0.03, [(0.55, 0.5108, 0.5892)], [1024], 0.95)
    assert wide.status == "inconclusive"
    assert wide.anchors_needed == pytest.approx(1024 * (0.02 / (0.03 / 1.6449)) ** 2, rel=1e-3)


def test_a_run_smaller_than_the_claims_design_is_not_comparable():
    paper = load_profile("paper")
    small = paper.model_copy(update={"anchors": paper.anchors.model_copy(update={"test": 16})})
    cells = pd.DataFrame([win("elections", "Qwen3-8B", "base-tfb", 0.549, 0.539, 0.559)
                          | {"statistic": "win_rate_second_v1"}])  # fmt: skip
    row = (
        claims.evaluate_claims(small, cells)
        .set_index("claim_id")
        .loc["v1_competition.elections.Qwen3-8B.base-tfb"]
    )
    assert row["status"] == "not comparable" and "16 test anchors" in row["reason"]


def finished(folder: Path) -> Path:
    """Mark a unit folder done, as its manifest does."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"outputs": {}}))
    return folder


def test_write_claims_reads_the_cells_of_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLOCH_RUNS", str(tmp_path))
    run = find_run("smoke")
    model = run.profile.players[0].name
    folder = finished(tmp_path / "smoke" / "compete" / "sales" / model)
    rows = [
        {"task": "sales", "model": model, "pair": "base-tfb", "first": "base", "second": "tfb"}
        | {"anchor_id": f"sales/test/{i:04d}", "voter": v, "choice": c, "valid": True}
        for i in range(4)
        for v, c in enumerate(["first", "second", "second"])
    ]
    (folder / "votes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_cells(run) and not write_cells(run)  # computed once, then up to date
    # The file holds exactly the numbers computed (the floats read back are the same).
    fresh = tidy_cells(pd.DataFrame(rows), None, run.profile.seed, run.profile.stats.resamples)

    def same_form(df):  # a missing text is NaN in a CSV and None in memory
        return df.astype(object).where(df.notna(), None)

    pd.testing.assert_frame_equal(same_form(read_cells(run)), same_form(fresh), check_dtype=False)
    path = claims.write_claims(run)
    table = pd.read_csv(path)
    assert path == tmp_path / "smoke" / "claims.csv" and len(table) == 145
    assert (table["status"] == "not comparable").all()
    # The smoke run's own cell shows up among the candidates of the claims it could compute.
    row = table.set_index("claim_id").loc["abstract_v1.sales.performance"]
    assert f"{model} base-tfb 17.000" in row["candidates"] and "voters" in row["reason"]


def test_broken_run_table_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLOCH_RUNS", str(tmp_path))
    run = find_run("smoke")
    folder = finished(tmp_path / "smoke" / "probe" / "sales" / run.profile.players[0].name)
    (folder / "labels.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="labels.jsonl, line 1: not valid JSON"):
        write_cells(run)
