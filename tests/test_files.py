"""The one reader and writer of each file format, and the recorded profile of a run."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moloch.config import load_profile
from moloch.errors import DataError
from moloch.files import read_json, read_jsonl, write_jsonl
from moloch.runs import find_run

# The characters str.splitlines breaks a line at, mixed with any other text.
SEPARATORS = st.sampled_from("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
TEXT = st.text(st.one_of(SEPARATORS, st.characters(codec="utf-8")), max_size=40)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["text", "reply", "thought"]), TEXT), max_size=8))
def test_json_lines_round_trip_whatever_the_text(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("jsonl") / "rows.jsonl"
    assert write_jsonl(path, rows) == len(rows)
    assert read_jsonl(path) == rows
    assert path.read_bytes().count(b"\n") == len(rows)  # one line per row


def test_bad_files_are_named_with_what_to_do(tmp_path):
    path = tmp_path / "votes.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"votes.jsonl is not UTF-8 text.*delete it and rerun"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"votes.jsonl, line 2: expected a JSON object, found list"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"votes.jsonl, line 2: not valid JSON"):
        read_jsonl(path)
    with pytest.raises(DataError, match="is missing"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "m.json").write_text("{")
    with pytest.raises(DataError, match=r"m.json: not valid JSON at line 1"):
        read_json(tmp_path / "m.json")


def test_a_run_records_its_profile_exactly(tmp_path):
    run = find_run("paper", tmp_path / "run")
    run.record_profile()
    again = find_run(run_dir=tmp_path / "run")
    assert again.profile == load_profile("paper")
    assert again.profile.digest() == run.profile.digest()
    assert again.folder == run.folder
