"""Who faces whom: training-episode duels and the test competition (docs/protocol.md §4, §6).

Episodes: on each train anchor, the base player's sample 0 against sample 1.
Test: for each pair (base, rft), (base, tfb), (rft, tfb), one duel per test
anchor between the two methods' player-0 messages. ``duel_shares`` is a quick
per-duel summary for the notebooks; the statistics live in ``moloch.stats``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from .audience import Duel
from .errors import StageError
from .tasks import PAIRS


def pair_name(first: str, second: str) -> str:
    return f"{first}-{second}"


def _by_anchor(rows: Iterable[Mapping], sample: int | None = None) -> dict[str, dict[int, Mapping]]:
    table: dict[str, dict[int, Mapping]] = defaultdict(dict)
    for row in rows:
        if sample is None or row["sample_index"] == sample:
            table[row["anchor_id"]][row["sample_index"]] = row
    return table


def episode_duels(candidates: Sequence[Mapping], anchor_ids: Sequence[str]) -> list[Duel]:
    """Sample 0 against sample 1 on every train anchor, in anchor order."""
    table = _by_anchor(candidates)
    duels = []
    for anchor_id in anchor_ids:
        samples = table.get(anchor_id, {})
        if 0 not in samples or 1 not in samples:
            raise StageError(
                f"training episode {anchor_id}: candidates 0 and 1 are needed, found "
                f"{sorted(samples)}; rerun the candidates stage with --force"
            )
        duels.append(
            Duel(
                anchor_id,
                "episode",
                samples[0]["shown"],
                samples[1]["shown"],
                {"first": 0, "second": 1},
            )
        )
    return duels


def competition_duels(
    generations: Mapping[str, Sequence[Mapping]],
    anchor_ids: Sequence[str],
    pairs: Sequence[tuple[str, str]] = PAIRS,
) -> list[Duel]:
    """Player 0 of each method of every pair, on every test anchor (pair-major order)."""
    player0 = {method: _by_anchor(rows, sample=0) for method, rows in generations.items()}
    duels = []
    for first, second in pairs:
        for method in (first, second):
            if method not in player0:
                raise StageError(f"no test generations of method {method!r}: run generate first")
        for anchor_id in anchor_ids:
            texts = []
            for method in (first, second):
                row = player0[method].get(anchor_id, {}).get(0)
                if row is None:
                    raise StageError(
                        f"no player-0 generation of method {method!r} for {anchor_id}; rerun "
                        f"the generate stage with --force"
                    )
                texts.append(row["shown"])
            duels.append(
                Duel(
                    anchor_id,
                    pair_name(first, second),
                    texts[0],
                    texts[1],
                    {"pair": pair_name(first, second), "first": first, "second": second},
                )
            )
    return duels


def duel_shares(votes: Iterable[Mapping], key: str = "pair") -> list[dict]:
    """Per duel: valid votes for each side and the second side's share (None if no valid vote)."""
    tally: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
    for vote in votes:
        counts = tally[(vote.get(key), vote["anchor_id"])]
        if vote["valid"]:
            counts[0 if vote["choice"] == "first" else 1] += 1
        else:
            counts[2] += 1
    rows = []
    for (group, anchor_id), (first, second, invalid) in tally.items():
        valid = first + second
        rows.append(
            {
                key: group,
                "anchor_id": anchor_id,
                "first_votes": first,
                "second_votes": second,
                "invalid_votes": invalid,
                "second_share": second / valid if valid else None,
            }
        )
    return rows
