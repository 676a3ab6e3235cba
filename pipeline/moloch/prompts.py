"""Every message the study sends, built from the authors' wording.

The wording is data (``data/protocol/materials.json``, a verbatim copy of the
experimental materials); this module only fills it in, exactly as the
authors' code did, so that a reproduction sends byte-identical prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

from .anchors import Anchor, Persona
from .errors import DataError
from .paths import MATERIALS_FILE
from .seeds import keyed_rng
from .tasks import get_task

PLAYER_SYSTEM = "You are a helpful assistant."


@cache
def materials() -> dict:
    try:
        return json.loads(MATERIALS_FILE.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{MATERIALS_FILE} is missing: restore it from git") from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"{MATERIALS_FILE} is not valid JSON ({err}): restore it from git"
        ) from None


def player_user_message(task: str, anchor: Anchor) -> str:
    template = materials()["player_user_message"][get_task(task).key]
    return template.format_map(anchor.template_fields())


def player_messages(task: str, anchor: Anchor) -> tuple[tuple[str, str], ...]:
    return (("system", PLAYER_SYSTEM), ("user", player_user_message(task, anchor)))


def xml_system(field: str) -> str:
    return materials()["xml_instructions_template"].format(field=field)


# --- audience -----------------------------------------------------------------


@dataclass(frozen=True)
class BallotOrder:
    """Which candidate a voter saw as A. ``swapped`` means the second was A."""

    swapped: bool

    def letters(self) -> dict[str, int]:
        """Map a vote letter to the candidate index (0 = first, 1 = second)."""
        return {"A": 1, "B": 0} if self.swapped else {"A": 0, "B": 1}


def ballot_order(seed: int, *key: int | str) -> BallotOrder:
    """Seeded A/B order for one voter and one duel.

    Derived from the seed and the ballot's own key (task, anchor, pair,
    voter...), so it does not depend on the order ballots are processed in: a
    resumed run shows every voter the same order as an uninterrupted one.
    """
    return BallotOrder(swapped=bool(keyed_rng(seed, "ballot", *key).integers(0, 2)))


def voter_user_message(task: str, persona: Persona, candidate_a: str, candidate_b: str) -> str:
    m = materials()
    preamble = m["voter_roleplay_preamble"].format(biography=persona.as_printed())
    blocks = [
        m["voter_choice_block"].format(letter=letter, candidate=text)
        for letter, text in (("A", candidate_a), ("B", candidate_b))
    ]
    return m["voter_prompt_assembly"].format(
        roleplay_preamble=preamble,
        task_instructions=m["voter_task_instructions"][get_task(task).key],
        choices=m["voter_choice_separator"].join(blocks),
    )


def voter_messages(
    task: str, persona: Persona, first: str, second: str, order: BallotOrder
) -> tuple[tuple[str, str], ...]:
    """System and user message for one ballot, candidates placed by ``order``."""
    a, b = (second, first) if order.swapped else (first, second)
    return (("system", xml_system("vote")), ("user", voter_user_message(task, persona, a, b)))


# --- text feedback (TFB) training examples --------------------------------------


def tfb_user_message(task: str, anchor: Anchor, candidate_1: str, candidate_2: str) -> str:
    template = materials()["tfb_user_message"][get_task(task).key]
    return template.format_map(
        {**anchor.template_fields(), "candidate_1": candidate_1, "candidate_2": candidate_2}
    )


def tfb_messages(task: str, anchor: Anchor, candidate_1: str, candidate_2: str):
    return (
        ("system", PLAYER_SYSTEM),
        ("user", tfb_user_message(task, anchor, candidate_1, candidate_2)),
    )


def tfb_target(voter_thought: str) -> str:
    return materials()["tfb_target_template"].format(voter_thought=voter_thought)


# --- misalignment probes ----------------------------------------------------------


def probe_field(probe_id: str) -> str:
    return _probe(probe_id)["output_field"]


def probe_messages(probe_id: str, prompt: str, generation: str) -> tuple[tuple[str, str], ...]:
    """Judge messages: ``prompt`` is the full player prompt, ``generation`` the message."""
    probe = _probe(probe_id)
    user = probe["query_fstring"].format(prompt=prompt, generation=generation)
    return (("system", xml_system(probe["output_field"])), ("user", user))


def _probe(probe_id: str) -> dict:
    probes = materials()["probes"]
    if probe_id not in probes:
        raise DataError(f"unknown probe {probe_id!r}: choose one of {sorted(probes)}")
    return probes[probe_id]
