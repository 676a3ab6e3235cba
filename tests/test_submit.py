"""moloch submit: phases by what the stages call, shard caches over the run's, local job arrays."""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from fakes import PLAYER, write_profile
from moloch.cells import write_cells
from moloch.claims import write_claims
from moloch.config import load_profile
from moloch.llm import CallCache, ChatRequest, Completion
from moloch.llm.fake import FakeBackend
from moloch.runner import run_pipeline
from moloch.runs import Run, find_run
from moloch.stages import STAGES
from moloch.submit import Resources, _after, main, phases, submit


def test_the_paper_profile_never_holds_a_gpu_while_the_audience_or_judge_answers(tmp_path):
    paper = load_profile("paper")
    run = Run(paper, tmp_path, "paper")
    cut = phases(run, STAGES, [p.name for p in paper.players])
    assert [(p.stages, p.gpu) for p in cut] == [
        (("prepare", "candidates"), True),
        (("episodes", "trainsets"), False),
        (("train", "generate"), True),
        (("compete", "probe"), False),
    ]
    # Every stage exactly once, in order.
    assert [s for p in cut for s in p.stages] == [s.name for s in STAGES]


def test_all_local_models_make_one_phase(tmp_path, mirror_env):
    run = find_run(str(write_profile(tmp_path)), tmp_path / "run")
    assert [(len(p.stages), p.gpu) for p in phases(run, STAGES, [PLAYER])] == [(8, True)]


def test_slurm_dependencies_chain_each_shard_to_its_own_previous_job():
    jobs = [SimpleNamespace(job_id="812_0"), SimpleNamespace(job_id="812_1")]
    assert _after(jobs, local=False, kind="aftercorr") == "aftercorr:812"
    assert _after(jobs, local=False, kind="afterok") == "afterok:812_0:812_1"
    assert _after(jobs, local=True, kind="afterok") is None
    assert _after([], local=False, kind="afterok") is None


def _answer(text: str) -> Completion:
    return Completion(text=text, prompt_tokens=3, completion_tokens=2, finish_reason="stop")


def test_a_shard_cache_reads_the_run_cache_and_never_writes_it(tmp_path):
    backend = FakeBackend(model="m")
    run_cache = CallCache(tmp_path / "run.sqlite")
    request = ChatRequest.chat("sys", "hello", temperature=0.0)
    run_cache.put_many(backend, [("k1", request, _answer("from the run"))])
    run_cache.put_many(backend, [("k2", request, _answer("flipped later"))])
    with sqlite3.connect(run_cache.path) as db:  # a damaged row in the file read below
        db.execute("UPDATE calls SET text = 'x' WHERE key = 'k2'")
    run_cache.checkpoint()  # what submit does first: the shards read the file, not its log
    run_cache.close()
    before = (tmp_path / "run.sqlite").read_bytes()

    shard = CallCache(tmp_path / "shard.sqlite", lower=run_cache.path)
    found = shard.get_many(["k1", "k2", "k3"])
    assert {k: c.text for k, c in found.items()} == {"k1": "from the run"}
    assert (shard.stats.hits, shard.stats.misses, shard.stats.corrupt) == (1, 2, 1)
    shard.put_many(backend, [("k3", request, _answer("new here"))])
    assert len(shard) == 1 and (tmp_path / "run.sqlite").read_bytes() == before


def test_bad_resources_are_refused_by_name(capsys):
    assert main(["--gpus", "-1"]) == 2
    assert "--gpus -1" in capsys.readouterr().err


