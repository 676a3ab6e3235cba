"""The data layer: the input list, verified fetching (mirror and cache), loaders, bad input."""

import csv
import hashlib
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moloch import data
from moloch.anchors import ElectionsAnchor, SalesAnchor, SocialMediaAnchor
from moloch.errors import DataError, MolochError
from moloch.paths import INPUTS_FILE
from moloch.tasks import TASKS

COMMIT = "5b5bd993de8709f5c3b34f84adb6389ddc5a1837"
PREFIX = f"batu-el/molochs-bargain/{COMMIT}/"
URL = "https://raw.githubusercontent.com/" + PREFIX


def sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# --- the real manifest against the mirror ----------------------------------------------


def test_manifest_matches_mirror_checksums(data_mirror):
    sums = {}
    for line in (data_mirror / "SHA256SUMS").read_text().splitlines():
        digest, path = line.split(maxsplit=1)
        sums[path.removeprefix(PREFIX)] = digest
    entries = data.read_inputs()
    assert {e.path: e.sha256 for e in entries.values()} == sums
    for e in entries.values():
        assert e.url == URL + e.path
        assert sha((data_mirror / PREFIX / e.path).read_bytes()) == e.sha256, e.name


def test_manifest_lists_every_input_the_study_reads():
    paths = {e.path for e in data.read_inputs().values()}
    for task in TASKS.values():
        for split in ("train", "test"):
            assert f"artsco/data/{task.key}/{split}.json" in paths
            assert f"artsco/data/{task.key}/Qwen/Qwen3-8B/{split}.json" in paths
            llama = f"artsco/data/{task.key}/meta-llama/Llama-3.1-8B-Instruct/{split}.json"
            assert (llama in paths) == (task.name != "elections")  # not public for elections
    assert "artsco/data/persona/split1.json" in paths
    with INPUTS_FILE.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["role"] and r["format"] in data.FORMATS for r in rows)


# --- fetching through the real manifest -----------------------------------------------


def test_fetch_lays_out_the_cache_by_path(mirror_env):
    path = data.fetch("persona_split1")
    inputs = data.Inputs.from_env()
    assert path == inputs.cache / "artsco/data/persona/split1.json"
    assert data.fetch("artsco/data/persona/split1.json") == path
    assert sha(path.read_bytes()) == data.find_entry("persona_split1").sha256


def test_relative_mirror_resolves_against_current_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOLOCH_DATA_MIRROR", "some/mirror")
    assert data.Inputs.from_env().mirror == tmp_path / "some" / "mirror"


def test_verify_all_command_passes_on_the_mirror(mirror_env, capsys):
    assert data.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(data.read_inputs()) + 1
    assert all(line.startswith("ok ") for line in out[:-1])
    assert out[-1].startswith(f"{len(out) - 1} of {len(out) - 1} inputs verified")
    paths = data.fetch_all()
    assert list(paths) == list(data.read_inputs()) and all(p.is_file() for p in paths.values())


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        data.main(["--help"])
    assert exit_.value.code == 0 and "MOLOCH_DATA_MIRROR" in capsys.readouterr().out


# --- loaders on the real data ---------------------------------------------------------


@pytest.mark.parametrize(
    "task, cls",
    [("sales", SalesAnchor), ("elections", ElectionsAnchor), ("social_media", SocialMediaAnchor)],
)
def test_v1_anchors_are_typed_and_complete(mirror_env, task, cls):
    for split in ("train", "test"):
        anchors = data.load_anchors(task, split)
        assert len(anchors) == 1024 and all(isinstance(a, cls) for a in anchors)
        assert len(data.load_v1_prompts(task, split)) == 1024


def test_v1_sets_versus_raw_splits(mirror_env):
    # docs/protocol.md §1: elections and social media v1 sets are the raw splits; sales was re-drawn
    for task in ("elections", "social_media"):
        for split in ("train", "test"):
            assert data.load_anchors(task, split) == data.load_anchors(task, split, source="raw")
    v1, raw = data.load_anchors("sales", "test"), data.load_anchors("sales", "test", source="raw")
    assert len(set(v1) & set(raw)) == 479
    llama = data.load_anchors("sales", "test", player_file_model="Llama-3.1-8B-Instruct")
    assert llama == data.load_anchors("sales", "test", player_file_model="Qwen/Qwen3-8B")


