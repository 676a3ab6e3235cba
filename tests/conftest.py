"""Shared fixtures: the local data mirror, a throw-away cache, a tiny real profile."""

import os
from pathlib import Path

import pytest
import yaml

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


@pytest.fixture
def tiny_profile(tmp_path):
    """Make the smoke profile cut to 2 anchors, 2 voters, short replies, 1 training step."""

    def make(tasks=("sales",), name: str = "tiny") -> Path:
        smoke = yaml.safe_load((ROOT / "pipeline/moloch/profiles/smoke.yaml").read_text())
        smoke.update(name=name, tasks=list(tasks), anchors={"source": "v1", "train": 2, "test": 2})
        smoke["audience"]["voters"] = 2
        smoke["training"].update(max_steps=1, batch_size=2)
        smoke["players"][0]["max_tokens"] = 16
        for role in (smoke["audience"], smoke["judge"]):
            role["max_tokens"] = 40  # room for the forced answer tags
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(smoke))
        return path

    return make
