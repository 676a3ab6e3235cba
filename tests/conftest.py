"""Shared fixtures: the local data mirror and a throw-away cache."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MIRROR = ROOT.parent / "shared" / "data-mirror"


@pytest.fixture(scope="session")
def data_mirror() -> Path:
    """The mirror folder ($MOLOCH_DATA_MIRROR, else ../shared/data-mirror); skip if absent."""
    mirror = Path(os.environ.get("MOLOCH_DATA_MIRROR") or DEFAULT_MIRROR).resolve()
    if not (mirror / "batu-el").is_dir():
        pytest.skip(f"no data mirror at {mirror}: set MOLOCH_DATA_MIRROR to run data tests")
    return mirror


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    # one cache for the session: each input is copied and hashed once, not per test
    return tmp_path_factory.mktemp("moloch-cache")


@pytest.fixture
def mirror_env(monkeypatch, data_mirror, _session_cache) -> Path:
    """Point MOLOCH_DATA_MIRROR at the mirror and MOLOCH_CACHE at a temporary cache."""
    monkeypatch.setenv("MOLOCH_DATA_MIRROR", str(data_mirror))
    monkeypatch.setenv("MOLOCH_CACHE", str(_session_cache))
    return data_mirror
