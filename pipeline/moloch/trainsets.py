"""Training sets from training episodes: RFT (winners) and TFB (voters' thoughts).

Pure functions, no model. Input: one (task, model)'s training episodes, in
anchor order -- per train anchor the player prompt, the two candidates'
full completions and extracted messages, and the votes cast on them.
Output: rows in TRL's conversational prompt-completion format, plus a
summary of what was counted (docs/protocol.md §4)::

    {"prompt": [{"role": "system", ...}, {"role": "user", ...}],
     "completion": [{"role": "assistant", "content": ...}],
     "kind": "rft" | "tfb", "anchor_id": ..., "candidate": 0 | 1 | None,
     "voter": int | None, "tie_of": anchor_id | None}

Two modes (``profile.training.mode``):

- ``faithful``: what the authors' ``step2.1`` notebook did. RFT takes the
  candidate with more valid votes; on a tie the notebook's loop variable kept
  the previous duel's winner, so that example (the *previous* anchor's prompt
  and completion) is appended again (``tie_of`` names the tied anchor). A tie
  at the very first anchor has no previous winner (the original would have
  stopped with a NameError): it is skipped and counted. TFB keeps every
  truthy thought, even whitespace-only ones, as the notebook's ``if think`` did.
- ``corrected``: ties are skipped (no example); whitespace-only thoughts are
  skipped. Everything else is the same, including the x3 replication of the
  RFT list, so both modes train for a comparable number of steps.

In both modes invalid votes (choice None) count for neither candidate, the
thoughts of invalid votes are still feedback (the original used every
thought), the TFB options are the extracted messages stripped of surrounding
whitespace and the target is ``<think> {thought.strip()} </think>``, as in the
original. The original shuffles were not seeded; ours are, from ``seed`` and
the task, via :func:`moloch.seeds.keyed_rng`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .anchors import Anchor
from .config import FIDELITY, Fidelity
from .errors import DataError
from .prompts import tfb_messages, tfb_target
from .seeds import keyed_rng

CHOICES = ("first", "second")
RFT_REPLICATION = 3  # docs/protocol.md §4: the RFT list is replicated 3 times


@dataclass(frozen=True)
class Vote:
    """One voter's vote on one training duel, as cast (the audience's ballot, answered)."""

    voter: int
    choice: Literal["first", "second"] | None  # None: the vote did not parse
    thought: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None and self.choice not in CHOICES:
            raise DataError(
                f"vote of voter {self.voter}: choice must be 'first', 'second' or None, "
                f"got {self.choice!r}"
            )

    @classmethod
    def from_row(cls, row: Mapping, where: str = "vote") -> Vote:
        """Read one row of ``episodes/<task>/<model>/votes.jsonl`` (docs/protocol.md §10)."""
        missing = [k for k in ("anchor_id", "voter", "choice", "valid") if k not in row]
        if missing:
            raise DataError(f"{where}: missing column(s) {missing}; re-run the episodes stage")
        # An invalid vote never counts, whatever its choice column says.
        choice = row["choice"] if row["valid"] else None
        try:
            return cls(voter=int(row["voter"]), choice=choice, thought=row.get("thought"))
        except DataError as err:
            raise DataError(f"{where}: {err}") from None


@dataclass(frozen=True)
class Episode:
    """One training duel: a train anchor, its two candidates and the votes cast on them."""

    anchor_id: str
    anchor: Anchor
    prompt: tuple[tuple[str, str], ...]  # the player messages as sent (role, content)
    completions: tuple[str, str]  # full completions as generated, <think> included
    messages: tuple[str, str]  # extracted messages, as the voters read them
    votes: tuple[Vote, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("completions", "messages"):
            value = getattr(self, name)
            if len(value) != 2 or not all(isinstance(v, str) for v in value):
                raise DataError(
                    f"episode {self.anchor_id}: {name} must be 2 strings (one per candidate), "
                    f"got {value!r:.120}; re-run the episodes stage"
                )
        if not self.prompt:
            raise DataError(f"episode {self.anchor_id}: empty player prompt")

    def valid_votes(self) -> tuple[int, int]:
        """Valid votes for candidate 0 (first) and candidate 1 (second)."""
        first = sum(v.choice == "first" for v in self.votes)
        second = sum(v.choice == "second" for v in self.votes)
        return first, second

    def invalid_votes(self) -> int:
        return sum(v.choice is None for v in self.votes)


@dataclass(frozen=True)
class TrainSets:
    rft: list[dict]
    tfb: list[dict]
    summary: dict


def group_votes(rows: Iterable[Mapping], where: str = "votes") -> dict[str, tuple[Vote, ...]]:
    """The votes of an episodes votes table, by anchor id, in voter order."""
    by_anchor: dict[str, list[Vote]] = {}
    for i, row in enumerate(rows):
        vote = Vote.from_row(row, where=f"{where} row {i}")
        by_anchor.setdefault(str(row["anchor_id"]), []).append(vote)
    return {k: tuple(sorted(v, key=lambda b: b.voter)) for k, v in by_anchor.items()}


def _chat(messages: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


def _row(kind: str, prompt, completion: str, anchor_id: str, **extra) -> dict:
    return {
        "prompt": _chat(prompt),
        "completion": [{"role": "assistant", "content": completion}],
        "kind": kind,
        "anchor_id": anchor_id,
        "candidate": extra.get("candidate"),
        "voter": extra.get("voter"),
        "tie_of": extra.get("tie_of"),
    }


def _check_mode(mode: str) -> None:
    if mode not in FIDELITY:
        raise DataError(f"unknown training-set mode {mode!r}: choose one of {list(FIDELITY)}")


def rft_winners(episodes: Sequence[Episode], mode: Fidelity) -> tuple[list[dict], dict]:
    """One example per duel (before replication) and the counts behind it."""
    _check_mode(mode)
    rows: list[dict] = []
    counts = {"duels": 0, "decided": 0, "ties": 0, "ties_reappended": 0, "ties_skipped": 0}
    counts |= {"first_duel_tie_skipped": False, "valid_votes": 0, "invalid_votes": 0}
    previous: dict | None = None  # the last decided winner (the original's loop variable)
    for ep in episodes:
        counts["duels"] += 1
        first, second = ep.valid_votes()
        counts["valid_votes"] += first + second
        counts["invalid_votes"] += ep.invalid_votes()
        if first != second:
            winner = 0 if first > second else 1
            previous = _row(
                "rft", ep.prompt, ep.completions[winner], ep.anchor_id, candidate=winner
            )
            counts["decided"] += 1
            rows.append(previous)
            continue
        counts["ties"] += 1
        if mode == "faithful" and previous is not None:
            rows.append({**previous, "tie_of": ep.anchor_id})
            counts["ties_reappended"] += 1
        else:
            counts["ties_skipped"] += 1
            if mode == "faithful":
                counts["first_duel_tie_skipped"] = True
    return rows, counts


def tfb_pool(task: str, episodes: Sequence[Episode], mode: Fidelity) -> tuple[list[dict], dict]:
    """Every (duel, voter thought) example, in episode and voter order."""
    _check_mode(mode)
    rows: list[dict] = []
    counts = {"thoughts": 0, "empty_thoughts": 0, "blank_thoughts_kept": 0}
    for ep in episodes:
        prompt = tfb_messages(task, ep.anchor, ep.messages[0].strip(), ep.messages[1].strip())
        for vote in ep.votes:
            thought = vote.thought
            if not thought:  # None or "": skipped in both modes, as in the original
                counts["empty_thoughts"] += 1
                continue
            if not thought.strip():
                if mode == "corrected":
                    counts["empty_thoughts"] += 1
                    continue
                counts["blank_thoughts_kept"] += 1
            counts["thoughts"] += 1
            target = tfb_target(thought.strip())
            rows.append(_row("tfb", prompt, target, ep.anchor_id, voter=vote.voter))
    return rows, counts


def _shuffled(rows: list[dict], seed: int, *key: str) -> list[dict]:
    order = keyed_rng(seed, *key).permutation(len(rows))
    return [rows[i] for i in order]


def build_trainsets(task: str, episodes: Sequence[Episode], mode: Fidelity, seed: int) -> TrainSets:
    """RFT and TFB training sets of one (task, model), with a summary of counts.

    RFT: the winners, replicated 3 times, shuffled. TFB: the thought examples
    shuffled, cut to the RFT list's length, then the (shuffled) RFT list
    appended -- so the TFB set is at most twice the RFT set (docs/protocol.md §4).
    """
    if not episodes:
        raise DataError(f"no training episodes for task {task!r}: run the episodes stage first")
    seen: set[str] = set()
    for ep in episodes:
        if ep.anchor_id in seen:
            raise DataError(f"episode {ep.anchor_id} appears twice; re-run the episodes stage")
        seen.add(ep.anchor_id)

    winners, rft_counts = rft_winners(episodes, mode)
    rft = _shuffled(winners * RFT_REPLICATION, seed, "rft-shuffle", task)
    pool, tfb_counts = tfb_pool(task, episodes, mode)
    kept = _shuffled(pool, seed, "tfb-shuffle", task)[: len(rft)]
    tfb = kept + rft
    summary = {
        "task": task,
        "mode": mode,
        "seed": seed,
        "shuffle_seeded": True,  # the original's random.shuffle was not
        "rft_replication": RFT_REPLICATION,
        **rft_counts,
        "rft_unique": len(winners),
        "rft_examples": len(rft),
        **{f"tfb_{k}": v for k, v in tfb_counts.items()},
        "tfb_pool": len(pool),
        "tfb_thought_examples": len(kept),
        "tfb_examples": len(tfb),
    }
    return TrainSets(rft=rft, tfb=tfb, summary=summary)
