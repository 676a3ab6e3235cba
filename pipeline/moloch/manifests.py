"""A unit's manifest: what it read, with which settings and code, what it wrote, and how.

``manifest.json`` is written last, so its presence is what marks a unit done;
a torn or unreadable manifest counts as "not done" and the unit runs again.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import subprocess
import time
from functools import cache
from pathlib import Path

from .files import read_json
from .hashing import file_sha256, text_sha256
from .llm.adapters import not_archived
from .paths import ROOT

MANIFEST = "manifest.json"
PACKAGES = ("torch", "transformers", "peft", "trl", "numpy", "pandas", "papermill", "pydantic")


def read_manifest(folder: Path) -> dict | None:
    """The manifest of the unit in ``folder``, or None while the unit is not done."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path, "manifest")
    except Exception:  # torn or corrupt: the unit is not done and runs again
        return None
    return manifest if isinstance(manifest, dict) and "outputs" in manifest else None


def output_files(folder: Path) -> dict:
    """Every output of a unit folder (not the manifest, notebooks or hidden files): hash, size."""
    outputs = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder)
        if (
            not path.is_file()
            or rel.as_posix() == MANIFEST
            or path.suffix == ".ipynb"
            or any(part.startswith(".") for part in rel.parts)
        ):
            continue
        outputs[rel.as_posix()] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return outputs


def outputs_hash(manifest: dict) -> str:
    """One hash of the outputs a manifest records (what a downstream unit depends on)."""
    return text_sha256(json.dumps(manifest["outputs"], sort_keys=True))


def changed_outputs(folder: Path, manifest: dict) -> list[str]:
    """The recorded outputs of ``folder`` that are missing or differ from their recorded
    SHA-256 (empty: every output is as written). Sizes are compared first; each file is
    hashed once per process while its size and modification time stay the same. A file
    a run archive left out on purpose (``NOT_ARCHIVED``, same hash) is not missing."""
    problems = []
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict):
        return ["(the manifest lists no outputs)"]
    left_out = not_archived(folder).get("files", {})
    for name, info in outputs.items():
        path = Path(folder) / name
        if (
            not path.is_file()
            and isinstance(info, dict)
            and left_out.get(name) == info.get("sha256")
        ):
            continue  # not in the archive: a replay needs only its hash
        if not isinstance(info, dict) or not path.is_file():
            problems.append(f"{name} (missing)")
            continue
        stat = path.stat()
        if stat.st_size != info.get("bytes") or (
            _sha256(str(path), stat.st_size, stat.st_mtime_ns) != info.get("sha256")
        ):
            problems.append(f"{name} (changed since it was written)")
    return problems


@cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def git_commit() -> dict:
    """The repository's commit and whether the package has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "pipeline"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def call_totals(manifest: dict) -> dict:
    """A unit's model calls over its roles: requests, cache hits, new tokens and dollars
    (NaN where a paid model has no listed price; a manifest from before dollars: 0)."""
    served = list((manifest.get("llm") or {}).values())
    spent = [s.get("dollars", 0.0) for s in served]

    def total(*fields: str) -> int:
        return sum(int(s.get(f, 0)) for s in served for f in fields)

    return {
        "requests": total("requests"),
        "cache_hits": total("hits"),
        "new_tokens": total("new_prompt_tokens", "new_completion_tokens"),
        "dollars": float("nan") if None in spent else float(sum(spent)),
    }


def summary_line(t: dict) -> str:
    """A finished unit's calls (its ``call_totals``) in one line, as the runner prints them
    after ``[done]``."""
    dollars = "$?" if math.isnan(t["dollars"]) else f"${t['dollars']:.2f}"
    return (
        f"{t['requests']:,} calls ({t['cache_hits']:,} cached), {t['new_tokens']:,} new "
        f"tokens, {dollars}"
    )


def build_manifest(unit, fingerprint: dict, summary: dict, wall_s: float, llm: dict) -> dict:
    """The manifest of a unit that just did its work (``summary``: what ``work`` returned;
    ``llm``: its models' call counts and dollars, ``moloch.budget.spending``)."""
    return {
        "stage": unit.stage.name,
        "task": unit.task,
        "model": unit.model,
        "method": unit.method,
        "profile": unit.profile.name,
        "profile_digest": unit.profile.digest(),
        "fingerprint": {k: fingerprint[k] for k in ("digest", "inputs", "params", "code")},
        "params": fingerprint["settings"],
        "code": {"hash": fingerprint["code"], "files": fingerprint["code_files"], **git_commit()},
        "models": {role: unit.spec(role).model_dump(mode="json") for role in unit.stage.roles},
        "seed": unit.profile.seed,
        "packages": package_versions(),
        "counts": summary.get("counts", {}),
        "invalid": summary.get("invalid", {}),
        "details": {k: v for k, v in summary.items() if k not in ("counts", "invalid")},
        "llm": llm,
        "wall_s": round(wall_s, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "outputs": output_files(unit.out_dir),
    }
