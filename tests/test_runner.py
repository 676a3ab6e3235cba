"""The stage framework on toy stages: skip checks, reruns, manifests, locks, atomic files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from moloch import runner
from moloch.errors import StageError
from moloch.runner import (
    Stage,
    read_jsonl,
    read_manifest,
    run_pipeline,
    select_stages,
    shard_lock,
    write_jsonl,
)

CALLS: list[str] = []


def work_a(ctx) -> dict:
    CALLS.append("a")
    n = write_jsonl(ctx.out_dir / "a.jsonl", [{"i": i, "seed": ctx.profile.seed} for i in range(3)])
    return {"counts": {"rows": n}, "invalid": {"rows": 0}}


def work_b(ctx) -> dict:
    CALLS.append("b")
    rows = read_jsonl(ctx.unit_dir("a") / "a.jsonl")
    write_jsonl(ctx.out_dir / "b.jsonl", [{"total": sum(r["i"] for r in rows)}])
    return {"counts": {"rows": 1}}


def work_fails(ctx) -> dict:
    write_jsonl(ctx.out_dir / "half.jsonl", [{"x": 1}])
    raise RuntimeError("boom")


TOY = [
    Stage("a", "none.ipynb", work_a, lambda ctx: [], profile_keys=("seed",)),
    Stage("b", "none.ipynb", work_b, lambda ctx: [("a", None)], profile_keys=("judge",)),
]


@pytest.fixture
def profile(tmp_path) -> Path:
    spec = {
        "name": "toy", "description": "toy", "seed": 1, "comparable": False, "tasks": ["sales"],
        "anchors": {"train": 1, "test": 1},
        "players": [{"name": "p", "backend": "fake", "model": "m", "temperature": 0.7,
                     "max_tokens": 8}],
        "audience": {"backend": "fake", "model": "m", "voters": 1, "temperature": 0.1,
                     "max_tokens": 8},
        "judge": {"backend": "fake", "model": "m", "temperature": 0.7, "max_tokens": 8},
        "training": {"mode": "faithful", "learning_rate": 1e-4, "epochs": 1, "batch_size": 1,
                     "warmup_ratio": 0.0, "bf16": False, "gradient_checkpointing": False,
                     "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]}},
    }  # fmt: skip
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    CALLS.clear()
    return path


def toy_run(profile, runs, stages=TOY, **kwargs):
    return run_pipeline(
        profile, stages, run_dir=runs, notebooks=False, log=lambda _: None, **kwargs
    )


def edit(profile: Path, section: str, key: str, value) -> None:
    spec = yaml.safe_load(profile.read_text())
    if key:
        spec[section][key] = value
    else:
        spec[section] = value
    profile.write_text(yaml.safe_dump(spec))


def test_select_stages():
    assert [s.name for s in select_stages(TOY, only=["b"])] == ["b"]
    assert [s.name for s in select_stages(TOY, until="a")] == ["a"]
    assert [s.name for s in select_stages(TOY)] == ["a", "b"]
    with pytest.raises(StageError, match="unknown stage 'c'"):
        select_stages(TOY, until="c")


def test_unchanged_units_are_skipped_and_changes_rerun_what_depends(profile, tmp_path):
    runs = tmp_path / "runs"
    assert [r.status for r in toy_run(profile, runs)] == ["ran", "ran"]
    assert [r.status for r in toy_run(profile, runs)] == ["skipped", "skipped"]
    assert CALLS == ["a", "b"]

    edit(profile, "judge", "temperature", 0.3)  # only b reads the judge section
    assert [r.status for r in toy_run(profile, runs)] == ["skipped", "ran"]

    edit(profile, "seed", "", 2)  # a's output changes, so b's input does
    assert [r.status for r in toy_run(profile, runs)] == ["ran", "ran"]

    assert [r.status for r in toy_run(profile, runs, force=["a"])] == ["ran", "skipped"]

    (runs / "a" / "sales" / "p" / "a.jsonl").write_text("tampered\n")
    assert [r.status for r in toy_run(profile, runs)][0] == "ran"  # size changed
    assert CALLS == ["a", "b", "b", "a", "b", "a", "a"]


def test_code_change_reruns(profile, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    toy_run(profile, runs)
    original = runner.code_hash
    monkeypatch.setattr(runner, "code_hash", lambda s: original(s) + ("x" if s.name == "b" else ""))
    assert [r.status for r in toy_run(profile, runs)] == ["skipped", "ran"]


def test_manifest_records_what_a_unit_did(profile, tmp_path):
    runs = tmp_path / "runs"
    toy_run(profile, runs)
    manifest = read_manifest(runs / "b" / "sales" / "p")
    assert manifest["stage"] == "b" and manifest["task"] == "sales" and manifest["model"] == "p"
    assert set(manifest["fingerprint"]) == {"digest", "inputs", "params", "code"}
    assert set(manifest["fingerprint"]["inputs"]) == {"a"}
    assert manifest["outputs"]["b.jsonl"]["bytes"] == len('{"total": 3}\n')
    assert manifest["params"]["profile"] == {"judge": yaml.safe_load(profile.read_text())["judge"]
                                             | {"top_p": 1.0, "batch_size": 8,
                                                "max_concurrency": 8, "revision": None,
                                                "base_url_env": "OPENAI_BASE_URL",
                                                "api_key_env": "OPENAI_API_KEY",
                                                "enable_thinking": None,
                                                "force_answer": False}}  # fmt: skip
    assert manifest["profile_digest"] and manifest["seed"] == 1
    assert "pipeline/moloch/runner.py" in manifest["code"]["files"]
    assert manifest["packages"]["numpy"] and manifest["counts"] == {"rows": 1}
    assert not list(runs.rglob("*.tmp"))  # atomic writes leave nothing behind


def test_failed_unit_is_not_done_and_missing_inputs_are_named(profile, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(StageError, match="needs the outputs of stage 'a'"):
        toy_run(profile, runs, only=["b"])
    toy_run(profile, runs)
    broken = [TOY[0], Stage("b", "none.ipynb", work_fails, lambda ctx: [("a", None)], ("seed",))]
    with pytest.raises(RuntimeError, match="boom"):
        toy_run(profile, runs, stages=broken, force=["b"])
    assert read_manifest(runs / "b" / "sales" / "p") is None  # the old manifest is gone too
    assert [r.status for r in toy_run(profile, runs)] == ["skipped", "ran"]


def test_torn_manifest_and_bad_rows(tmp_path):
    (tmp_path / "manifest.json").write_text('{"stage": "a", ')
    assert read_manifest(tmp_path) is None
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(StageError, match=r"rows.jsonl, line 2: not valid JSON"):
        read_jsonl(tmp_path / "rows.jsonl")
    with pytest.raises(StageError, match="missing"):
        read_jsonl(tmp_path / "nope.jsonl")


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from moloch.runner import shard_lock
    with shard_lock(Path(sys.argv[1]), "sales", "p"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_second_run_on_the_same_shard_is_refused_until_the_holder_dies(profile, tmp_path):
    runs = tmp_path / "runs" / "toy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(runs)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StageError, match=rf"in use by pid {holder.pid}"):
            toy_run(profile, runs)
    finally:
        holder.kill()
        holder.wait()
    # The lock file is still there, with the dead pid in it: no obstacle.
    assert str(holder.pid) in (runs / ".locks" / "sales__p.lock").read_text()
    assert [r.status for r in toy_run(profile, runs)] == ["ran", "ran"]


def test_lock_is_reentrant_for_the_units_a_runner_starts(tmp_path):
    with shard_lock(tmp_path, "sales", "p"):
        with shard_lock(tmp_path, "sales", "p", reentrant=True):
            pass
        with pytest.raises(StageError, match="in use"), shard_lock(tmp_path, "sales", "p"):
            pass
    with shard_lock(tmp_path, "sales", "p"):
        pass


def test_kernelspec_runs_this_interpreter(tmp_path, monkeypatch):
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    name = runner.ensure_kernel(tmp_path)
    spec = json.loads((tmp_path / ".jupyter" / "kernels" / name / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec(name).argv[0] == sys.executable
