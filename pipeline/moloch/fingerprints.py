"""What decides a unit's outputs, as hashes: its inputs, its settings and its code.

- **inputs**: the output hashes recorded in the manifest of every unit it
  reads (and, for ``prepare``, the SHA-256 of the input files);
- **params**: the profile sections the stage names, this shard's player only;
- **code**: every file the stage's work runs, *derived*: the module that
  defines the work function and, transitively, every module of the same
  package that it imports (module- or function-level, absolute or relative),
  plus the stage's notebook and the prompt wording in ``data/protocol/``.
  Parent packages' ``__init__`` files count as code, but their own imports are
  followed only where the package itself is imported. No list is kept by hand,
  so a helper a stage starts to import is in its fingerprint at once.

The model runtime behind the call cache (backends, the cache) is not a stage's
code: the runner hands a unit its models, so a stage imports only the request
and parsing modules. Rerunning a stage for a backend change would replay the
same cached answers anyway, as the cache key names the model (weights, dtype,
device: the backend's identity), not the code that serves it.

A unit whose manifest carries the current fingerprint is up to date.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from functools import cache
from pathlib import Path

from .errors import StageError
from .hashing import text_sha256
from .manifests import changed_outputs, outputs_hash, read_manifest
from .paths import NOTEBOOKS_DIR, PROTOCOL_DIR, ROOT
from .units import Unit

# --- code ------------------------------------------------------------------------------


def _package_root(top: str) -> Path | None:
    """The folder of package ``top``; None for a plain module (a script, a test file)."""
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise StageError(f"module {top!r} cannot be found: cannot fingerprint its code")
    if not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _module_file(root: Path, top: str, module: str) -> Path | None:
    """The source file of ``module`` (a package's ``__init__.py``), if it is in the package."""
    parts = module.split(".")
    if parts[0] != top:
        return None
    base = root.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Module names ``path`` (the source of ``module``) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # may be submodules
    return found


@cache
def _closure(module: str, root: Path, signature: tuple) -> tuple[Path, ...]:
    top = module.split(".")[0]
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(root, top, name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_imports(path, name))
    files = set(seen.values())
    for name in list(seen):  # parents run first on import: their text counts
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = _module_file(root, top, ".".join(parts[:i]))
            if parent is not None:
                files.add(parent)
    return tuple(sorted(files))


def module_closure(module: str) -> list[Path]:
    """The source files ``module`` runs: itself and its package imports, transitively."""
    root = _package_root(module.split(".")[0])
    if root is None:
        return [Path(importlib.util.find_spec(module).origin).resolve()]
    # Memoised on the package's file times: an edit (or a new module) is seen at once.
    signature = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*.py")))
    return list(_closure(module, root, signature))


def code_files(module: str, notebook: str | None = None) -> list[Path]:
    """What a step's code fingerprint covers: the module's closure, notebook, prompt wording."""
    files = module_closure(module)
    if notebook and (NOTEBOOKS_DIR / notebook).is_file():
        files.append(NOTEBOOKS_DIR / notebook)
    files += sorted(p for p in PROTOCOL_DIR.glob("*") if p.is_file())
    return files


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def code_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(_display(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# --- inputs and settings -----------------------------------------------------------------


def input_hashes(unit: Unit) -> dict:
    """What the unit reads: each upstream unit's outputs hash (from its manifest)."""
    inputs = {}
    for stage, method in unit.stage.needs(unit):
        folder = unit.unit_dir(stage, method)
        manifest = read_manifest(folder)
        if manifest is None:
            raise StageError(
                f"stage {unit.stage.name!r} ({unit.task}/{unit.model}) needs the outputs of stage "
                f"{stage!r} in {folder}, which has not finished: run it first "
                f"(moloch run --until {unit.stage.name})"
            )
        changed = changed_outputs(folder, manifest)
        if changed:
            raise StageError(
                f"stage {unit.stage.name!r} ({unit.task}/{unit.model}) reads {folder}, whose "
                f"{', '.join(changed)}: they are not used. Make them again (moloch run --force "
                f"{stage}) or restore them"
            )
        inputs[f"{stage}/{method}" if method else stage] = outputs_hash(manifest)
    if unit.stage.extra_inputs is not None:
        inputs.update(unit.stage.extra_inputs(unit))
    return inputs


def stage_params(unit: Unit) -> dict:
    """The unit's shard and the profile sections its stage depends on."""
    settings = unit.profile.model_dump(mode="json")
    relevant = {key: settings[key] for key in unit.stage.profile_keys}
    if "players" in unit.stage.profile_keys:  # only this shard's player matters
        relevant["players"] = [p for p in settings["players"] if p["name"] == unit.model]
    return {
        "stage": unit.stage.name,
        "task": unit.task,
        "model": unit.model,
        "method": unit.method,
        "profile": relevant,
    }


def fingerprint(unit: Unit) -> dict:
    """The unit's fingerprint: a digest over its inputs, params and code, and each part
    (with the settings and the file list behind the last two). Raises StageError when
    an input unit has not finished.
    """
    files = code_files(unit.stage.work.__module__, unit.stage.notebook)
    settings = stage_params(unit)
    parts = {
        "inputs": input_hashes(unit),
        "params": text_sha256(json.dumps(settings, sort_keys=True)),
        "code": code_hash(files),
    }
    return {
        "digest": text_sha256(json.dumps(parts, sort_keys=True)),
        **parts,
        "settings": settings,  # what "params" hashes, for the manifest
        "code_files": [_display(p) for p in files],  # what "code" hashes
    }
