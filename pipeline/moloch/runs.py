"""Where a run lives, found one way: a profile and an optional run folder make a :class:`Run`.

A run folder (``data/runs/<profile>`` unless ``--run-dir`` says otherwise)
holds every stage unit, the call cache, the cells and claims tables and the
executed report notebooks, plus ``profile.yaml``, the profile it was last run
with. So a run folder alone is enough to find its profile again, and a folder
made by a profile of another name is refused (an edited profile of the same
name is the usual way to change a run: its stale units run again).

    >>> run = find_run("smoke")                          # data/runs/smoke
    >>> run = find_run(run_dir="/scratch/my-run")        # the profile recorded there
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import DEFAULT_PROFILE, Profile, load_profile, profile_path
from .errors import ProfileError, StageError
from .files import read_jsonl, write_atomic
from .manifests import changed_outputs, read_manifest
from .paths import runs_dir

PROFILE_COPY = "profile.yaml"  # the profile a run folder was made with
SHARDS_DIR = "shards"  # moloch submit: each shard job's call cache, until merged
JOBS_DIR = "submitit"  # moloch submit: the jobs' pickles and logs


@dataclass(frozen=True)
class Run:
    """One run: its validated profile and its folder (absolute)."""

    profile: Profile
    folder: Path
    profile_ref: str  # how a notebook kernel loads the same profile: a name or an absolute path

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def cache_path(self) -> Path:
        """The persistent call cache: every model call of the run, the resume mechanism."""
        return self.folder / "llm-cache.sqlite"

    @property
    def cells_dir(self) -> Path:
        return self.folder / "cells"

    @property
    def cells_path(self) -> Path:
        """The run's numbers: every estimate with its interval (``moloch.cells``)."""
        return self.cells_dir / "cells.csv"

    @property
    def claims_path(self) -> Path:
        return self.folder / "claims.csv"

    @property
    def report_dir(self) -> Path:
        """Where the analysis notebooks are executed for this run."""
        return self.folder / "report"

    def unit_dir(self, stage: str, task: str, model: str, method: str | None = None) -> Path:
        folder = self.folder / stage / task / model
        return folder / method if method else folder

    def finished_units(self, stage: str, task: str | None = None) -> list[Path]:
        """The folders of ``stage``'s finished units (those with a manifest), in path order."""
        folders = (p.parent for p in self.folder.glob(f"{stage}/{task or '*'}/**/manifest.json"))
        return sorted(f for f in folders if read_manifest(f) is not None)

    def table(self, stage: str, name: str, task: str | None = None):
        """The rows of ``name`` over every finished unit of ``stage`` (of one task), as a frame."""
        import pandas as pd

        units = self.finished_units(stage, task)
        for folder in units:  # never read an output that differs from what was written
            changed = changed_outputs(folder, read_manifest(folder))
            if changed:
                raise StageError(
                    f"{folder}: {', '.join(changed)}; it is not used. Make it again "
                    f"(moloch run --run-dir {self.folder} --force {stage}) or restore it"
                )
        files = [f / name for f in units if (f / name).is_file()]
        if not files:
            raise StageError(
                f"no finished {stage} unit with {name} for {task or 'any task'} in {self.folder}: "
                f"run the `{stage}` stage first"
            )
        return pd.DataFrame([row for path in files for row in read_jsonl(path)])

    def record_profile(self) -> Path:
        """Write the run's profile into its folder (what ``find_run(run_dir=...)`` reads)."""
        text = yaml.safe_dump(self.profile.model_dump(mode="json"), sort_keys=True)
        return write_atomic(self.folder / PROFILE_COPY, text)


def default_folder(profile_name: str) -> Path:
    """``data/runs/<profile>`` (or ``$MOLOCH_RUNS/<profile>``)."""
    return runs_dir() / profile_name


def find_run(profile: str | Path | Profile | None = None, run_dir: str | Path | None = None) -> Run:
    """The run of ``profile`` (a name, a YAML path or a Profile) in ``run_dir``.

    Without ``run_dir`` the folder is ``data/runs/<profile name>``. Without a
    profile it is the one recorded in ``run_dir`` (or the default profile when
    no folder is given either). A profile whose name differs from the one
    recorded in the folder is refused: the folder holds another experiment.
    """
    folder = Path(run_dir).expanduser().resolve() if run_dir else None
    if profile is None:
        recorded = folder / PROFILE_COPY if folder else None
        if recorded is not None and recorded.is_file():
            return Run(load_profile(recorded), folder, str(recorded))
        if folder is not None:
            raise ProfileError(
                f"run folder {folder} records no profile ({PROFILE_COPY}); name one with --profile"
            )
        profile = DEFAULT_PROFILE
    if isinstance(profile, Profile):
        prof, ref = profile, profile.name
    else:
        prof = load_profile(profile)
        path = profile_path(profile)
        ref = str(path.resolve()) if str(profile).endswith((".yaml", ".yml")) else prof.name
    folder = folder or default_folder(prof.name).resolve()
    recorded = folder / PROFILE_COPY
    if recorded.is_file():
        try:
            other = yaml.safe_load(recorded.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ProfileError(
                f"{recorded} is corrupt: delete it (the next run writes it again)"
            ) from None
        if isinstance(other, dict) and other.get("name") not in (None, prof.name):
            raise ProfileError(
                f"run folder {folder} holds a run of profile {other.get('name')!r}, not "
                f"{prof.name!r}: choose another folder (--run-dir) or that profile"
            )
    return Run(prof, folder, ref)
