"""The stage framework on toy stages: skip checks, reruns, manifests, locks, fingerprints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from moloch import fingerprints
from moloch.cli import DELEGATED
from moloch.errors import StageError
from moloch.files import read_jsonl, write_jsonl
from moloch.kernels import ensure_kernel
from moloch.locks import shard_lock
from moloch.manifests import read_manifest
from moloch.runner import run_pipeline, select_stages
from moloch.runs import find_run
from moloch.units import Stage, Unit

CALLS: list[str] = []


def work_a(unit) -> dict:
    CALLS.append("a")
    rows = [{"i": i, "seed": unit.profile.seed} for i in range(3)]
    n = write_jsonl(unit.out_dir / "a.jsonl", rows)
    return {"counts": {"rows": n}, "invalid": {"rows": 0}}


def work_b(unit) -> dict:
    CALLS.append("b")
    rows = read_jsonl(unit.unit_dir("a") / "a.jsonl")
    write_jsonl(unit.out_dir / "b.jsonl", [{"total": sum(r["i"] for r in rows)}])
    return {"counts": {"rows": 1}}


def work_fails(unit) -> dict:
    write_jsonl(unit.out_dir / "half.jsonl", [{"x": 1}])
    raise RuntimeError("boom")


TOY = [
    Stage("a", "none.ipynb", work_a, lambda unit: [], profile_keys=("seed",)),
    Stage("b", "none.ipynb", work_b, lambda unit: [("a", None)], profile_keys=("judge",)),
]


def toy_spec() -> dict:
    return {
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


@pytest.fixture
def profile(tmp_path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(toy_spec()))
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


# A package of its own, so the test can edit the code a stage imports.
TOY_STAGE = """
from .helper import total


def work(unit):
    return {"counts": {"total": total()}}
