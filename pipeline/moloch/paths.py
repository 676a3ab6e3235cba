"""Every path the package reads or writes, in one place.

Inputs committed with the project live under ``data/``; generated runs live
under ``data/runs/`` (never committed); downloaded inputs and converted models
live in a user cache outside the repository so that a fresh clone reuses them.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PIPELINE_DIR = PACKAGE_DIR.parent
ROOT = PIPELINE_DIR.parent

DATA_DIR = ROOT / "data"
PROTOCOL_DIR = DATA_DIR / "protocol"
MATERIALS_FILE = PROTOCOL_DIR / "materials.json"
REFERENCE_DIR = DATA_DIR / "reference"
PUBLISHED_VALUES_FILE = REFERENCE_DIR / "published-values.csv"
INPUTS_FILE = DATA_DIR / "inputs.csv"  # every input file: name, path, URL, SHA-256
CLAIMS_FILE = DATA_DIR / "claims.csv"

PROFILES_DIR = PACKAGE_DIR / "profiles"
NOTEBOOKS_DIR = PIPELINE_DIR

# Environment variables a user may set (and nothing else is needed).
ENV_CACHE = "MOLOCH_CACHE"
ENV_MIRROR = "MOLOCH_DATA_MIRROR"
ENV_RUNS = "MOLOCH_RUNS"
# Set by `moloch submit` in each shard job: the cache file it writes (moloch.submit).
ENV_SHARD_CACHE = "MOLOCH_SHARD_CACHE"


def cache_dir() -> Path:
    """Downloaded inputs and converted model checkpoints (``$MOLOCH_CACHE``)."""
    override = os.environ.get(ENV_CACHE)
    if override:
        return Path(override).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moloch"


def runs_dir() -> Path:
    """Root of generated runs (``$MOLOCH_RUNS``, default ``data/runs``); see ``moloch.runs``."""
    override = os.environ.get(ENV_RUNS)
    return Path(override).expanduser().resolve() if override else DATA_DIR / "runs"