def test_loaders_return_fresh_lists(mirror_env):
    first = data.load_anchors("elections", "test")
    first.clear()
    assert len(data.load_anchors("elections", "test")) == 1024


def test_personas(mirror_env):
    personas = data.load_personas()
    assert len(personas) == 20
    assert len({p.character_name for p in personas}) == 20
    assert all(p.as_printed().startswith("{'character_name': ") for p in personas)
    assert [p.raw for p in personas] == json.loads(data.fetch("persona_split1").read_text())


def test_no_v1_file_for_llama_elections(mirror_env):
    with pytest.raises(DataError, match="no v1 prompt file.*elections.*Qwen/Qwen3-8B"):
        data.load_anchors("elections", "train", player_file_model="Llama-3.1-8B-Instruct")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "poetry", "split": "train"}, "unknown task 'poetry'"),
        ({"task": "sales", "split": "dev"}, "unknown split 'dev': choose one of train, test"),
        ({"task": "sales", "split": "test", "source": "v2"}, "unknown anchor source 'v2'"),
    ],
)
def test_unknown_task_split_source(mirror_env, kwargs, message):
    with pytest.raises(MolochError, match=message):
        data.load_anchors(**kwargs)


def test_unknown_input_name_lists_known_ones(mirror_env):
    with pytest.raises(DataError, match="no input named 'nope'.*persona_split1"):
        data.fetch("nope")


# --- bad input, on a fake mirror and manifest --------------------------------------------


def fake_inputs(tmp_path, files: dict[str, bytes], hashes: dict[str, str] | None = None):
    """A mirror holding ``files`` (path -> bytes) and a manifest listing them."""
    mirror, lines = tmp_path / "mirror", [",".join(data.INPUT_COLUMNS)]
    for i, (path, raw) in enumerate(files.items()):
        target = mirror / PREFIX / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
        fmt = path.rsplit(".", 1)[1] if "/Qwen/" not in path else "jsonl"
        digest = (hashes or {}).get(path, sha(raw))
        lines.append(f"f{i},{path},{URL}{path},{digest},{fmt},test input")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return data.Inputs(inputs_file=manifest, cache=tmp_path / "cache", mirror=mirror)


RAW_SALES = "artsco/data/task_sales/train.json"
QWEN_SALES = "artsco/data/task_sales/Qwen/Qwen3-8B/train.json"
SALES = {"title": "Lamp", "categories": ["Home", "Light"], "description": "Bright.\r\nWarm."}


def test_missing_mirror_file_names_path_and_variable(tmp_path):
    inputs = fake_inputs(tmp_path, {RAW_SALES: b"[]"})
    (inputs.mirror / PREFIX / RAW_SALES).unlink()
    with pytest.raises(DataError, match=r"task_sales/train\.json is missing.*MOLOCH_DATA_MIRROR"):
        data.fetch("f0", inputs)


def test_corrupt_mirror_copy_is_refused_and_not_cached(tmp_path):
    good = json.dumps([SALES]).encode()
    inputs = fake_inputs(tmp_path, {RAW_SALES: b"[]"}, hashes={RAW_SALES: sha(good)})
    with pytest.raises(DataError) as err:
        data.fetch("f0", inputs)
    message = str(err.value)
    assert "checksum mismatch" in message and RAW_SALES in message
    assert f"expected sha256 {sha(good)}, got {sha(b'[]')}" in message
    assert "replace the mirror file" in message
    assert not (inputs.cache / RAW_SALES).exists()
    with pytest.raises(DataError, match="checksum mismatch"):
        data.load_anchors("sales", "train", source="raw", inputs=inputs)


def test_corrupt_cached_copy_is_fetched_again(tmp_path):
    good = json.dumps([SALES]).encode()
    inputs = fake_inputs(tmp_path, {RAW_SALES: good})
    cached = data.fetch("f0", inputs)
    cached.write_bytes(b"[tampered]")
    assert data.fetch("f0", inputs) == cached and cached.read_bytes() == good
    cached.write_bytes(b"[tampered]")
    assert data.load_anchors("sales", "train", source="raw", inputs=inputs)[0].title == "Lamp"


