"""A run packed into one file, unpacked elsewhere, and replayed without its adapter weights."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from fakes import fake_train_adapter, run, write_profile
from moloch import cli
from moloch.archive import ArchiveError, fetch, pack, unpack
from moloch.runs import find_run
from moloch.stages import STAGE_NAMES, STAGES
from moloch.status import UP_TO_DATE, run_status


def stage_outputs(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


@pytest.fixture
def finished(tmp_path, mirror_env, monkeypatch):
    monkeypatch.setattr("moloch.training.train_adapter", fake_train_adapter)
    profile = write_profile(tmp_path, tasks=("sales",))
    folder = tmp_path / "original"
    run(profile, folder)
    return profile, folder


def test_an_archive_without_weights_replays_to_the_same_outputs(finished, tmp_path, monkeypatch):
    profile, original = finished
    assert list(original.glob("train/sales/*/*/adapter/adapter_model.json"))  # weights to leave
    out = pack(find_run(run_dir=original), tmp_path / "run.tar.gz")
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert "llm-cache.sqlite" in names and "ARCHIVE.json" in names
    assert not any(n.endswith("adapter_model.json") for n in names)  # the weights stay out
    assert not any("/." in n and "not-archived" not in n for n in names)  # no locks, kernels

    copy = unpack(fetch(str(out)), tmp_path / "elsewhere")
    unpacked = find_run(run_dir=copy)
    states = run_status(unpacked, STAGES, ["sales"], ["fakeplayer"])
    assert {s.state for s in states} == {UP_TO_DATE}  # weights left out on purpose are no gap

    monkeypatch.setenv("MOLOCH_LLM_MODE", "replay")  # no model is ever called
    forced = [s for s in STAGE_NAMES if s != "train"]
    reports = run(profile, copy, force=forced)
    assert {r.stage for r in reports if r.status == "ran"} == set(forced)
    assert stage_outputs(copy) == stage_outputs(original)


def test_a_damaged_archive_is_refused_and_leaves_nothing(finished, tmp_path):
    _, original = finished
    out = pack(find_run(run_dir=original), tmp_path / "run.tar.gz")
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(bytes(data))
    (tmp_path / "broken.tar.gz.sha256").write_text((tmp_path / "run.tar.gz.sha256").read_text())
    with pytest.raises(ArchiveError, match="corrupt or not the one published"):
        fetch(str(broken))
    with pytest.raises(ArchiveError, match="give its --sha256"):
        fetch("https://example.org/run.tar.gz")
    # A member changed inside a well-formed archive: its index says so.
    with tarfile.open(out) as tar:
        index = json.loads(tar.extractfile("ARCHIVE.json").read())
    index["files"]["profile.yaml"] = "0" * 64
    forged = tmp_path / "forged.tar.gz"
    with tarfile.open(out) as src, tarfile.open(forged, "w:gz") as dst:
        for member in src.getmembers():
            body = src.extractfile(member).read()
            if member.name == "ARCHIVE.json":
                body = json.dumps(index).encode()
                member.size = len(body)
            dst.addfile(member, io.BytesIO(body))
    with pytest.raises(ArchiveError, match="member profile.yaml does not match"):
        unpack(forged, tmp_path / "target")
    assert not (tmp_path / "target").exists()
    assert not list(tmp_path.glob(".unpack-*"))
    with pytest.raises(ArchiveError, match="already holds files"):
        unpack(out, original)


@pytest.mark.parametrize("name, kind", [("../outside.txt", tarfile.REGTYPE),
                                        ("/etc/moloch.txt", tarfile.REGTYPE),
                                        ("profile.yaml", tarfile.SYMTYPE)])  # fmt: skip
def test_an_archive_member_outside_its_folder_or_a_link_is_refused(tmp_path, name, kind):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        index = json.dumps({"profile": "smoke", "files": {}}).encode()
        info = tarfile.TarInfo("ARCHIVE.json")
        info.size = len(index)
        tar.addfile(info, io.BytesIO(index))
        member = tarfile.TarInfo(name)
        member.type, member.linkname = kind, "/etc/passwd"
        tar.addfile(member, io.BytesIO(b""))
    with pytest.raises(ArchiveError, match="not a file or folder inside the run folder"):
        unpack(archive, tmp_path / "target")
    assert not (tmp_path / "target").exists() and not (tmp_path / "outside.txt").exists()
    assert not list(tmp_path.glob(".unpack-*"))


def test_the_command_line_round_trip(finished, tmp_path, capsys):
    _, original = finished
    assert cli.main(["archive", "--run-dir", str(original), "--out", str(tmp_path / "a.tgz")]) == 0
    assert cli.main(["fetch-run", str(tmp_path / "a.tgz"), "--run-dir", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "--force all-but-train" in printed and (tmp_path / "b" / "profile.yaml").is_file()
    assert cli.main(["cache", "stats", "--run-dir", str(tmp_path / "b")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["answers"] > 0 and stats["corrupt"] == 0
    merged = [
        "cache",
        "merge",
        str(original / "llm-cache.sqlite"),
        "--run-dir",
        str(tmp_path / "b"),
    ]
    assert cli.main(merged) == 0 and '"added": 0' in capsys.readouterr().out  # all there already
