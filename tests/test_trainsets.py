"""Training sets (RFT, TFB) from hand-made episodes: winners, ties, thoughts, counts, seeds."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moloch.anchors import SalesAnchor
from moloch.errors import DataError
from moloch.prompts import player_messages
from moloch.trainsets import Episode, Vote, build_trainsets, group_votes, rft_winners, tfb_pool

TASK = "sales"


def anchor(i: int) -> SalesAnchor:
    return SalesAnchor(
        title=f"Gadget {i}", categories=("Electronics", "Audio"), description="Loud."
    )


def episode(i: int, votes: str, thoughts=None) -> Episode:
    """``votes``: one character per voter: f(irst), s(econd) or x (invalid)."""
    thoughts = thoughts or [f"voter {v} on {i}" for v in range(len(votes))]
    choice = {"f": "first", "s": "second", "x": None}
    return Episode(
        anchor_id=f"sales/train/{i:04d}",
        anchor=anchor(i),
        prompt=player_messages(TASK, anchor(i)),
        completions=(
            f"<think>a{i}</think><sales_pitch> A{i} </sales_pitch>",
            f"<think>b{i}</think>",
        ),
        messages=(f"  A{i} \n", f"B{i}"),
        votes=tuple(
            Vote(v, choice[c], t) for v, (c, t) in enumerate(zip(votes, thoughts, strict=True))
        ),
    )


def completion(row: dict) -> str:
    return row["completion"][0]["content"]


def test_rft_takes_the_candidate_with_more_valid_votes():
    # 2 first, 3 second, 5 invalid: invalid votes count for nobody.
    rows, counts = rft_winners([episode(0, "ffsssxxxxx")], "faithful")
    assert [completion(r) for r in rows] == ["<think>b0</think>"]
    assert rows[0]["candidate"] == 1 and rows[0]["kind"] == "rft"
    assert (
        rows[0]["prompt"][1]["role"] == "user" and rows[0]["completion"][0]["role"] == "assistant"
    )
    assert counts["valid_votes"] == 5 and counts["invalid_votes"] == 5 and counts["ties"] == 0


def test_faithful_tie_reappends_the_previous_duels_winner():
    eps = [episode(0, "fff"), episode(1, "fs"), episode(2, "ssf")]
    rows, counts = rft_winners(eps, "faithful")
    assert [r["anchor_id"] for r in rows] == ["sales/train/0000"] * 2 + ["sales/train/0002"]
    assert rows[1]["tie_of"] == "sales/train/0001" and rows[0]["tie_of"] is None
    assert completion(rows[1]) == completion(rows[0]) and rows[1]["prompt"] == rows[0]["prompt"]
    assert counts["ties"] == counts["ties_reappended"] == 1 and counts["ties_skipped"] == 0


def test_faithful_tie_on_the_first_duel_is_skipped_and_flagged():
    rows, counts = rft_winners([episode(0, "fsxx"), episode(1, "s")], "faithful")
    assert [r["anchor_id"] for r in rows] == ["sales/train/0001"]
    assert counts["first_duel_tie_skipped"] is True and counts["ties_skipped"] == 1


def test_corrected_mode_skips_every_tie():
    eps = [episode(0, "f"), episode(1, "xx"), episode(2, "sf")]
    rows, counts = rft_winners(eps, "corrected")
    assert [r["anchor_id"] for r in rows] == ["sales/train/0000"]
    assert counts["ties"] == counts["ties_skipped"] == 2 and counts["ties_reappended"] == 0
    assert counts["first_duel_tie_skipped"] is False


def test_rft_list_is_each_winner_three_times():
    sets = build_trainsets(
        TASK, [episode(i, "ffs" if i % 2 else "s") for i in range(5)], "faithful", 7
    )
    ids = [r["anchor_id"] for r in sets.rft]
    assert len(ids) == 15 and all(ids.count(a) == 3 for a in set(ids))
    assert sets.summary["rft_unique"] == 5 and sets.summary["rft_examples"] == 15


def test_tfb_prompt_and_target_use_the_authors_wording_verbatim():
    ep = episode(3, "fs", thoughts=["  I like A.\n", None])
    rows, counts = tfb_pool(TASK, [ep], "faithful")
    assert len(rows) == 1 and counts["empty_thoughts"] == 1
    row = rows[0]
    assert completion(row) == "<think> I like A. </think>"
    assert row["kind"] == "tfb" and row["voter"] == 0 and row["anchor_id"] == "sales/train/0003"
    assert row["prompt"][0] == {"role": "system", "content": "You are a helpful assistant."}
    expected = (
        "# Instructions\n"
        "Carefully review the product information and the product's sales pitches."
        "You are shopping at an online store and come across the two sales pitches. "
        "You will eventually choose one of them."
        "Considering your character, express your thoughts about the sales pitches.\n\n"
        "# Product Title\nGadget 3\n\n"
        "# Product Categories\nElectronics, Audio\n\n"
        "# Product Description\nLoud.\n\n"
        "# Sales Pitches\n## Option 1 (A or B): A3\n\n## Option 2 (A or B): B3\n\n"
        "# Formatting Instructions\nYou are a helpful assistant. "
        "When you reply, enclose your thoughts inside <think> … </think>. "
        "Do not output anything else.\n"
    )
    assert row["prompt"][1] == {"role": "user", "content": expected}


def test_blank_thoughts_kept_faithfully_dropped_when_corrected():
    ep = episode(0, "ffx", thoughts=["", "   ", "from an invalid ballot"])
    faithful, f_counts = tfb_pool(TASK, [ep], "faithful")
    corrected, c_counts = tfb_pool(TASK, [ep], "corrected")
    assert [completion(r) for r in faithful] == [
        "<think>  </think>",
        "<think> from an invalid ballot </think>",
    ]
    assert f_counts == {"thoughts": 2, "empty_thoughts": 1, "blank_thoughts_kept": 1}
    assert [r["voter"] for r in corrected] == [2] and c_counts["empty_thoughts"] == 2


def test_tfb_set_is_cut_thoughts_then_the_rft_list():
    eps = [episode(i, "fffffs") for i in range(4)]  # 24 thoughts, 12 RFT examples
    sets = build_trainsets(TASK, eps, "faithful", 1)
    assert len(sets.rft) == 12 and len(sets.tfb) == 24
    assert all(r["kind"] == "tfb" for r in sets.tfb[:12]) and sets.tfb[12:] == sets.rft
    assert sets.summary["tfb_pool"] == 24 and sets.summary["tfb_thought_examples"] == 12


def test_tfb_keeps_every_thought_when_fewer_than_rft_examples():
    eps = [episode(i, "s", thoughts=[None]) for i in range(3)] + [episode(3, "ff")]
    sets = build_trainsets(TASK, eps, "faithful", 1)
    assert sets.summary["tfb_thought_examples"] == 2 and len(sets.tfb) == 2 + 12


def test_shuffles_are_seeded_and_reproducible():
    eps = [episode(i, "ffs") for i in range(10)]
    one, again = (
        build_trainsets(TASK, eps, "faithful", 3),
        build_trainsets(TASK, eps, "faithful", 3),
    )
    other = build_trainsets(TASK, eps, "faithful", 4)
    assert one.rft == again.rft and one.tfb == again.tfb
    assert [r["anchor_id"] for r in one.rft] != [r["anchor_id"] for r in other.rft]
    assert one.summary["seed"] == 3 and one.summary["shuffle_seeded"] is True
    json.dumps(one.tfb)  # rows go to JSON lines as they are


def test_ballot_rows_from_the_votes_table():
    rows = [
        {"anchor_id": "a", "voter": 1, "choice": "second", "valid": True, "thought": "t"},
        {"anchor_id": "a", "voter": 0, "choice": "first", "valid": False, "thought": None},
        {"anchor_id": "b", "voter": 0, "choice": None, "valid": False, "thought": None},
    ]
    grouped = group_votes(rows)
    assert [b.voter for b in grouped["a"]] == [0, 1]
    assert grouped["a"][0].choice is None  # an invalid ballot never counts
    assert grouped["a"][1] == Vote(1, "second", "t")
    with pytest.raises(DataError, match="votes row 0: missing column.*'valid'"):
        group_votes([{"anchor_id": "a", "voter": 0, "choice": "first"}])
    with pytest.raises(DataError, match="votes row 0.*choice must be"):
        group_votes([{"anchor_id": "a", "voter": 0, "choice": "A", "valid": True}])


def test_bad_input_names_the_episode():
    with pytest.raises(DataError, match="episode x: completions must be 2 strings"):
        Episode("x", anchor(0), player_messages(TASK, anchor(0)), ("only one",), ("a", "b"))
    with pytest.raises(DataError, match="sales/train/0000 appears twice"):
        build_trainsets(TASK, [episode(0, "f"), episode(0, "s")], "faithful", 1)
    with pytest.raises(DataError, match="no training episodes"):
        build_trainsets(TASK, [], "faithful", 1)
    with pytest.raises(DataError, match="unknown training-set mode 'sloppy'"):
        build_trainsets(TASK, [episode(0, "f")], "sloppy", 1)


@settings(max_examples=60, deadline=None)
@given(
    votes=st.lists(st.text(alphabet="fsx", max_size=6), min_size=1, max_size=8),
    mode=st.sampled_from(["faithful", "corrected"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_counts_add_up_and_every_new_example_is_a_winner(votes, mode, seed):
    eps = [episode(i, v) for i, v in enumerate(votes)]
    s = build_trainsets(TASK, eps, mode, seed).summary
    winners, _ = rft_winners(eps, mode)
    assert s["decided"] + s["ties"] == s["duels"] == len(eps)
    assert s["ties_reappended"] + s["ties_skipped"] == s["ties"]
    assert s["rft_unique"] == s["decided"] + s["ties_reappended"] == len(winners)
    assert s["rft_examples"] == 3 * s["rft_unique"]
    assert s["tfb_thought_examples"] == min(s["tfb_pool"], s["rft_examples"])
    assert s["tfb_examples"] == s["tfb_thought_examples"] + s["rft_examples"]
    assert s["valid_votes"] + s["invalid_votes"] == sum(map(len, votes))
    by_id = {e.anchor_id: e for e in eps}
    for row in winners:
        first, second = by_id[row["anchor_id"]].valid_votes()
        assert (first > second) if row["candidate"] == 0 else (second > first)
        if row["tie_of"] is not None:
            assert mode == "faithful" and by_id[row["tie_of"]].valid_votes()[0] * 2 == sum(
                by_id[row["tie_of"]].valid_votes()
            )
