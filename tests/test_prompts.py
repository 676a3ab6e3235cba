"""The messages the study sends: byte-identical to v1, and filled verbatim from materials.json."""

import json
import re

import pytest

from moloch import data, prompts
from moloch.anchors import ElectionsAnchor, Persona, SalesAnchor, SocialMediaAnchor
from moloch.errors import DataError
from moloch.paths import MATERIALS_FILE
from moloch.tasks import TASKS

MATERIALS = json.loads(MATERIALS_FILE.read_text(encoding="utf-8"))
# Qwen's chat template around one system and one user turn, with the generation prompt
QWEN_PROMPT = re.compile(
    r"<\|im_start\|>system\n(?P<system>.*?)<\|im_end\|>\n"
    r"<\|im_start\|>user\n(?P<user>.*)<\|im_end\|>\n<\|im_start\|>assistant\n",
    re.DOTALL,
)


def fill(template: str, **values: str) -> str:
    """Fill ``{name}`` slots by plain replacement: an independent check of str.format."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


@pytest.mark.parametrize("task", list(TASKS))
def test_player_messages_equal_every_v1_prompt(mirror_env, task):
    checked = 0
    for split in ("train", "test"):
        anchors = data.load_anchors(task, split)
        v1 = data.load_v1_prompts(task, split)
        assert len(anchors) == len(v1) == 1024
        for anchor, prompt in zip(anchors, v1, strict=True):
            match = QWEN_PROMPT.fullmatch(prompt)
            assert match, f"{task}/{split}: prompt {checked} does not follow Qwen's template"
            (role_s, system), (role_u, user) = prompts.player_messages(task, anchor)
            assert (role_s, role_u) == ("system", "user")
            assert system == match["system"] == "You are a helpful assistant."
            assert user == match["user"], f"{task}/{split}: prompt {checked} differs"
            checked += 1
    assert checked == 2048


# --- voters -----------------------------------------------------------------------------

PERSONA_RAW = {
    "character_name": "ADA",
    "gender": "female",
    "mbti": "introvert, intuitive, thinker, judger",
    "biography": ["I write programs for an engine that was never built.", "It's 1843."],
}
PERSONA = Persona(
    "ADA", "female", PERSONA_RAW["mbti"], tuple(PERSONA_RAW["biography"]), PERSONA_RAW
)
FIRST, SECOND = "Buy {this} lamp!\r\nIt's bright.", "## B\nNo, buy mine."


def test_ballot_order_is_seeded_and_balanced():
    assert all(
        prompts.ballot_order(7, "sales", i, "base-rft", v)
        == prompts.ballot_order(7, "sales", i, "base-rft", v)
        for i in range(50)
        for v in range(3)
    )
    orders = [
        prompts.ballot_order(7, "sales", i, "base-rft", v).swapped
        for i in range(200)
        for v in range(10)
    ]
    assert 0.45 < sum(orders) / len(orders) < 0.55
    other_seed = [
        prompts.ballot_order(8, "sales", i, "base-rft", v).swapped
        for i in range(200)
        for v in range(10)
    ]
    assert orders != other_seed


@pytest.mark.parametrize("swapped", [False, True])
def test_voter_messages_place_and_record_candidates(swapped):
    order = prompts.BallotOrder(swapped=swapped)
    (role_s, system), (role_u, user) = prompts.voter_messages(
        "sales", PERSONA, FIRST, SECOND, order
    )
    assert (role_s, role_u) == ("system", "user")
    assert system == fill(MATERIALS["xml_instructions_template"], field="vote")
    shown = {"A": SECOND if swapped else FIRST, "B": FIRST if swapped else SECOND}
    by_candidate = {0: FIRST, 1: SECOND}
    assert all(shown[letter] == by_candidate[i] for letter, i in order.letters().items())
    choices = MATERIALS["voter_choice_separator"].join(
        fill(MATERIALS["voter_choice_block"], letter=letter, candidate=shown[letter])
        for letter in "AB"
    )
    expected = fill(
        MATERIALS["voter_prompt_assembly"],
        roleplay_preamble=fill(MATERIALS["voter_roleplay_preamble"], biography=repr(PERSONA_RAW)),
        task_instructions=MATERIALS["voter_task_instructions"]["task_sales"],
    ).replace("{choices}", choices)
    assert user == expected
    assert "{'character_name': 'ADA', 'gender': 'female'" in user
    assert user.endswith(f"## B\n{shown['B']}")


def test_voter_task_instructions_follow_the_task():
    order = prompts.BallotOrder(swapped=False)
    for task in TASKS.values():
        (_, _), (_, user) = prompts.voter_messages(task.name, PERSONA, FIRST, SECOND, order)
        assert MATERIALS["voter_task_instructions"][task.key] in user


def test_real_persona_is_printed_as_a_python_dict(mirror_env):
    persona = data.load_personas()[0]
    order = prompts.BallotOrder(swapped=False)
    (_, _), (_, user) = prompts.voter_messages("elections", persona, FIRST, SECOND, order)
    assert f"## Your Character:\n{persona.raw!r}\n\n" in user


# --- text feedback -----------------------------------------------------------------------

ANCHORS = {
    "sales": SalesAnchor("Lamp {x}", ("Home", "Light"), "Bright.\r\nWarm."),
    "elections": ElectionsAnchor("Jo Doe", "IND", "Jo was born in 1970."),
    "social_media": SocialMediaAnchor("Rain fell {today}.", "Rain.", "abc123"),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_tfb_messages_fill_the_wording_verbatim(task):
    anchor = ANCHORS[task]
    (role_s, system), (role_u, user) = prompts.tfb_messages(task, anchor, FIRST, SECOND)
    assert (role_s, role_u, system) == ("system", "user", "You are a helpful assistant.")
    template = MATERIALS["tfb_user_message"][TASKS[task].key]
    assert user == fill(template, **anchor.template_fields(), candidate_1=FIRST, candidate_2=SECOND)
    assert user.index(FIRST) < user.index(SECOND)


def test_tfb_target():
    assert prompts.tfb_target("I'd pick A.") == "<think> I'd pick A. </think>"
    assert prompts.tfb_target("x") == fill(MATERIALS["tfb_target_template"], voter_thought="x")


# --- probes ------------------------------------------------------------------------------


@pytest.mark.parametrize("probe_id", sorted(MATERIALS["probes"]))
def test_probe_messages_fill_the_wording_verbatim(probe_id):
    probe = MATERIALS["probes"][probe_id]
    prompt, generation = "PLAYER PROMPT {x}", "GENERATED\r\nTEXT"
    (role_s, system), (role_u, user) = prompts.probe_messages(probe_id, prompt, generation)
    assert (role_s, role_u) == ("system", "user")
    assert prompts.probe_field(probe_id) == probe["output_field"]
    assert system == fill(MATERIALS["xml_instructions_template"], field=probe["output_field"])
    assert user == fill(probe["query_fstring"], prompt=prompt, generation=generation)
    assert generation in user
    # elections_q2 (populist rhetoric) judges the generation alone
    assert (prompt in user) == (probe_id != "elections_q2")


def test_unknown_probe_names_the_choices():
    with pytest.raises(DataError, match="unknown probe 'q9'.*sales_q1"):
        prompts.probe_messages("q9", "p", "g")
