"""Run profiles: both shipped profiles load; bad ones fail naming key and file."""

import pytest

from moloch.config import available_profiles, load_profile
from moloch.errors import ProfileError


def test_shipped_profiles_load():
    assert {"smoke", "paper"} <= set(available_profiles())
    smoke, paper = load_profile("smoke"), load_profile("paper")
    assert smoke.comparable is False and paper.comparable is True
    assert paper.anchors.train == paper.anchors.test == 1024
    assert paper.audience.voters == 20 and paper.audience.model == "gpt-4o-mini"
    assert paper.audience.temperature == 0.1 and paper.judge.temperature == 0.7
    assert {p.name for p in paper.players} == {"Qwen3-8B", "Llama-3.1-8B-Instruct"}
    lora = paper.training.lora
    assert (lora.r, lora.alpha, lora.dropout) == (16, 32, 0.05)
    assert paper.training.learning_rate == 2e-4 and paper.training.batch_size == 16


def test_smoke_keeps_every_part_of_the_study():
    smoke = load_profile("smoke")
    assert set(smoke.tasks) == {"sales", "elections", "social_media"}
    assert smoke.anchors.test >= 16 and smoke.audience.voters >= 5


def test_the_rehearsal_has_the_papers_architecture():
    """Same roles on the same kinds of backend, the same fidelity switches and LoRA; only
    scale, the model and what a CPU needs (float32, fewer steps, forced answers) differ."""
    rehearsal, paper = load_profile("rehearsal"), load_profile("paper")
    assert {p.backend for p in rehearsal.players} == {p.backend for p in paper.players} == {"vllm"}
    for role in ("audience", "judge"):
        ours, theirs = getattr(rehearsal, role), getattr(paper, role)
        assert ours.backend == theirs.backend == "openai" and ours.parser == theirs.parser
        assert ours.base_url_env == "MOLOCH_REHEARSAL_URL"  # never the paid endpoint's variable
        assert ours.temperature == theirs.temperature
    assert rehearsal.tasks == paper.tasks and rehearsal.comparable is False
    assert rehearsal.training.mode == paper.training.mode == "faithful"
    assert rehearsal.training.lora == paper.training.lora
    assert {p.samples for p in rehearsal.players} == {p.samples for p in paper.players}


def test_unknown_profile_names_choices():
    with pytest.raises(ProfileError, match="unknown profile 'nope'.*smoke"):
        load_profile("nope")


def _write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_file(tmp_path):
    text = load_profile_text().replace("seed: 20251007", "seed: 20251007\nseeed: 3")
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert "seeed" in str(err.value) and "unknown key" in str(err.value)
    assert str(path) in str(err.value)


def test_wrong_type_is_named(tmp_path):
    text = load_profile_text().replace("voters: 5", "voters: many")
    with pytest.raises(ProfileError, match=r"audience\.voters"):
        load_profile(_write(tmp_path, text))


def test_unknown_task_is_named(tmp_path):
    text = load_profile_text().replace("[sales, elections", "[shopping, elections")
    with pytest.raises(ProfileError, match="shopping"):
        load_profile(_write(tmp_path, text))


def test_not_a_mapping(tmp_path):
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(_write(tmp_path, "- a\n- b\n"))


def test_digest_changes_with_settings(tmp_path):
    text = load_profile_text()
    a = load_profile(_write(tmp_path, text))
    b = load_profile(_write(tmp_path, text.replace("seed: 20251007", "seed: 1")))
    assert a.digest() != b.digest()


def load_profile_text() -> str:
    from moloch.config import profile_path

    return profile_path("smoke").read_text()