"""


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    pkg = tmp_path / "code" / "toystages"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text(TOY_STAGE)
    (pkg / "helper.py").write_text("def total():\n    return 3\n")
    (pkg / "unrelated.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    import importlib

    module = importlib.import_module("toystages.stage")
    yield pkg, module
    for name in [m for m in sys.modules if m.startswith("toystages")]:
        del sys.modules[name]


def test_code_fingerprint_follows_the_imports_of_the_stage(toy_package, profile, tmp_path):
    pkg, module = toy_package
    stage = Stage("s", "none.ipynb", module.work, lambda unit: [], profile_keys=("seed",))
    runs = tmp_path / "runs"
    assert [r.status for r in toy_run(profile, runs, stages=[stage])] == ["ran"]
    assert [r.status for r in toy_run(profile, runs, stages=[stage])] == ["skipped"]
    manifest = read_manifest(runs / "s" / "sales" / "p")
    assert {Path(f).name for f in manifest["code"]["files"]} >= {"stage.py", "helper.py"}
    assert not any(Path(f).name == "unrelated.py" for f in manifest["code"]["files"])

    (pkg / "unrelated.py").write_text("X = 2\n")  # not imported: still up to date
    assert [r.status for r in toy_run(profile, runs, stages=[stage])] == ["skipped"]

    # The helper starts to import a new module: the stage is stale, with no list to update.
    (pkg / "deeper.py").write_text("FACTOR = 1\n")
    (pkg / "helper.py").write_text(
        "def total():\n    from .deeper import FACTOR\n\n    return 3 * FACTOR\n"
    )
    assert [r.status for r in toy_run(profile, runs, stages=[stage])] == ["ran"]
    (pkg / "deeper.py").write_text("FACTOR = 2\n")  # an edit two imports away
    assert [r.status for r in toy_run(profile, runs, stages=[stage])] == ["ran"]
    files = {Path(f).name for f in read_manifest(runs / "s" / "sales" / "p")["code"]["files"]}
    assert "deeper.py" in files


def test_real_stage_closures_name_what_each_stage_runs():
    from moloch.stages import get_stage

    def names(stage):
        return {p.name for p in fingerprints.module_closure(get_stage(stage).work.__module__)}

    assert {"trainsets.py", "prompts.py", "seeds.py"} <= names("trainsets")
    assert {"training.py", "adapters.py", "embedded.py"} <= names("train")
    assert {"players.py", "parse.py"} <= names("candidates")
    assert {"parse.py", "audience.py"} <= names("episodes") and "players.py" not in names(
        "episodes"
    )
    assert {"probes.py", "parse.py"} <= names("probe")
    # the model runtime behind the call cache is not a stage's code (see fingerprints)
    assert not {"hf.py", "cache.py", "openai_backend.py"} & names("compete")
    assert "training.py" not in names("compete")


def test_manifest_records_what_a_unit_did(profile, tmp_path):
    runs = tmp_path / "runs"
    toy_run(profile, runs)
    manifest = read_manifest(runs / "b" / "sales" / "p")
    assert manifest["stage"] == "b" and manifest["task"] == "sales" and manifest["model"] == "p"
    assert set(manifest["fingerprint"]) == {"digest", "inputs", "params", "code"}
    assert set(manifest["fingerprint"]["inputs"]) == {"a"}
    assert manifest["outputs"]["b.jsonl"]["bytes"] == len('{"total": 3}\n')
    judge = manifest["params"]["profile"]["judge"]
    assert judge["temperature"] == 0.7 and judge["model"] == "m" and judge["dtype"] == "auto"
    assert manifest["profile_digest"] and manifest["seed"] == 1
    assert any(f.endswith("tests/test_runner.py") for f in manifest["code"]["files"])
    assert manifest["packages"]["numpy"] and manifest["counts"] == {"rows": 1}
    assert not list(runs.rglob("*.tmp"))  # atomic writes leave nothing behind
    assert find_run(run_dir=runs).profile == find_run(profile).profile  # profile.yaml recorded


def test_failed_unit_is_not_done_and_missing_inputs_are_named(profile, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(StageError, match="needs the outputs of stage 'a'"):
        toy_run(profile, runs, only=["b"])
    toy_run(profile, runs)
    broken = [TOY[0], Stage("b", "none.ipynb", work_fails, lambda unit: [("a", None)], ("seed",))]
    with pytest.raises(RuntimeError, match="boom"):
        toy_run(profile, runs, stages=broken, force=["b"])
    assert read_manifest(runs / "b" / "sales" / "p") is None  # the old manifest is gone too
    assert [r.status for r in toy_run(profile, runs)] == ["skipped", "ran"]


def test_torn_manifest_means_not_done(tmp_path):
    (tmp_path / "manifest.json").write_text('{"stage": "a", ')
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text("[]")
    assert read_manifest(tmp_path) is None


def test_unit_checks_its_shard_against_the_profile(profile, tmp_path):
    run = find_run(profile, tmp_path / "runs")
    with pytest.raises(StageError, match="has no task 'elections'"):
        Unit.of(TOY[0], run, "elections", "p")
    with pytest.raises(StageError, match="does not run per method"):
        Unit.of(TOY[0], run, "sales", "p", "rft")
    per_method = Stage("m", "none.ipynb", work_a, lambda unit: [], ("seed",), methods=("x",))
    with pytest.raises(StageError, match="runs per method"):
        Unit.of(per_method, run, "sales", "p")


def test_a_folder_of_another_profile_is_refused(profile, tmp_path):
    runs = tmp_path / "runs"
    toy_run(profile, runs)
    other = toy_spec() | {"name": "other"}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    with pytest.raises(Exception, match="holds a run of profile 'toy'"):
        find_run(path, runs)


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from moloch.locks import shard_lock
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
    assert [r.status for r in toy_run(profile, runs)] == ["ran", "ran"]  # a dead holder is none


def test_the_lock_is_not_reentrant(tmp_path):
    with (
        shard_lock(tmp_path, "sales", "p"),
        pytest.raises(StageError, match="in use"),
        shard_lock(tmp_path, "sales", "p"),
    ):
        pass
    with shard_lock(tmp_path, "sales", "p"):
        pass


def test_kernelspec_runs_this_interpreter(tmp_path, monkeypatch):
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    name = ensure_kernel(tmp_path)
    spec = json.loads((tmp_path / ".jupyter" / "kernels" / name / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec(name).argv[0] == sys.executable


def one_cell_notebook(folder: Path, code: str) -> Path:
    """``folder/source.ipynb``: a parameters cell (``parameter = 0``), then ``code``."""
    import nbformat

    notebook = nbformat.v4.new_notebook(metadata={"language_info": {"name": "python"}})
    notebook.cells = [
        nbformat.v4.new_code_cell("parameter = 0", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(code),
    ]
    nbformat.write(notebook, folder / "source.ipynb")
    return folder / "source.ipynb"


def test_the_kernels_own_stderr_goes_to_its_log_not_the_terminal(tmp_path, capfd):
    from moloch.kernels import execute_notebook, kernel_log

    source = one_cell_notebook(
        tmp_path,
        "from ipykernel.kernelapp import IPKernelApp\n"
        "IPKernelApp.instance().log.error('the kernel speaks %s', parameter)\n"
        "print('a cell prints')",
    )
    executed = tmp_path / "stage" / "unit.ipynb"
    execute_notebook(source, executed, {"parameter": 7}, tmp_path)
    log = kernel_log(tmp_path, executed)
    assert log == tmp_path / "logs" / "kernels" / "stage" / "unit.log"
    assert "the kernel speaks 7" in log.read_text()
    assert "the kernel speaks" not in capfd.readouterr().err
    assert "a cell prints" in executed.read_text()  # a cell's output stays in the notebook
    assert "MOLOCH_KERNEL_LOG" not in os.environ


def test_one_warm_kernel_serves_a_run_only_without_a_gpu_or_a_vllm_role(
    profile, tmp_path, monkeypatch
):
    from moloch import runner
    from moloch.stages import STAGES

    run = find_run(profile, tmp_path / "runs")
    monkeypatch.setattr(runner, "GPU_DEVICES", (str(tmp_path / "nvidiactl"),))  # none here
    assert runner.warm_kernel_fits(run, STAGES, ["p"])
    edit(profile, "judge", "backend", "vllm")
    vllm_judge = find_run(profile, tmp_path / "runs")
    assert not runner.warm_kernel_fits(vllm_judge, STAGES, ["p"])
    assert runner.warm_kernel_fits(vllm_judge, [s for s in STAGES if s.name != "probe"], ["p"])
    (tmp_path / "nvidiactl").touch()  # a GPU
    assert not runner.warm_kernel_fits(run, STAGES, ["p"])


def test_a_warm_kernel_runs_notebook_after_notebook_each_from_an_empty_namespace(tmp_path):
    import nbformat

    from moloch.kernels import WarmKernel

    source = one_cell_notebook(
        tmp_path,
        "import os\n"
        "print(os.getpid(), parameter, 'left' in dir(), os.environ['MOLOCH_TEST_ENV'])\n"
        "left = 1\n"
        "from ipykernel.kernelapp import IPKernelApp\n"
        "IPKernelApp.instance().log.error('warm kernel %s', parameter)",
    )
    with WarmKernel(tmp_path, {"MOLOCH_TEST_ENV": "given"}) as kernel:
        for n in (1, 2):
            kernel.execute(source, tmp_path / f"unit{n}.ipynb", {"parameter": n})
        assert not kernel.manager.clients  # papermill's clients closed after each notebook
    printed = [
        nbformat.read(tmp_path / f"unit{n}.ipynb", as_version=4).cells[-1].outputs[0]["text"]
        for n in (1, 2)
    ]
    pids = {line.split()[0] for line in printed}
    assert len(pids) == 1 and [line.split()[1:] for line in printed] == [
        ["1", "False", "given"],
        ["2", "False", "given"],  # the first notebook's variable is gone
    ]
    assert "warm kernel 1" in kernel.log.read_text() and "warm kernel 2" in kernel.log.read_text()
    assert kernel.manager is None and not Path(f"/proc/{pids.pop()}").exists()


def test_ctrl_c_in_a_warm_kernels_notebook_shuts_it_down_without_a_traceback(
    tmp_path, capfd, caplog
):
    import gc
    import signal
    import threading

    from moloch.kernels import WarmKernel

    source = one_cell_notebook(tmp_path, "import time\ntime.sleep(30)")
    started = time.monotonic()
    timer = threading.Timer(3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt), WarmKernel(tmp_path) as kernel:
        kernel.execute(source, tmp_path / "unit.ipynb", {"parameter": 1})
    timer.join()
    assert time.monotonic() - started < 25 and kernel.manager is None
    gc.collect()  # a cell's task left behind would now report its exception (asyncio's log)
    assert "Traceback" not in capfd.readouterr().err
    assert "never retrieved" not in caplog.text


@pytest.mark.parametrize("command", sorted(DELEGATED))
def test_every_command_is_a_moloch_subcommand_with_its_own_help(command, capsys):
    from moloch import cli

    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: moloch {command} ")


def test_a_bad_argument_exits_2_and_a_failure_1(tmp_path, capsys):
    from moloch import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["run", "--frobnicate"])
    assert done.value.code == 2
    assert cli.main(["run", "--max-cost", "-1"]) == 2
    assert "--max-cost -1.0: give a number of dollars" in capsys.readouterr().err
