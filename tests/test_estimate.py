"""The cost estimate: docs/protocol.md §9 call counts, tokens of the real prompts, prices."""

from __future__ import annotations

import math

import pytest

from moloch.anchors import make_anchor, make_persona
from moloch.config import ModelSpec, load_profile
from moloch.estimate import Assumptions, estimate, main, request_tokens
from moloch.prices import cost
from moloch.prompts import player_messages

RECORDS = {
    "sales": {"title": "Lamp", "categories": ["Home", "Light"], "description": "A bright lamp."},
    "elections": {"candidate_webname": "Ann Lee", "cand_party": "X", "biography_text": "Nurse."},
    "social_media": {"article": "Rain fell today.", "highlights": "Rain.", "id": "a1"},
}


def fake_anchors(task: str, split: str):
    return [make_anchor(task, RECORDS[task], f"{task}/{split}/{i}") for i in range(1024)]


PERSONAS = [
    make_persona(
        {"character_name": f"P{i}", "gender": "f", "mbti": "INTJ", "biography": ["Reads."]},
        f"persona {i}",
    )
    for i in range(20)
]


@pytest.fixture(scope="module")
def paper():
    return (
        estimate(load_profile("paper"), anchors=fake_anchors, personas=PERSONAS, count=len)
        .set_index(["task", "player", "stage"])
        .sort_index()
    )


def test_paper_counts_follow_protocol_section_9(paper):
    for task, probes in (("sales", 1), ("elections", 2), ("social_media", 2)):
        for player in ("Qwen3-8B", "Llama-3.1-8B-Instruct"):
            calls = paper.loc[(task, player), "calls"]
            assert calls["train generation"] == 1024 * 2
            assert calls["episode votes"] == 20_480
            assert calls["test generation"] == 3 * 2048
            assert calls["competition votes"] == 3 * 20_480
            assert calls["probes"] == 1024 * 3 * probes


def test_player_tokens_come_from_the_real_prompts(paper):
    one = request_tokens(player_messages("sales", fake_anchors("sales", "train")[0]), len)
    row = paper.loc[("sales", "Qwen3-8B", "train generation")]
    assert row["input_tokens"] == 2 * 1024 * one
    assert row["output_tokens"] == 2048 * 900 and row["output_tokens_max"] == 2048 * 1480


def test_paid_roles_are_priced_and_local_ones_free(paper):
    votes = paper.loc[("sales", "Qwen3-8B", "episode votes")]
    expected = (votes["input_tokens"] * 0.15 + votes["output_tokens"] * 0.60) / 1e6
    assert votes["cost_usd"] == pytest.approx(expected) and votes["cost_usd"] > 0
    assert votes["cost_usd_max"] > votes["cost_usd"]
    assert (paper.xs("test generation", level="stage")["cost_usd"] == 0).all()


def test_assumptions_are_capped_by_max_tokens():
    smoke = load_profile("smoke")
    table = estimate(
        smoke, Assumptions(player_reply=10_000), anchors=fake_anchors, personas=PERSONAS, count=len
    )
    players = table[table.role == "player"]
    assert (players.output_tokens == players.output_tokens_max).all()
    assert table.cost_usd.sum() == 0  # every smoke role is local
    assert set(table.calls[table.stage == "episode votes"]) == {8 * 5}


def test_unknown_paid_model_has_no_price_and_a_server_here_is_free(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    spec = ModelSpec(backend="openai", model="mystery", temperature=0, max_tokens=1)
    assert math.isnan(cost(spec, 1000, 1000))
    priced = spec.model_copy(update={"model": "gpt-4o"})
    assert cost(priced, 1e6, 0) == pytest.approx(2.5)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")  # vllm serve, say
    assert cost(spec, 1000, 1000) == cost(priced, 1e6, 0) == 0


def test_command_line_on_the_real_inputs(mirror_env, tmp_path, capsys):
    out = tmp_path / "estimate.csv"
    assert main(["--profile", "smoke", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "chars/4" in text or "tiktoken" in text
    assert "competition votes" in text and out.read_text().startswith("stage,task")
