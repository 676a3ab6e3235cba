"""Nothing corrupt is used, every failure is one clear line, nothing is left behind.

One case of each kind the reliability suite (``nox -s faults``) runs by the dozen: a same-size
edit of a stage output, a flipped cached answer, a garbled adapter, torn manifests, bad
names and numbers, Ctrl-C and a full disk at the command line, an unreachable server, and
markup in model output.
"""

from __future__ import annotations

import errno
import json
import socket
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from fakes import PLAYER, fake_factory, fake_train_adapter, run, write_profile
from moloch.config import ModelSpec, load_profile
from moloch.errors import ModelError, ProfileError, StageError
from moloch.llm.adapters import adapter_sha256, verified_sha256
from moloch.manifests import read_manifest


@pytest.fixture(autouse=True)
def no_real_training(monkeypatch):
    monkeypatch.setattr("moloch.training.train_adapter", fake_train_adapter)


@pytest.fixture
def profile(tmp_path, mirror_env) -> Path:
    return write_profile(tmp_path, tasks=("sales",))


def outputs(runs: Path) -> dict[str, bytes]:
    return {str(p.relative_to(runs)): p.read_bytes() for p in sorted(runs.rglob("*.jsonl"))}


def flip(path: Path, old: bytes, new: bytes) -> None:
    """A same-size edit: one byte string replaced by another of the same length."""
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new, 1))


def test_a_same_size_edit_of_an_output_is_never_used(profile, tmp_path):
    runs = tmp_path / "runs"
    run(profile, runs)
    clean = outputs(runs)
    generations = runs / "generate" / "sales" / PLAYER / "base" / "generations.jsonl"
    flip(generations, b"message", b"MESSAGE")
    with pytest.raises(StageError, match=r"generations.jsonl \(changed since it was written\)"):
        run(profile, runs, only=["compete"], force=["compete"])
    notices: list[str] = []
    from moloch.runner import run_pipeline
    from moloch.stages import STAGES

    run_pipeline(profile, STAGES, run_dir=runs, notebooks=False, llm_factory=fake_factory(),
                 force=["compete"], log=notices.append)  # fmt: skip
    assert any(n.startswith("[redo] generate/sales") for n in notices)
    assert outputs(runs) == clean  # the edit was made again from the cache, then used


def test_a_flipped_cached_answer_is_not_served(profile, tmp_path):
    runs = tmp_path / "runs"
    run(profile, runs)
    clean = outputs(runs)
    with sqlite3.connect(runs / "llm-cache.sqlite") as db:
        sql = "SELECT key, text FROM calls WHERE text LIKE '%vote%' AND instr(text, 'A') > 0"
        key, text = db.execute(sql).fetchone()  # an answer the edit below changes
        db.execute("UPDATE calls SET text = ? WHERE key = ?", (text.replace("A", "B"), key))
    calls = []

    def counting(unit, role):
        llm = fake_factory()(unit, role)
        calls.append(llm)
        return llm

    run(profile, runs, force=["episodes", "compete"], llm_factory=counting)
    assert outputs(runs) == clean
    assert sum(llm.cache.stats.corrupt for llm in calls) == 1
    assert sum(llm.backend.calls for llm in calls) == 1  # only the dropped answer, once more


def test_a_garbled_adapter_is_refused_by_name(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 16}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    recorded = adapter_sha256(folder)
    (folder / "train_summary.json").write_text(json.dumps({"adapter_sha256": recorded}))
    assert verified_sha256(folder) == recorded
    flip(folder / "adapter_model.safetensors", b"weights", b"wEights")
    with pytest.raises(ModelError, match=r"adapter .* does not match the hash recorded"):
        verified_sha256(folder)


@pytest.mark.parametrize("content", [b"\xff\xfe{not utf-8", b"[]", b'{"stage": "x"}', b""])
def test_a_torn_or_foreign_manifest_means_the_unit_runs_again(profile, tmp_path, content):
    runs = tmp_path / "runs"
    run(profile, runs)
    clean = outputs(runs)
    (runs / "probe" / "sales" / PLAYER / "manifest.json").write_bytes(content)
    assert read_manifest(runs / "probe" / "sales" / PLAYER) is None
    reports = run(profile, runs)
    assert [r.stage for r in reports if r.status == "ran"] == ["probe"]
    assert outputs(runs) == clean