def test_two_shards_in_parallel_merge_into_the_single_process_result(tmp_path, mirror_env):
    profile = write_profile(tmp_path)  # sales and elections: two (task, model) shards
    single = tmp_path / "single"
    run_pipeline(str(profile), run_dir=single, notebooks=False, log=lambda _: None)
    write_cells(find_run(str(profile), single))
    write_claims(find_run(str(profile), single))

    sharded = find_run(str(profile), tmp_path / "sharded")
    jobs = submit(sharded, "local", render=False, notebooks=False, log=lambda _: None)
    shards, last = [j.result() for j in jobs[:-1]], jobs[-1].result()
    assert sorted(s["task"] for s in shards) == ["elections", "sales"]
    a, b = shards
    assert a["started"] < b["ended"] and b["started"] < a["ended"], "the shards ran in turn"

    def made(folder: Path) -> dict:
        names = [*folder.rglob("*.jsonl"), folder / "claims.csv", *folder.glob("cells/*.csv")]
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(names)}

    assert made(sharded.folder) == made(single) and "claims.csv" in made(single)
    assert set(last["merged"]) == {"sales__" + PLAYER, "elections__" + PLAYER}
    answers = len(CallCache(sharded.cache_path))
    assert answers == len(CallCache(single / "llm-cache.sqlite"))
    # every call went to a shard's own file; the run's was written by the merge alone
    assert sum(m["added"] for m in last["merged"].values()) == answers
    assert not (sharded.folder / "shards").exists() or not any(
        (sharded.folder / "shards").iterdir()
    )

    # Submitted again: every unit is up to date, and no job writes the run's cache.
    again = submit(sharded, "local", render=False, notebooks=False, log=lambda _: None)
    assert all(j.result()["ran"] == 0 for j in again[:-1])


def test_on_slurm_each_phase_is_an_array_after_its_own_shard_and_only_players_get_gpus(
    tmp_path, monkeypatch
):
    """A stand-in ``sbatch`` records what would be queued: the paper's four phases and
    the last job, with their GPUs and dependencies (nothing runs, nothing is waited for)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "queued"
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\nn=$(( $(ls "$QUEUED" | wc -l) + 800 ))\ncp "$1" "$QUEUED/$n.sh"\n'
        'echo "Submitted batch job $n"\n'
    )
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("QUEUED", str(record))
    monkeypatch.setenv("MOLOCH_LLM_MODE", "replay")  # no preflight or consent: no API here
    run = Run(load_profile("paper"), tmp_path / "paper", "paper")
    jobs = submit(run, "slurm", Resources(partition="gpu", gpus=2), log=lambda _: None)
    scripts = [(record / f"{n}.sh").read_text() for n in range(800, 805)]
    shards = len(run.profile.tasks) * len(run.profile.players)
    assert [j.job_id for j in jobs[:shards]] == [f"800_{i}" for i in range(shards)]
    gpu = ["--gpus-per-node=2" in s for s in scripts]
    assert gpu == [True, False, True, False, False]
    assert all(f"--array=0-{shards - 1}" in s for s in scripts[:4])
    after = [re.search(r"--dependency=(\S+)", s) for s in scripts]
    assert after[0] is None
    assert [a.group(1) for a in after[1:4]] == ["aftercorr:800", "aftercorr:801", "aftercorr:802"]
    assert after[4].group(1) == "afterok:" + ":".join(f"803_{i}" for i in range(shards))
    assert all("--partition=gpu" in s and "--kill-on-invalid-dep=yes" in s for s in scripts)


def test_a_run_with_unmerged_shard_caches_is_not_archived(tmp_path, mirror_env):
    from moloch.archive import ArchiveError, pack

    run = find_run(str(write_profile(tmp_path)), tmp_path / "run")
    run.record_profile()
    shard = run.folder / "shards" / f"sales__{PLAYER}" / "llm-cache.sqlite"
    CallCache(shard).put_many(
        FakeBackend(), [("k", ChatRequest.chat(None, "hi", temperature=0.0), _answer("a"))]
    )
    with pytest.raises(ArchiveError, match="not merged.*moloch cache merge"):
        pack(run)


@pytest.mark.integration
def test_a_shard_job_kernel_writes_the_shard_cache(tmp_path, mirror_env):
    """Through notebooks: the stage kernels a shard job starts inherit its cache file."""
    run = find_run(str(write_profile(tmp_path, tasks=("sales",))), tmp_path / "run")
    jobs = submit(run, "local", render=False, log=lambda _: None)
    merged = jobs[-1].result()["merged"]
    assert merged[f"sales__{PLAYER}"]["added"] == len(CallCache(run.cache_path)) > 0
    assert (run.unit_dir("episodes", "sales", PLAYER) / "03_episodes.ipynb").is_file()