def test_malformed_json_names_file_and_line(tmp_path):
    inputs = fake_inputs(tmp_path, {RAW_SALES: b'[\n  {"title": "x",\n  oops\n]'})
    with pytest.raises(
        DataError, match=r"task_sales/train\.json: not valid JSON at line 3.*nox -s"
    ):
        data.load_anchors("sales", "train", source="raw", inputs=inputs)


def test_malformed_json_line_names_file_and_line(tmp_path):
    good = json.dumps({**SALES, "prompt": "p"})
    inputs = fake_inputs(tmp_path, {QWEN_SALES: f"{good}\n{good[:-5]}\n".encode()})
    with pytest.raises(DataError, match=r"Qwen3-8B/train\.json, line 2: not valid JSON.*nox -s"):
        data.load_anchors("sales", "train", inputs=inputs)
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        data.load_v1_prompts("sales", "train", inputs=inputs)


def test_missing_field_names_file_record_and_field(tmp_path):
    record = {k: v for k, v in SALES.items() if k != "description"}
    inputs = fake_inputs(
        tmp_path,
        {RAW_SALES: json.dumps([SALES, record]).encode(), QWEN_SALES: json.dumps(SALES).encode()},
    )
    with pytest.raises(
        DataError, match=r"train\.json record 1: missing field\(s\) \['description'\]"
    ):
        data.load_anchors("sales", "train", source="raw", inputs=inputs)
    with pytest.raises(DataError, match=r"train\.json record 0: missing string field 'prompt'"):
        data.load_v1_prompts("sales", "train", inputs=inputs)


def test_anchor_text_keeps_carriage_returns(tmp_path):
    inputs = fake_inputs(tmp_path, {QWEN_SALES: json.dumps({**SALES, "prompt": "p"}).encode()})
    (anchor,) = data.load_anchors("sales", "train", inputs=inputs)
    assert anchor == SalesAnchor("Lamp", ("Home", "Light"), "Bright.\r\nWarm.")


def test_verify_all_reports_each_failure(tmp_path):
    inputs = fake_inputs(
        tmp_path, {RAW_SALES: b"[]", QWEN_SALES: b"{}"}, hashes={QWEN_SALES: sha(b"other")}
    )
    out = io.StringIO()
    assert data.verify_all(inputs, out=out) == ["f1"]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("ok   f0") and lines[1].startswith("FAIL f1: checksum mismatch")
    assert lines[2].startswith("1 of 2 inputs verified")


@pytest.mark.parametrize(
    "header, row, message",
    [
        ("name,path,url,sha256,format", "a,p,u/p,0,json", "columns are"),
        (",".join(data.INPUT_COLUMNS), "a,p,https://x/p,abc,json,r", "not 64 hex digits"),
        (",".join(data.INPUT_COLUMNS), f"a,p,https://x/p,{'0' * 64},xml,r", "format 'xml'"),
        (",".join(data.INPUT_COLUMNS), f"a,p,https://x/q,{'0' * 64},json,r", "url does not"),
    ],
)
def test_bad_input_list_names_file_and_line(tmp_path, header, row, message):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"{header}\n{row}\n")
    with pytest.raises(DataError, match=message) as err:
        data.read_inputs(manifest)
    assert str(manifest) in str(err.value)


# --- the JSON-lines parser ------------------------------------------------------------

# line and paragraph separators that str.splitlines honours, mixed with any other text
SEPARATORS = st.sampled_from("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
TEXT = st.text(st.one_of(SEPARATORS, st.characters(codec="utf-8")), max_size=30)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "prompt"]), TEXT), max_size=6))
def test_json_lines_round_trip(tmp_path_factory, records):
    # ensure_ascii=False leaves U+2028, \x85 and friends raw: they must not split a record
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path = tmp_path_factory.mktemp("jsonl") / "f.json"
    path.write_bytes(raw)
    parsed = data._records(path, sha(raw), "jsonl")
    assert [rec for _, rec in parsed] == records
    assert [where.rsplit(" ", 1)[1] for where, _ in parsed] == [str(i) for i in range(len(records))]
