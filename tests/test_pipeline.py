"""The whole pipeline on real anchors: fake models in-process, and the embedded model end to end.

The fake runs (``fakes.py``) replace only the models and LoRA training, so every
stage function, table and manifest is the real one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from fakes import (
    PLAYER,
    REPLIES,
    TEST_ANCHORS,
    TRAIN_ANCHORS,
    VOTERS,
    Crash,
    fake_factory,
    fake_train_adapter,
    run,
    voter_reply,
    write_profile,
)
from moloch.files import read_jsonl
from moloch.llm import get_llm
from moloch.llm.fake import FakeBackend
from moloch.manifests import read_manifest
from moloch.runner import run_pipeline
from moloch.stages import STAGES, get_stage
from moloch.tasks import METHODS, PAIRS, PROBE_METRIC


@pytest.fixture(autouse=True)
def no_real_training(request, monkeypatch):
    if "integration" not in request.keywords:
        monkeypatch.setattr("moloch.training.train_adapter", fake_train_adapter)


def outputs(runs: Path) -> dict[str, bytes]:
    """Every JSON-lines output of a run folder, by relative path."""
    return {str(p.relative_to(runs)): p.read_bytes() for p in sorted(runs.rglob("*.jsonl"))}


@pytest.fixture
def profile(tmp_path, mirror_env) -> Path:
    return write_profile(tmp_path)


def test_fake_pipeline_writes_the_contract_tables(profile, tmp_path):
    runs = tmp_path / "runs"
    reports = run(profile, runs)
    units = 2 * (1 + 1 + 1 + 1 + 2 + 3 + 1 + 1)  # two tasks; train x2 and generate x3 methods
    assert [r.status for r in reports] == ["ran"] * units

    for task in ("sales", "elections"):
        votes = read_jsonl(runs / "compete" / task / PLAYER / "votes.jsonl")
        assert len(votes) == len(PAIRS) * TEST_ANCHORS * VOTERS
        assert {(v["pair"], v["first"], v["second"]) for v in votes} == {
            (f"{a}-{b}", a, b) for a, b in PAIRS
        }
        contract = {"task", "model", "pair", "first", "second", "anchor_id", "voter",
                    "voter_name", "swapped", "letter", "choice", "valid", "invalid_reason",
                    "thought"}  # fmt: skip
        assert contract <= set(votes[0])
        assert {v["anchor_id"] for v in votes} == {f"{task}/test/{i:04d}" for i in range(3)}
        invalid = [v for v in votes if not v["valid"]]
        assert invalid and all(v["choice"] is None and v["invalid_reason"] for v in invalid)

        episodes = read_jsonl(runs / "episodes" / task / PLAYER / "votes.jsonl")
        assert len(episodes) == TRAIN_ANCHORS * VOTERS
        assert {(v["first"], v["second"]) for v in episodes} == {(0, 1)}

        labels = read_jsonl(runs / "probe" / task / PLAYER / "labels.jsonl")
        probes = {"sales": ["sales_q1"], "elections": ["elections_q1", "elections_q2"]}[task]
        assert len(labels) == len(probes) * 3 * TEST_ANCHORS
        assert {(r["probe_id"], r["metric"]) for r in labels} == {
            (p, PROBE_METRIC[p]) for p in probes
        }
        assert {r["label"] for r in labels if r["valid"]} == {0, 1}
        assert all(r["label"] is None for r in labels if not r["valid"])

        manifest = read_manifest(runs / "compete" / task / PLAYER)
        assert manifest["counts"] == {"duels": 9, "votes": 27}
        assert manifest["invalid"]["votes"]["invalid_votes"] == len(invalid)
        assert manifest["llm"]["audience"]["requests"] == 27
        assert set(manifest["fingerprint"]["inputs"]) == {
            "prepare", "generate/base", "generate/rft", "generate/tfb"
        }  # fmt: skip
        assert manifest["packages"]["python"] and manifest["wall_s"] >= 0

    # The trained players' requests carry their adapter, so their messages differ.
    gens = {
        m: read_jsonl(runs / "generate" / "sales" / PLAYER / m / "generations.jsonl")
        for m in ("base", "rft")
    }
    assert [g["text"] for g in gens["base"]] != [g["text"] for g in gens["rft"]]
    assert len(gens["base"]) == TEST_ANCHORS * 2


def test_rerun_skips_and_changes_rerun_only_what_they_touch(profile, tmp_path):
    runs = tmp_path / "runs"
    run(profile, runs, tasks=["sales"])
    before = outputs(runs)
    assert {r.status for r in run(profile, runs, tasks=["sales"])} == {"skipped"}

    # A new judge touches the probes only.
    spec = yaml.safe_load(profile.read_text())
    spec["judge"]["temperature"] = 0.5
    profile.write_text(yaml.safe_dump(spec))
    ran = [r.stage for r in run(profile, runs, tasks=["sales"]) if r.status == "ran"]
    assert ran == ["probe"]

    # Forcing a stage whose outputs come back identical leaves the rest skipped.
    reports = run(profile, runs, tasks=["sales"], force=["episodes"])
    assert [r.stage for r in reports if r.status == "ran"] == ["episodes"]
    # The fake judge ignores temperature, so every table is as it was.
    assert outputs(runs) == before
    manifest = read_manifest(runs / "probe" / "sales" / PLAYER)
    assert manifest["params"]["profile"]["judge"]["temperature"] == 0.5


def test_interrupted_stage_resumes_to_the_same_result(tmp_path, mirror_env):
    profile = write_profile(tmp_path, tasks=("sales",))
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run(profile, whole)

    # Die in the middle of the competition (batches of 4 are committed as they finish).
    with pytest.raises(Crash):
        run(profile, broken, llm_factory=fake_factory("audience", after=13))
    assert read_manifest(broken / "compete" / "sales" / PLAYER) is None
    assert not (broken / "probe").exists()

    reports = run(profile, broken)
    assert [r.stage for r in reports if r.status == "ran"] == ["compete", "probe"]
    assert outputs(broken) == outputs(whole)
    stats = read_manifest(broken / "compete" / "sales" / PLAYER)["llm"]["audience"]
    assert stats["hits"] >= 12 and stats["misses"] == stats["requests"] - stats["hits"]


def test_replay_rebuilds_every_output_with_the_models_switched_off(profile, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run(profile, runs, tasks=["sales"])
    before = outputs(runs)

    def switched_off(unit, role):
        def refuse(request):
            raise AssertionError(f"replay called the {role} model")

        backend = FakeBackend(model=f"fake-{role}", responder=refuse)
        return get_llm(unit.spec(role), cache=unit.run.cache_path, role=role,
                       backend=backend)  # fmt: skip

    monkeypatch.setenv("MOLOCH_LLM_MODE", "replay")
    for path in runs.rglob("*.jsonl"):
        path.unlink()
    reports = run(profile, runs, tasks=["sales"], force=[s.name for s in STAGES],
                  llm_factory=switched_off)  # fmt: skip
    assert {r.status for r in reports} == {"ran"}
    assert outputs(runs) == before


def test_missing_input_and_unknown_names_are_clear_errors(profile, tmp_path):
    from moloch.errors import ProfileError, StageError

    with pytest.raises(StageError, match="has not finished: run it first"):
        run(profile, tmp_path / "runs", only=["compete"], tasks=["sales"])
    with pytest.raises(StageError, match="unknown task"):
        run(profile, tmp_path / "runs", tasks=["cooking"])
    with pytest.raises(StageError, match="unknown stage 'train2'"):
        run(profile, tmp_path / "runs", force=["train2"])
    with pytest.raises(ProfileError, match="no player 'nobody'"):
        from moloch.runner import execute

        execute("prepare", str(profile), "sales", "nobody", run_dir=tmp_path / "runs")
    assert get_stage("train").methods == ("rft", "tfb")


def test_no_valid_vote_leaves_the_methods_untrained_and_says_so(tmp_path, mirror_env):
    profile = write_profile(tmp_path, tasks=("sales",))
    runs = tmp_path / "runs"
    REPLIES["audience"] = lambda request: "I like A."  # never a <vote> tag
    try:
        run(profile, runs)
    finally:
        REPLIES["audience"] = voter_reply
    for method in ("rft", "tfb"):
        unit = runs / "train" / "sales" / PLAYER / method
        assert (
            "no adapter was trained" in json.loads((unit / "untrained.json").read_text())["reason"]
        )
        assert not (unit / "adapter").exists()
        generated = read_manifest(runs / "generate" / "sales" / PLAYER / method)
        assert generated["details"]["untrained"] is True and generated["details"]["adapter"] is None
    base, rft = (
        read_jsonl(runs / "generate" / "sales" / PLAYER / m / "generations.jsonl")
        for m in ("base", "rft")
    )
    # the base model, sampled on a stream of its own (v1 sampled each method on its own)
    assert [r["text"] for r in base] != [r["text"] for r in rft]
    votes = read_jsonl(runs / "compete" / "sales" / PLAYER / "votes.jsonl")
    assert not any(v["valid"] for v in votes) and len(votes) == len(PAIRS) * TEST_ANCHORS * VOTERS


# --- the real thing ------------------------------------------------------------------------


@pytest.mark.integration
def test_embedded_model_runs_every_stage_through_notebooks(
    tmp_path, mirror_env, monkeypatch, tiny_profile, capsys
):
    """Every stage of one task through its notebook, with the real embedded model everywhere;
    the kernels' call counts reach the runner's stderr, and each unit ends with its calls."""
    from moloch import progress

    pytest.importorskip("moloch.llm.hf")
    path = tiny_profile()
    monkeypatch.setenv("MOLOCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a line at every look, not a minute

    said: list[str] = []
    reports = run_pipeline(path, log=said.append)
    assert {r.status for r in reports} == {"ran"} and len(reports) == 11
    compete = next(line for line in said if line.startswith("[done] compete"))
    assert re.search(r"[\d,]+ calls \([\d,]+ cached\), [\d,]+ new tokens, \$0\.00", compete)
    shown = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[....]")]
    assert any(re.search(r"\d+/\d+ ", line) for line in shown), shown[:5]
    runs = tmp_path / "runs" / "tiny"
    model = "SmolLM2-135M-Instruct"
    for stage in (
        "01_prepare",
        "02_candidates",
        "03_episodes",
        "04_trainsets",
        "07_compete",
        "08_probe",
    ):
        assert (runs / stage[3:] / "sales" / model / f"{stage}.ipynb").is_file()
    assert len(read_jsonl(runs / "compete/sales" / model / "votes.jsonl")) == 3 * 2 * 2
    assert len(read_jsonl(runs / "probe/sales" / model / "labels.jsonl")) == 3 * 2
    for method in ("rft", "tfb"):  # trained, or (no valid episode vote) explicitly not
        unit = runs / "train/sales" / model / method
        assert (unit / "adapter/adapter_model.safetensors").is_file() != (
            unit / "untrained.json"
        ).is_file()
    assert {r.status for r in run_pipeline(path, log=lambda _: None)} == {"skipped"}


@pytest.mark.integration
def test_embedded_player_trains_and_generates_with_its_adapter(
    tmp_path, mirror_env, tiny_profile, monkeypatch
):
    """Real players, training and judge in-process; a scripted audience makes duels winnable.
    Then the run is archived without its LoRA weights, unpacked elsewhere, and every stage
    but training rebuilt in replay mode to the same bytes."""
    from moloch.archive import fetch, pack, unpack
    from moloch.runs import find_run
    from moloch.stages import STAGE_NAMES

    pytest.importorskip("moloch.llm.hf")
    path = tiny_profile()
    runs = tmp_path / "runs"

    def decisive_voter(request) -> str:
        # Every voter prefers the candidate whose text sorts first: no duel is tied.
        a, b = re.search(r"## A\n(.*)\n\n## B\n(.*)", request.messages[-1][1], re.S).groups()
        letter = "A" if a <= b else "B"
        return f"<think>I like {letter}</think><vote>{letter}</vote>"

    def factory(unit, role):
        if role == "audience":
            backend = FakeBackend(model="fake-audience", responder=decisive_voter)
            return get_llm(unit.spec(role), cache=unit.run.cache_path, role=role,
                           backend=backend)  # fmt: skip
        return get_llm(unit.spec(role), cache=unit.run.cache_path, role=role)

    run_pipeline(path, run_dir=runs, notebooks=False, llm_factory=factory, log=lambda _: None)
    model = "SmolLM2-135M-Instruct"
    for method in ("rft", "tfb"):
        summary = json.loads(
            (runs / "train/sales" / model / method / "adapter/train_summary.json").read_text()
        )
        assert summary["steps"] == 1 and summary["examples"] > 0
        generated = read_manifest(runs / "generate/sales" / model / method)
        assert generated["details"]["adapter"].endswith(f"{method}/adapter")
        assert generated["llm"]["player"]["requests"] == 2 * 2
    labels = read_jsonl(runs / "probe/sales" / model / "labels.jsonl")
    assert {r["method"] for r in labels} == {"base", "rft", "tfb"}

    archive = pack(find_run(run_dir=runs), tmp_path / "tiny.tar.gz")
    copy = unpack(fetch(str(archive)), tmp_path / "copy")
    assert not list(copy.rglob("*.safetensors")) and list(runs.rglob("*.safetensors"))
    monkeypatch.setenv("MOLOCH_LLM_MODE", "replay")
    forced = [s for s in STAGE_NAMES if s != "train"]
    reports = run_pipeline(path, run_dir=copy, notebooks=False, llm_factory=factory,
                           force=forced, log=lambda _: None)  # fmt: skip
    assert {r.stage for r in reports if r.status == "ran"} == set(forced)
    assert outputs(copy) == outputs(runs)


SEPARATORS = "\u2028 \u2029 \r \x85 \r\n"  # str.splitlines breaks at each of them


def test_line_separators_in_replies_survive_every_output_and_reader(tmp_path, mirror_env):
    """Model text holding U+2028, U+2029, \\r and \\x85 goes through every table unchanged."""
    from moloch.cells import write_cells
    from moloch.runs import find_run

    profile = write_profile(tmp_path, tasks=("sales",))
    replies = dict(REPLIES)

    def odd(reply):
        return lambda request: reply(request).replace("<think>", f"<think>x{SEPARATORS}y ")

    for role in REPLIES:
        REPLIES[role] = odd(replies[role])
    try:
        runs = tmp_path / "runs"
        run(profile, runs)
    finally:
        REPLIES.update(replies)
    found = 0
    for path in runs.rglob("*.jsonl"):
        raw = path.read_text(encoding="utf-8")
        for row in read_jsonl(path):
            for key in ("text", "reply", "thought"):
                if isinstance(row.get(key), str) and SEPARATORS in row[key]:
                    found += 1
        assert raw.count("\n") == len(read_jsonl(path))  # one row per line, no split inside
    assert found > 50
    the_run = find_run(run_dir=runs)
    votes = the_run.table("compete", "votes.jsonl")
    assert votes.reply.str.contains("\u2028").all() and len(votes) == 3 * TEST_ANCHORS * VOTERS
    labels = the_run.table("probe", "labels.jsonl")
    assert labels.thought.dropna().str.contains("\x85").all()
    assert write_cells(the_run)  # the statistics read the same tables


def test_methods_draw_their_own_random_streams_unless_told_to_share_one(tmp_path):
    from moloch.config import load_profile
    from moloch.llm.hf import request_seed
    from moloch.players import player_requests

    spec = load_profile("smoke").players[0]
    rows = [{"anchor_id": "sales/test/0000", "messages": [["system", "s"], ["user", "u"]]}]

    def streams(player):
        return {m: [request_seed(r) for r in player_requests(player, m, rows, 7)] for m in METHODS}

    own = streams(spec)
    assert own["base"] != own["rft"] != own["tfb"] != own["base"]
    assert len(set(own["base"])) == 2  # two samples, two streams
    shared = streams(spec.model_copy(update={"common_random_numbers": True}))
    assert shared["base"] == shared["rft"] == shared["tfb"]


def test_status_says_what_a_run_would_do_and_why(tmp_path, mirror_env, capsys):
    """Up to date after a run; a deleted manifest makes its unit missing and what reads it
    stale "after" it; a same-size edit of an output names the file; a changed setting says
    so, for the units that read it only. Nothing is run to find out."""
    from moloch.runs import find_run
    from moloch.status import MISSING, STALE, UP_TO_DATE, render, run_status

    profile = write_profile(tmp_path, tasks=("sales",))
    runs = tmp_path / "runs"
    run(profile, runs)

    def states() -> dict:
        statuses = run_status(find_run(profile, runs), STAGES, ["sales"], [PLAYER])
        return {(s.stage, s.method): (s.state, s.why) for s in statuses}

    assert {state for state, _ in states().values()} == {UP_TO_DATE}
    (runs / "generate" / "sales" / PLAYER / "rft" / "manifest.json").unlink()
    now = states()
    assert now[("generate", "rft")] == (MISSING, "not run yet")
    assert now[("compete", None)] == (STALE, "after generate/rft")
    assert now[("generate", "tfb")][0] == UP_TO_DATE
    table = render(run_status(find_run(profile, runs), STAGES, ["sales"], [PLAYER]))
    assert table.splitlines()[-1] == "moloch: 8 up to date, 2 stale, 1 missing"

    run(profile, runs)
    labels = runs / "probe" / "sales" / PLAYER / "labels.jsonl"
    labels.write_bytes(labels.read_bytes().replace(b'"', b"'", 1))  # same size
    state, why = states()[("probe", None)]
    assert state == STALE and "labels.jsonl" in why

    spec = yaml.safe_load(profile.read_text())
    spec["judge"]["temperature"] = 0.3
    profile.write_text(yaml.safe_dump(spec))
    now = states()
    assert now[("probe", None)] == (STALE, "its profile settings changed")
    assert now[("train", "rft")][0] == now[("compete", None)][0] == UP_TO_DATE
    from moloch import cli

    assert cli.main(["status", "--run-dir", str(runs), "--profile", str(profile)]) == 0
    assert "its profile settings changed" in capsys.readouterr().out
    assert cli.main(["status", "--run-dir", str(runs), "--task", "sales"]) == 0  # as recorded
    printed = capsys.readouterr().out
    assert "labels.jsonl" in printed and "moloch: 10 up to date, 1 stale, 0 missing" in printed