def test_leftovers_of_an_interrupted_unit_are_removed(profile, tmp_path):
    runs = tmp_path / "runs"
    run(profile, runs)
    leftover = runs / "compete" / "sales" / PLAYER / ".votes.jsonl.4242.tmp"
    leftover.write_text("")
    run(profile, runs, force=["compete"])
    assert not leftover.exists()


def _profile_with(tmp_path: Path, **changes) -> Path:
    spec = load_profile("smoke").model_dump(mode="json")
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            spec[section] = spec[section] | {field: value}
        else:
            spec[section] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "../../x"}, "key 'name': use letters, digits"),
        ({"training__max_steps": -5}, "key 'training.max_steps'"),
        ({"training__max_steps": 0}, "0 steps trains nothing"),
        ({"tasks": ["sales", "sales"]}, "a task is listed twice"),
        ({"audience__max_tokens": None}, "the transformers backend needs a number"),
    ],
)
def test_bad_names_and_numbers_are_refused_at_the_door(tmp_path, changes, message):
    with pytest.raises(ProfileError, match=message):
        load_profile(_profile_with(tmp_path, **changes))


def test_bad_player_names_are_refused_at_the_door(tmp_path):
    player = load_profile("smoke").players[0].model_dump(mode="json")
    with pytest.raises(ProfileError, match=r"players.0.name': use letters"):
        load_profile(_profile_with(tmp_path, players=[player | {"name": "a/b"}]))
    with pytest.raises(ProfileError, match="players need distinct names"):
        load_profile(_profile_with(tmp_path, players=[player, player]))


