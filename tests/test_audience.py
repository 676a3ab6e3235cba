"""Audience and competition logic with the fake backend: ballots, orders, duels, shares."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moloch.anchors import make_persona
from moloch.audience import Duel, ballots, cast_votes, read_ballot
from moloch.competition import competition_duels, duel_shares, episode_duels
from moloch.config import AudienceSpec
from moloch.errors import StageError
from moloch.llm import get_llm
from moloch.llm.fake import FakeBackend
from moloch.tasks import PAIRS

SPEC = AudienceSpec(backend="fake", model="fake-voter", voters=3, temperature=0.1, max_tokens=16)
PERSONAS = [
    make_persona(
        {"character_name": name, "gender": "f", "mbti": "INTJ", "biography": ["b."]}, "test"
    )
    for name in ("ANN", "BOB", "CY")
]


def duels(n: int = 4) -> list[Duel]:
    return [
        Duel(f"sales/test/{i:04d}", "base-rft", f"FIRST {i}", f"SECOND {i}", {"pair": "base-rft"})
        for i in range(n)
    ]


def shown_as(request, letter: str) -> str:
    """Which candidate text the voter saw under ``letter``."""
    user = request.messages[-1][1]
    block = user.split(f"## {letter}\n", 1)[1]
    return block.split("\n", 1)[0]


def test_ballot_order_is_per_voter_and_maps_letters_back():
    backend = FakeBackend(responder=lambda r: "<think>hm</think><vote>A</vote>")
    llm = get_llm(SPEC, cache=False, backend=backend)
    rows = cast_votes(llm, SPEC, "sales", "m", PERSONAS, duels(8), seed=3)
    assert len(rows) == 8 * 3
    swaps = {r["swapped"] for r in rows}
    assert swaps == {True, False}  # 24 fair coin flips: both sides occur
    asked = [b.request for b in ballots(SPEC, "sales", PERSONAS, duels(8), seed=3)]
    assert sorted(asked, key=lambda r: r.messages) == backend.seen  # each asked once
    for row, request in zip(rows, asked, strict=True):
        # The voter said A; the choice must be whichever candidate was shown as A.
        expected = "second" if shown_as(request, "A").startswith("SECOND") else "first"
        assert row["choice"] == expected
        assert row["swapped"] == (expected == "second")
        assert row["letter"] == "A" and row["valid"] and row["thought"] == "hm"


def test_ballots_do_not_depend_on_processing_order():
    all_ballots = ballots(SPEC, "sales", PERSONAS, duels(4), seed=11)
    alone = ballots(SPEC, "sales", PERSONAS, duels(4)[2:3], seed=11)
    same = [b for b in all_ballots if b.duel.anchor_id == "sales/test/0002"]
    assert [(b.order, b.request) for b in same] == [(b.order, b.request) for b in alone]
    other_seed = ballots(SPEC, "sales", PERSONAS, duels(4), seed=12)
    assert [b.request.seed for b in other_seed] != [b.request.seed for b in all_ballots]


def test_invalid_votes_are_kept_with_a_reason():
    replies = iter(["<think>x</think>no vote here", "<vote>C</vote>", "<vote>b</vote>"])
    backend = FakeBackend(responder=lambda r: next(replies))
    rows = cast_votes(get_llm(SPEC, cache=False, backend=backend), SPEC, "sales", "m",
                      PERSONAS, duels(1), seed=1)  # fmt: skip
    assert [r["valid"] for r in rows] == [False, False, True]
    assert rows[0]["invalid_reason"] == "missing tag" and rows[0]["thought"] == "x"
    assert rows[1]["invalid_reason"] == "not A or B" and rows[1]["choice"] is None
    assert rows[2]["letter"] == "B" and rows[2]["invalid_reason"] is None
    assert all(r["pair"] == "base-rft" and r["voter_name"] for r in rows)


@given(st.lists(st.sampled_from(["first", "second", None]), min_size=1, max_size=30))
def test_duel_shares_count_valid_votes_only(choices):
    votes = [{"pair": "p", "anchor_id": "a", "valid": c is not None, "choice": c} for c in choices]
    (row,) = duel_shares(votes)
    first, second = choices.count("first"), choices.count("second")
    assert (row["first_votes"], row["second_votes"]) == (first, second)
    assert row["invalid_votes"] == choices.count(None)
    if first + second:
        assert row["second_share"] == pytest.approx(second / (first + second))
    else:
        assert row["second_share"] is None


def generation(method, anchor, sample):
    return {"anchor_id": anchor, "sample_index": sample, "shown": f"{method}:{anchor}:{sample}"}


def test_competition_duels_use_player_zero_of_each_pair():
    anchors = ["t/0", "t/1"]
    gens = {
        m: [generation(m, a, s) for a in anchors for s in (1, 0)] for m in ("base", "rft", "tfb")
    }
    result = competition_duels(gens, anchors)
    assert len(result) == len(PAIRS) * len(anchors)
    for duel in result:
        first, second = duel.key.split("-")
        assert duel.first == f"{first}:{duel.anchor_id}:0"
        assert duel.second == f"{second}:{duel.anchor_id}:0"
        assert duel.columns == {"pair": duel.key, "first": first, "second": second}
    del gens["tfb"][1]  # player 0 of tfb on t/0
    with pytest.raises(StageError, match="player-0 generation of method 'tfb' for t/0"):
        competition_duels(gens, anchors)


def test_episode_duels_need_both_candidates():
    rows = [generation("base", "e/0", 0), generation("base", "e/0", 1)]
    (duel,) = episode_duels(rows, ["e/0"])
    assert (duel.first, duel.second, duel.key) == ("base:e/0:0", "base:e/0:1", "episode")
    assert duel.columns == {"first": 0, "second": 1}
    with pytest.raises(StageError, match="e/1"):
        episode_duels(rows, ["e/0", "e/1"])


def test_read_ballot_maps_a_swapped_b_to_first():
    (ballot, *_) = [b for b in ballots(SPEC, "sales", PERSONAS, duels(6), 5) if b.order.swapped]
    row = read_ballot(ballot, "<vote>B</vote>")
    assert row["choice"] == "first" and row["swapped"] is True


def test_a_blank_thought_read_as_v1_reads_it_becomes_a_tfb_example():
    """From a real reply to a TFB row: v1 kept a whitespace-only thought; so does faithful mode."""
    from moloch.trainsets import Episode, Vote, tfb_pool

    (ballot, *_) = ballots(SPEC, "sales", PERSONAS, duels(1), 5)
    reply = "<think>   </think>\n<vote>A</vote>"
    v1_row = read_ballot(ballot, reply, parser="v1")
    tolerant_row = read_ballot(ballot, reply, parser="tolerant")
    assert v1_row["thought"] == "   " and tolerant_row["thought"] is None
    assert v1_row["letter_v1"] == v1_row["letter_tolerant"] == "A" and v1_row["parser"] == "v1"
    from moloch.anchors import SalesAnchor
    from moloch.prompts import player_messages

    anchor = SalesAnchor("Lamp", ("Home",), "Bright.")
    episode = Episode(
        "sales/train/0000", anchor, player_messages("sales", anchor), ("a", "b"), ("a", "b"),
        (Vote(0, v1_row["choice"], v1_row["thought"]),),
    )  # fmt: skip
    rows, counts = tfb_pool("sales", [episode], "faithful")
    assert [r["completion"][0]["content"] for r in rows] == ["<think>  </think>"]
    assert counts["blank_thoughts_kept"] == 1
    assert tfb_pool("sales", [episode], "corrected")[0] == []


def test_the_two_readings_are_kept_and_their_disagreements_counted():
    from moloch.stats import parser_disagreements

    todo = ballots(SPEC, "sales", PERSONAS, duels(2), 5)
    replies = ["<vote> A </vote>", "<vote>B</vote>", "<vote>b</vote>", "none"] * 20
    rows = pd.DataFrame(
        [read_ballot(b, r, parser="v1") for b, r in zip(todo, replies, strict=False)]
    )
    assert list(rows.letter_v1.fillna("-")[:4]) == ["-", "B", "-", "-"]
    assert list(rows.letter_tolerant.fillna("-")[:4]) == ["A", "B", "B", "-"]
    assert len(rows) == 6 and parser_disagreements(rows, column="letter") == 3  # rows 0, 2, 4
    assert parser_disagreements(rows.drop(columns="letter_v1"), column="letter") is None
