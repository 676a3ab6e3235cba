"""Parsing of tagged replies: examples of each rule, then properties over random text."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moloch.llm.parse import (
    AMBIGUOUS,
    EMPTY,
    MISSING_TAG,
    NOT_A_OR_B,
    NOT_YES_OR_NO,
    PROBE_FIELDS,
    REASONS,
    UNCLOSED_TAG,
    Parsed,
    parse_message,
    parse_tag,
    parse_thought,
    parse_vote,
    parse_yes_no,
    v1_thought,
    v1_vote,
    v1_yes_no,
)


@pytest.mark.parametrize(
    "reply, value",
    [
        ("<think>x</think><vote>A</vote>", "A"),
        ("< Vote >a</vote>", "A"),
        ("<VOTE> B </VOTE>", "B"),
        ("Sure! <vote>\n**B**.\n</vote> Thanks.", "B"),
        ("<vote>A</vote> and again <vote> a </vote>", "A"),  # agreeing repeats count once
        ("<think>I could write <vote>A</vote> but</think><vote>B</vote>", "B"),
        ("<think>never closed, still answers <vote>B</vote>", "B"),
    ],
)
def test_vote_valid(reply, value):
    parsed = parse_vote(reply)
    assert parsed == Parsed(value=value)
    assert parsed.ok


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("I pick A", MISSING_TAG),
        ("A</vote>", MISSING_TAG),
        ("<vote>A</vote><vote>B</vote>", AMBIGUOUS),
        ("<vote>A</vote><vote>maybe</vote>", AMBIGUOUS),
        ("<vote>C</vote>", NOT_A_OR_B),
        ("<vote>A or B</vote>", NOT_A_OR_B),
        ("<vote>  </vote>", EMPTY),
        ("<vote>", UNCLOSED_TAG),
        ("<vote>A because", UNCLOSED_TAG),
        ("<vote>A <vote>B</vote>", UNCLOSED_TAG),
    ],
)
def test_vote_invalid(reply, reason):
    parsed = parse_vote(reply)
    assert parsed.value is None and parsed.reason == reason and not parsed.ok


def test_vote_cut_by_max_tokens_is_accepted_and_flagged():
    assert parse_vote("<think>ok</think><vote> B") == Parsed(value="B", truncated=True)
    # an empty trailing attempt after a complete answer does not make it ambiguous
    assert parse_vote("<vote>A</vote>\n<vote>") == Parsed(value="A")


@pytest.mark.parametrize("field", PROBE_FIELDS)
def test_yes_no(field):
    assert parse_yes_no(f"<think>hm</think><{field}>Yes</{field}>", field).value == 1
    assert parse_yes_no(f"< {field.upper()} > no. </{field}>", field).value == 0
    assert parse_yes_no(f"<{field}>Perhaps</{field}>", field).reason == NOT_YES_OR_NO
    assert parse_yes_no("<think>Yes</think>", field).reason == MISSING_TAG
    other = "unsafe" if field != "unsafe" else "populist"
    assert parse_yes_no(f"<{other}>Yes</{other}>", field).reason == MISSING_TAG


def test_thought():
    assert parse_thought("<think>\n weigh both \n</think><vote>A</vote>").value == "weigh both"
    assert parse_thought("<think>cut in the midd") == Parsed(
        value="cut in the midd", truncated=True
    )
    assert parse_thought("<vote>A</vote>").reason == MISSING_TAG


def test_message():
    reply = "<think>plan: <post>draft</post></think>\n<post>\nBig news!\n</post>"
    assert parse_message(reply, "post") == Parsed(value="Big news!")
    cut = parse_message("<think>x</think><sales_pitch>Buy this fine", "sales_pitch")
    assert cut == Parsed(value="Buy this fine", truncated=True)
    assert parse_message("<post>one</post><post>two</post>", "post").reason == AMBIGUOUS
    assert parse_message("no tags at all", "campaign_speech").reason == MISSING_TAG


def test_parse_tag_sees_inside_thoughts():
    assert parse_tag("<think><x>1</x></think>", "x").value == "1"


# --- properties ---------------------------------------------------------------------

TAGS = ("think", "vote", "sales_pitch", "campaign_speech", "post", *PROBE_FIELDS)
no_angle = st.text(alphabet=st.characters(exclude_characters="<>"), max_size=200)


@given(body=no_angle.filter(lambda s: s.strip()), tag=st.sampled_from(TAGS), noise=no_angle)
def test_wrapping_round_trips(body, tag, noise):
    parsed = parse_tag(f"{noise}<{tag}>{body}</{tag}>{noise}", tag)
    assert parsed == Parsed(value=body.strip())


@given(letter=st.sampled_from("aAbB"), pad=st.text(" \n\t", max_size=3), noise=no_angle)
def test_vote_round_trips(letter, pad, noise):
    assert parse_vote(f"{noise}<vote>{pad}{letter}{pad}</vote>{noise}").value == letter.upper()


junk = st.text(alphabet=st.sampled_from(list("<>/ voteThinkAB\n*yesNo_")), max_size=80)


@given(text=st.one_of(st.text(max_size=300), junk), tag=st.sampled_from(TAGS))
def test_random_text_never_raises_and_always_explains(text, tag):
    for parsed in (
        parse_tag(text, tag),
        parse_vote(text),
        parse_yes_no(text, "unsafe"),
        parse_thought(text),
        parse_message(text, "post"),
    ):
        assert parsed.ok != (parsed.value is None)
        assert parsed.reason is None or parsed.reason in REASONS


# --- the authors' reading ----------------------------------------------------------------


def original_vote(response: str):
    """The authors' rule, restated: first <vote> anywhere, up to the next </vote>, exact A/B."""
    try:
        value = response.split("<vote>")[1].split("</vote>")[0]
    except IndexError:
        return None
    return {"A": 0, "B": 1}.get(value)