def test_command_line_failures_are_one_line_with_the_conventional_code(
    tmp_path, monkeypatch, capsys
):
    from moloch import cli

    assert cli.main(["run", "--profile", "nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moloch: error: unknown profile 'nowhere'")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("moloch.runner.run_pipeline", interrupted)
    assert cli.main(["run"]) == 130
    assert "interrupted; finished work is kept" in capsys.readouterr().err

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/votes.jsonl")

    monkeypatch.setattr("moloch.runner.run_pipeline", full)
    assert cli.main(["run"]) == 1
    assert "No space left on device writing /data/runs/x/votes.jsonl" in capsys.readouterr().err


def test_an_unreachable_server_fails_the_preflight_in_seconds(monkeypatch):
    from moloch.llm.openai_backend import OpenAIBackend

    with socket.socket() as s:  # a free port on this machine, with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ModelSpec(backend="openai", model="gpt-4o-mini", temperature=0.1, max_tokens=None)
    backend = OpenAIBackend(spec, env={"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"})
    start = time.monotonic()
    with pytest.raises(ModelError, match=rf"server at http://127.0.0.1:{port}/v1 cannot be"):
        backend.check()
    assert time.monotonic() - start < 10


MARKUP = [
    "<script>alert(1)</script>",
    "# heading",
    "{{< embed x >}}",
    "@fig-x",
    "#set page(fill: red)",
    "| a | b |\n|---|---|\n| c | d |",
]


def test_untrusted_text_is_shown_literally():
    from moloch.report.analysis import literal

    for text in MARKUP:
        shown = literal(text)
        import pypandoc

        html = pypandoc.convert_text(f"> {shown}", "html5", format="markdown")
        assert "<script>" not in html and "<h1" not in html and "<table" not in html
        assert "{{&lt;" in html or "{{<" not in text
        typst = pypandoc.convert_text(f"> {shown}", "typst", format="markdown")
        assert "#set page" not in typst.replace("\\#set", "")  # a literal #, not a command


def test_a_kill_names_the_stage_it_met_and_never_counts_a_run_that_ended_first(tmp_path):
    import os
    import subprocess

    from moloch import faults

    finished = tmp_path / "finished"
    for i, unit in enumerate(("prepare/a", "train/a", "train/b", "compete/a")):
        (finished / unit).mkdir(parents=True)
        (finished / unit / "manifest.json").write_text("{}")
        os.utime(finished / unit / "manifest.json", (i, i))
    units = faults._units_by_stage(finished)
    assert list(units) == ["prepare", "train", "compete"]
    seconds = faults._stage_seconds(finished, units, started=-1.0)
    assert seconds == {"prepare": 1.0, "train": 2.0, "compete": 1.0}
    assert faults._stage_at(finished, units) == "after the stages"
    (finished / "train/b/manifest.json").unlink()
    assert faults._stage_at(finished, units) == "train"
    assert faults._stage_at(tmp_path / "empty", units) == "prepare"

    ended = subprocess.Popen(["true"], start_new_session=True)
    ended.wait()
    assert faults._kill_at(ended, "group", tmp_path, time.monotonic() + 60) is None
    assert faults._reached(ended, finished, units, "compete") is None
    running = subprocess.Popen(["sleep", "30"], start_new_session=True)
    assert faults._kill_at(running, "group", tmp_path, time.monotonic() + 0.2) == "process group"
    assert running.wait(timeout=5) == -9


def test_the_suite_s_runs_feel_ctrl_c_even_when_it_was_started_with_sigint_ignored():
    import signal
    import subprocess
    import sys

    from moloch import faults

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
    try:
        faults.children_feel_ctrl_c()
        probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
        child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert child.stdout.strip() == "False"
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_suite_makes_its_keep_folder_and_refuses_a_kill_count_below_one(tmp_path, monkeypatch):
    from moloch import faults

    seen = {}
    monkeypatch.setattr(faults, "run", lambda kills, seed, keep, only: seen.update(keep=keep) or {})
    keep, out = tmp_path / "not" / "yet", tmp_path / "faults.json"
    assert faults.main(["--only", "bad_input", "--keep", str(keep), "--out", str(out)]) == 0
    assert seen["keep"] == keep and keep.is_dir() and out.is_file()
    with pytest.raises(SystemExit) as refused:
        faults.main(["--kills", "0", "--out", str(out)])
    assert refused.value.code == 2


@pytest.mark.integration
def test_a_killed_run_leaves_no_kernel_and_resumes_to_the_same_result(tmp_path, mirror_env):
    """One case of the kill campaign: a runner killed with SIGKILL mid-run, then resumed."""
    import os
    import shutil

    from moloch import faults

    cache = tmp_path / "cache"
    shutil.copytree(os.environ["MOLOCH_CACHE"], cache)
    result = faults.kill_campaign(kills=1, work=tmp_path, cache=cache, seed=3)
    case = result["cases"][0]
    assert result["kills"] == 1 and case["signalled"] == "process group"  # killed, not finished
    assert case["exit_code"] == -9 and case["stage"] in result["kills_by_stage"]
    assert case["orphans"] == 0 and case["leftovers"] == []
    assert case["resumed_ok"] and case["identical"]


@pytest.mark.integration
def test_hostile_markup_in_model_output_is_shown_literally_in_the_book(tmp_path, mirror_env):
    import os
    import shutil

    from moloch import faults

    cache = tmp_path / "cache"
    shutil.copytree(os.environ["MOLOCH_CACHE"], cache)
    result = faults.markup_campaign(tmp_path, cache)
    assert result["shown_literally"] == len(faults.MARKUP) == 6, result["details"]
    assert result["toc_unchanged"] and not result["script_tag_live"]


def test_a_gated_model_without_a_token_fails_the_preflight_naming_both(tmp_path, monkeypatch):
    """The paper's Llama needs an accepted licence: without HF_TOKEN (and not cached) the run
    stops at the preflight, before any stage and any paid call, naming model and variable."""
    from moloch.llm import preflight

    # An empty Hugging Face cache (the hub reads its constant at each lookup).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("HF_TOKEN", "HF_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    llama = load_profile("paper").player("Llama-3.1-8B-Instruct")
    local = llama.model_copy(update={"backend": "transformers"})  # vLLM is absent here
    with pytest.raises(ModelError, match=r"meta-llama/Llama-3.1-8B-Instruct is a gated .*HF_TOKEN"):
        preflight(local)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    preflight(local)  # with a token the download is left to the hub (no call made here)
