"""How many model calls a profile makes, how many tokens, and what the paid ones cost.

Run it before a long run::

    python -m moloch.estimate --profile paper      # = nox -s estimate -- --profile paper
    python -m moloch.estimate --profile smoke --csv estimate.csv

Call counts follow docs/protocol.md §9 from the profile (anchors, samples, voters,
methods, pairs, probes). Input tokens are counted on the real prompts of the
profile's anchors and personas, with tiktoken's o200k_base encoding if
tiktoken is installed and its encoding can be loaded, otherwise by the
four-characters-per-token rule (the table says which). Texts that do not
exist yet -- the players' messages inside ballots and probes, and every
reply -- are sized by the stated assumptions below; the ``*_max`` columns
use each role's ``max_tokens`` instead, an upper bound. Local backends cost $0.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .anchors import Anchor, Persona
from .config import PlayerSpec, Profile, load_profile
from .data import load_anchors, load_personas
from .errors import guarded
from .files import write_atomic
from .prices import PRICES_AS_OF, cost
from .prompts import BallotOrder, player_messages, probe_messages, voter_messages
from .tasks import METHODS, PAIRS, get_task

# OpenAI's chat format adds a few tokens per message and per reply.
TOKENS_PER_MESSAGE, TOKENS_PER_REPLY = 4, 3


@dataclass(frozen=True)
class Assumptions:
    """Lengths of texts that only exist after the run (tokens), capped by max_tokens."""

    player_reply: int = 900  # thinking + message (Qwen3 thinks at length)
    message: int = 350  # the extracted message a voter or judge reads
    voter_reply: int = 200  # <think> + <vote>
    judge_reply: int = 100  # <think> + Yes/No
    unlimited_reply: int = 1024  # the *_max bound of a role with no max_tokens (v1's audience)


Counter = Callable[[str], int]


def token_counter() -> tuple[Counter, str]:
    """A token counter and its name: tiktoken if usable, else chars/4."""
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("o200k_base")  # may need a download
    except Exception:  # not installed, or offline without its cached encoding
        return (lambda text: math.ceil(len(text) / 4)), "chars/4 approximation"
    return (lambda text: len(encoding.encode(text))), "tiktoken o200k_base"


def request_tokens(messages: Sequence[tuple[str, str]], count: Counter) -> int:
    return sum(count(text) + TOKENS_PER_MESSAGE for _, text in messages) + TOKENS_PER_REPLY


def _row(stage, task, player, role, spec, calls, tokens_in, reply_tokens, *, unlimited) -> dict:
    budget = spec.max_tokens if spec.max_tokens is not None else unlimited
    expected_out = calls * min(reply_tokens, budget)
    max_out = calls * budget
    return {
        "stage": stage,
        "task": task,
        "player": player,
        "role": role,
        "model": spec.model,
        "backend": spec.backend,
        "calls": calls,
        "input_tokens": tokens_in,
        "output_tokens": expected_out,
        "output_tokens_max": max_out,
        "cost_usd": cost(spec, tokens_in, expected_out),
        "cost_usd_max": cost(spec, tokens_in, max_out),
        "cost_usd_batch": cost(spec, tokens_in, expected_out, batch=True),  # openai-batch
    }


# Each row of task_rows by the pipeline stage whose units make those calls (moloch.budget).
UNIT_STAGES = {
    "train generation": "candidates", "episode votes": "episodes", "test generation": "generate",
    "competition votes": "compete", "probes": "probe",
}  # fmt: skip


def task_rows(
    profile: Profile,
    player: PlayerSpec,
    task: str,
    train: Sequence[Anchor],
    test: Sequence[Anchor],
    personas: Sequence[Persona],
    count: Counter,
    assume: Assumptions,
) -> list[dict]:
    """The stages of one (task, player), docs/protocol.md §9."""
    audience, judge = profile.audience, profile.judge
    samples = player.samples
    message = min(assume.message, player.max_tokens or assume.message)

    def player_tokens(anchors: Sequence[Anchor]) -> int:
        return sum(request_tokens(player_messages(task, a), count) for a in anchors)

    # A ballot's length depends on the persona and the two messages, not the anchor.
    order = BallotOrder(swapped=False)
    per_duel = sum(
        request_tokens(voter_messages(task, p, "", "", order), count) + 2 * message
        for p in personas
    )
    probe_in = 0
    for probe_id in get_task(task).probes:
        for anchor in test:
            prompt = player_messages(task, anchor)[-1][1]
            probe_in += request_tokens(probe_messages(probe_id, prompt, ""), count) + message
    n_probes = len(get_task(task).probes)
    n_train, n_test, voters = len(train), len(test), len(personas)
    name = player.name
    row = functools.partial(_row, unlimited=assume.unlimited_reply)
    return [
        row("train generation", task, name, "player", player,
             n_train * samples, samples * player_tokens(train), assume.player_reply),
        row("episode votes", task, name, "voter", audience,
             n_train * voters, n_train * per_duel, assume.voter_reply),
        row("test generation", task, name, "player", player,
             len(METHODS) * n_test * samples, len(METHODS) * samples * player_tokens(test),
             assume.player_reply),
        row("competition votes", task, name, "voter", audience,
             len(PAIRS) * n_test * voters, len(PAIRS) * n_test * per_duel, assume.voter_reply),
        row("probes", task, name, "judge", judge,
             len(METHODS) * n_test * n_probes, len(METHODS) * probe_in, assume.judge_reply),
    ]  # fmt: skip


def estimate(
    profile: Profile,
    assume: Assumptions = Assumptions(),
    anchors: Callable[[str, str], Sequence[Anchor]] | None = None,
    personas: Sequence[Persona] | None = None,
    count: Counter | None = None,
) -> pd.DataFrame:
    """One row per (stage, task, player). ``anchors(task, split)`` and ``personas``
    default to the profile's inputs (fetched and verified by ``moloch.data``)."""
    if anchors is None:

        def anchors(task: str, split: str) -> Sequence[Anchor]:
            return load_anchors(task, split, source=profile.anchors.source)

    if personas is None:
        personas = load_personas()
    counter_name = "given counter"
    if count is None:
        count, counter_name = token_counter()
    voters = list(personas)[: profile.audience.voters]
    rows = []
    for task in profile.tasks:
        train = list(anchors(task, "train"))[: profile.anchors.train]
        test = list(anchors(task, "test"))[: profile.anchors.test]
        for player in profile.players:
            rows += task_rows(profile, player, task, train, test, voters, count, assume)
    table = pd.DataFrame(rows)
    table.attrs.update(profile=profile.name, tokens=counter_name, prices_as_of=PRICES_AS_OF)
    return table


