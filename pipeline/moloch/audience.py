"""The audience: k persona-voters read two messages and vote (docs/protocol.md §3).

A *duel* is two texts for one anchor; every voter gets one ballot per duel,
with the two texts placed as A and B in a seeded order of its own (keyed on
the duel and the voter, so a resumed run shows the same order). A reply that
does not parse to A or B is an invalid vote: it is kept, with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .anchors import Persona
from .llm.base import AnswerFormat, ChatRequest
from .prompts import BallotOrder, ballot_order, voter_messages
from .seeds import request_seed


@dataclass(frozen=True)
class Duel:
    """Two texts for one anchor. ``key`` names the duel kind ("episode", "base-rft")."""

    anchor_id: str
    key: str
    first: str
    second: str
    columns: dict = field(default_factory=dict)  # copied into each of its vote rows


@dataclass(frozen=True)
class Ballot:
    duel: Duel
    voter: int
    persona: Persona
    order: BallotOrder
    request: ChatRequest


def ballots(spec, task: str, personas: Sequence[Persona], duels: Sequence[Duel], seed: int):
    """Every (duel, voter) ballot, duels in order, voters within each."""
    out = []
    for duel in duels:
        for voter, persona in enumerate(personas):
            order = ballot_order(seed, task, duel.anchor_id, duel.key, voter)
            request = ChatRequest.sampled(
                spec,
                voter_messages(task, persona, duel.first, duel.second, order),
                seed=request_seed(seed, "vote", task, duel.anchor_id, duel.key, voter),
                answer_format=AnswerFormat.tagged("vote", ("A", "B"))
                if spec.force_answer
                else None,
            )
            out.append(Ballot(duel, voter, persona, order, request))
    return out


def read_ballot(ballot: Ballot, reply: str, parser: str = "tolerant") -> dict:
    """The vote columns of one answered ballot (docs/protocol.md §10, compete votes).

    The reply is read both as v1 read it and by the tolerant parser
    (``moloch.llm.parse``); ``parser`` picks the one the vote counts by, and both
    letters are kept (``letter_v1``, ``letter_tolerant``) so the report can count
    the votes on which the two readings disagree.
    """
    from .llm.parse import READERS

    read = {name: readers["vote"](reply) for name, readers in READERS.items()}
    vote = read[parser]
    thought = READERS[parser]["thought"](reply)
    letter = vote.value if vote.ok else None
    choice = None
    if letter is not None:
        choice = ("first", "second")[ballot.order.letters()[letter]]
    return {
        "anchor_id": ballot.duel.anchor_id,
        "voter": ballot.voter,
        "voter_name": ballot.persona.character_name,
        "swapped": ballot.order.swapped,
        "letter": letter,
        "choice": choice,
        "valid": choice is not None,
        "invalid_reason": None if choice is not None else (vote.reason or "no vote"),
        "thought": thought.value if thought.ok else None,
        "parser": parser,
        **{f"letter_{name}": r.value if r.ok else None for name, r in read.items()},
        "reply": reply,
    }


def cast_votes(
    llm,
    spec,
    task: str,
    model: str,
    personas: Sequence[Persona],
    duels: Sequence[Duel],
    seed: int,
    desc: str | None = None,
) -> list[dict]:
    """One vote row per (duel, voter), in duel then voter order."""
    todo = ballots(spec, task, personas, duels, seed)
    answers = llm.complete([b.request for b in todo], desc=desc or f"{task} votes")
    return [
        {"task": task, "model": model, **b.duel.columns, **read_ballot(b, a.text, spec.parser)}
        for b, a in zip(todo, answers, strict=True)
    ]
