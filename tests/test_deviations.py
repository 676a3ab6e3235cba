"""The deviations registry: every profile field has a row, and the paper profile is faithful."""

from __future__ import annotations

import pytest

from moloch import deviations
from moloch.config import load_profile


def test_every_profile_field_is_named_by_a_row():
    table = deviations.load()
    named = {f for fields in table["fields"] for f in fields}
    schema = set(deviations.schema_fields())
    assert not schema - named, (
        f"profile fields no row of data/deviations.csv names: {schema - named}"
    )
    assert not named - schema, f"rows name fields the profile does not have: {named - schema}"
    assert table["id"].is_unique and len(table) >= 20
    for _, row in table.iterrows():
        assert row["v1"] and row["package"] and row["effect"] and row["smoke"], row["id"]
        assert set(row["faithful"]) <= set(row["fields"]), row["id"]
        if row["kind"] == "switch":
            assert row["faithful"], f"switch {row['id']} says no v1 value"


def test_the_paper_profile_is_faithful_wherever_v1_is_known():
    paper = load_profile("paper")
    table = deviations.load()
    off = {row["id"]: deviations.unfaithful(paper, row) for _, row in table.iterrows()}
    assert not {k: v for k, v in off.items() if v}
    statuses = deviations.for_profile(paper).set_index("id")["status"]
    assert (statuses[table.set_index("id")["kind"] == "switch"] == "as v1").all()


def test_the_smoke_profile_says_where_it_departs():
    statuses = deviations.for_profile(load_profile("smoke")).set_index("id")["status"]
    assert statuses["voters"].startswith("differs: audience.voters: 5, v1 20")
    assert statuses["forced_answers"].startswith("differs")
    assert statuses["sampling"] == "as v1" and statuses["vote_parser"] == "as v1"


def test_a_switch_left_out_of_the_registry_fails(tmp_path):
    text = deviations.DEVIATIONS_FILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.startswith("attention,")]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    named = {f for fields in deviations.load(tmp_path / "d.csv")["fields"] for f in fields}
    assert "training.attention" in set(deviations.schema_fields()) - named


@pytest.mark.parametrize(
    ("path", "expected"),
    [("players.top_p", [None, None]), ("audience.parser", "v1"), ("training.lora.r", 16)],
)
def test_values_are_read_from_the_profile(path, expected):
    assert deviations.value(load_profile("paper"), path) == expected