def render(table: pd.DataFrame) -> str:
    """The table as text: each row, totals by stage, and the grand total."""
    numbers = ["calls", "input_tokens", "output_tokens", "output_tokens_max"]
    money = ["cost_usd", "cost_usd_max", "cost_usd_batch"]
    by_stage = table.groupby(["stage", "role", "model"], sort=False)[numbers + money]
    totals = by_stage.sum(min_count=1).reset_index()
    grand = table[numbers + money].sum(min_count=1)
    fmt = {c: "{:,.0f}".format for c in numbers} | {c: "${:,.2f}".format for c in money}
    attrs = table.attrs
    lines = [
        f"Estimate for profile {attrs.get('profile')!r}; tokens by {attrs.get('tokens')}; "
        f"prices as of {attrs.get('prices_as_of')} (local backends $0, unknown price NaN).",
        "Replies and messages not yet written are sized by assumptions; *_max: at max_tokens;",
        "cost_usd_batch: the expected tokens at the Batch API's price (backend: openai-batch).",
        "",
        table.to_string(index=False, formatters=fmt),
        "",
        "Totals by stage:",
        totals.to_string(index=False, formatters=fmt),
        "",
        "All: " + ", ".join(f"{c} {fmt[c](grand[c])}" for c in numbers + money),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m moloch.estimate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--profile", default="smoke", help="profile name or YAML path")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    defaults = Assumptions()
    for name in ("player_reply", "message", "voter_reply", "judge_reply"):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(defaults, name),
            help=f"assumed tokens (default {getattr(defaults, name)})",
        )
    args = parser.parse_args(argv)

    def work() -> int:
        profile = load_profile(args.profile)
        assume = Assumptions(args.player_reply, args.message, args.voter_reply, args.judge_reply)
        table = estimate(profile, assume)
        print(render(table))
        if args.csv:
            write_atomic(args.csv, table.to_csv(index=False))
        return 0

    return guarded(work)


if __name__ == "__main__":
    sys.exit(main())
