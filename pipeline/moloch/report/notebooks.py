"""Execute the analysis notebooks of a run with papermill, and stage them for the book.

Each chapter embeds cells of one analysis notebook (``pipeline/analysis/``),
executed with the run's parameters into ``data/runs/<profile>/report/<chapter>.ipynb``.
Before rendering, the executed notebooks are copied to ``_analysis/`` in the
repository root, the fixed place the chapters' ``embed`` shortcodes point at
(Quarto does not execute them: ``execute: enabled: false``). Notebooks only read
a finished run; nothing here reruns a pipeline stage.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..config import load_profile
from ..errors import StageError
from ..paths import PACKAGE_DIR, PIPELINE_DIR, ROOT, run_dir

ANALYSIS_DIR = PIPELINE_DIR / "analysis"
STAGED_DIR = ROOT / "_analysis"

# chapter -> (analysis notebook, extra parameters); every notebook also gets profile and run_dir.
CHAPTER_NOTEBOOKS: dict[str, tuple[str, dict]] = {
    "index": ("summary", {}),
    "simulation": ("simulation", {}),
    "sales": ("task", {"task": "sales"}),
    "elections": ("task", {"task": "elections"}),
    "social_media": ("task", {"task": "social_media"}),
    "tradeoff": ("tradeoff", {}),
    "released": ("released", {}),
    "appendix": ("provenance", {}),
}


def chapter_task(chapter: str) -> str | None:
    """The task a chapter is about (for ``--stages``), or None."""
    return CHAPTER_NOTEBOOKS.get(chapter, ("", {}))[1].get("task")


def _lookup(chapter: str) -> tuple[Path, dict]:
    if chapter not in CHAPTER_NOTEBOOKS:
        raise StageError(
            f"no analysis notebook for chapter {chapter!r}; "
            f"chapters: {', '.join(CHAPTER_NOTEBOOKS)}"
        )
    name, extra = CHAPTER_NOTEBOOKS[chapter]
    source = ANALYSIS_DIR / f"{name}.ipynb"
    if not source.is_file():
        raise StageError(
            f"chapter {chapter!r} needs the analysis notebook {source}, which is missing"
        )
    return source, extra


def profile_run(profile: str) -> Path:
    """The run folder of a profile given by name or YAML path: ``data/runs/<its name>``."""
    return run_dir(load_profile(profile).name)


def executed_path(profile: str, chapter: str) -> Path:
    return profile_run(profile) / "report" / f"{chapter}.ipynb"


def _newest_manifest(profile: str) -> float:
    times = [p.stat().st_mtime for p in profile_run(profile).glob("*/**/manifest.json")]
    return max(times, default=0.0)


def is_stale(profile: str, chapter: str) -> bool:
    """Not executed yet, or older than its notebook, the package's code or the run's outputs."""
    out = executed_path(profile, chapter)
    if not out.is_file():
        return True
    source, _ = _lookup(chapter)
    built = out.stat().st_mtime
    newest_code = max(p.stat().st_mtime for p in PACKAGE_DIR.rglob("*.py"))
    return max(source.stat().st_mtime, newest_code, _newest_manifest(profile)) > built


def execute_chapter(profile: str, chapter: str) -> Path:
    """Execute a chapter's analysis notebook for ``profile``; a failed run keeps the old one."""
    import papermill

    from ..runner import ensure_kernel

    folder = profile_run(profile)
    if not folder.is_dir():
        raise StageError(
            f"no run at {folder}: run the study first (`nox -s reproduce -- --profile {profile}`)"
        )
    source, extra = _lookup(chapter)
    out = executed_path(profile, chapter)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.ipynb")
    offered = {"profile": profile, "run_dir": str(folder), **extra}
    declared = papermill.inspect_notebook(str(source))  # the released chapter needs no run
    parameters = {k: v for k, v in offered.items() if k in declared}
    try:
        papermill.execute_notebook(
            str(source),
            str(tmp),
            parameters=parameters,
            kernel_name=ensure_kernel(folder),  # the interpreter running this, whatever its venv
            cwd=str(ROOT),
            progress_bar=False,
        )
    except papermill.PapermillExecutionError as err:
        raise StageError(
            f"analysis notebook {source.name} failed for chapter {chapter!r} "
            f"(its partial output is in {tmp}): {err.ename}: {err.evalue}"
        ) from err
    os.replace(tmp, out)
    return out


def execute_stale(profile: str, force: bool = False) -> list[str]:
    """Execute every chapter's notebook that is stale (all of them with ``force``)."""
    done = []
    for chapter in CHAPTER_NOTEBOOKS:
        if force or is_stale(profile, chapter):
            execute_chapter(profile, chapter)
            done.append(chapter)
    return done


def stage(profile: str, staged: Path = STAGED_DIR) -> list[Path]:
    """Copy the run's executed notebooks to ``_analysis/``, where the chapters embed from."""
    missing = [c for c in CHAPTER_NOTEBOOKS if not executed_path(profile, c).is_file()]
    if missing:
        raise StageError(
            f"the run {profile_run(profile)} has no executed notebook for chapter(s) "
            f"{', '.join(missing)}: run `nox -s report -- --profile {profile}` to execute them"
        )
    staged.mkdir(exist_ok=True)
    copied = []
    for chapter in CHAPTER_NOTEBOOKS:
        target = staged / f"{chapter}.ipynb"
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(executed_path(profile, chapter), tmp)
        os.replace(tmp, target)
        copied.append(target)
    return copied