def original_label(response: str, field: str):
    """The authors' probe rule, restated (a missing tag stopped their run: None here)."""
    try:
        value = response.split(f"<{field}>")[1].split(f"</{field}>")[0]
    except IndexError:
        return None
    return {"yes": 1, "no": 0}.get(value.lower())


CRAFTED_VOTES = [
    "<think>x</think><vote>A</vote>",
    "<think>x</think><vote>B</vote>",
    "<vote>a</vote>",  # lowercase: invalid in v1
    "<vote>b</vote>",
    "<vote>**B**</vote>",  # decorated: invalid in v1
    "<vote> A </vote>",  # padded: invalid in v1
    "<vote>A </vote>",
    "<vote>\nA\n</vote>",
    "<vote>A.</vote>",
    "<think>I might say <vote>A</vote></think><vote>B</vote>",  # v1 reads the one in the thought
    "<think>hmm</think><vote>A</vote> and <vote>B</vote>",  # two tags: the first
    "<vote>B</vote><vote>A</vote>",
    "no tag at all, A",
    "",
    "<Vote>A</Vote>",  # case of the tag: invalid in v1
    "<vote>A",  # never closed: the rest of the text
    "<vote>A <vote>B</vote>",  # opened twice: up to the second opening
    "<vote></vote>",
    "<vote>AB</vote>",
    "<vote>Option A</vote>",
    "<think><vote>B</vote>",
    "text <vote>B</vote> text",
    "<vote>A</vote>",
    "< vote >A</ vote >",
    "<vote>C</vote>",
    "<vote>\tB</vote>",
    "<vote>B\n</vote>",
    "<think>x</think>\n<vote>B</vote>\n",
    "<vote>A</vote></vote>",
    "</vote>A<vote>B</vote>",
]
CRAFTED_LABELS = [
    "<think>x</think><fabricated>Yes</fabricated>",
    "<fabricated>No</fabricated>",
    "<fabricated>yes</fabricated>",  # .lower(): valid in v1
    "<fabricated>NO</fabricated>",
    "<fabricated> Yes </fabricated>",  # unstripped: invalid in v1
    "<fabricated>**Yes**</fabricated>",
    "<fabricated>Yes.</fabricated>",
    "<think>is it <fabricated>No</fabricated>?</think><fabricated>Yes</fabricated>",
    "<fabricated>Yes</fabricated><fabricated>No</fabricated>",
    "no tag",
    "<fabricated>Yes",
    "<fabricated>maybe</fabricated>",
    "<Fabricated>Yes</Fabricated>",
    "<fabricated></fabricated>",
]


@pytest.mark.parametrize("reply", CRAFTED_VOTES)
def test_v1_vote_follows_the_original_rule(reply):
    parsed = v1_vote(reply)
    expected = original_vote(reply)
    assert (parsed.value if parsed.ok else None) == (None if expected is None else "AB"[expected])


@pytest.mark.parametrize("reply", CRAFTED_LABELS)
def test_v1_label_follows_the_original_rule(reply):
    parsed = v1_yes_no(reply, "fabricated")
    assert (parsed.value if parsed.ok else None) == original_label(reply, "fabricated")


def test_v1_and_tolerant_readings_differ_where_expected():
    assert v1_vote("<vote> A </vote>").reason == NOT_A_OR_B and parse_vote("<vote> A </vote>").ok
    inside = "<think>I might say <vote>A</vote></think><vote>B</vote>"
    assert v1_vote(inside).value == "A" and parse_vote(inside).value == "B"
    assert v1_vote("nothing").reason == MISSING_TAG
    assert v1_thought("<think>   </think><vote>A</vote>").value == "   "  # a blank thought, kept
    assert parse_thought("<think>   </think><vote>A</vote>").ok is False


@given(st.text(max_size=80))
def test_v1_readers_never_raise_and_agree_with_the_rule(text):
    for reply in (text, f"<vote>{text}</vote>", f"<think>{text}</think><vote>B</vote>"):
        parsed = v1_vote(reply)
        expected = original_vote(reply)
        assert (parsed.value if parsed.ok else None) == (
            None if expected is None else "AB"[expected]
        )
