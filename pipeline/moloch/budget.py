"""Before a paid run: what it will cost, consent, and a cap it stays under.

``moloch run`` on a profile whose models cost money first says what the units it will
run are estimated to cost (``moloch.estimate``, for the units ``moloch.status`` does not
find up to date), then asks on a terminal, or needs ``--yes``. With ``--max-cost
DOLLARS`` (consent too) it does not start a unit whose estimated cost would take what
this run has spent (the dollars in the manifests of the units it ran) over the cap; the
finished units are kept, so a rerun with a higher cap goes on from there.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict

from .errors import MolochError
from .prices import cost
from .status import UP_TO_DATE, run_status


class BudgetError(MolochError):
    """A run that would spend without consent, or past its cap."""


def paid(specs) -> bool:
    """Whether any of the model specs costs money (or is remote with no listed price)."""
    return any(cost(spec, 1e6, 1e6) != 0 for spec in specs)  # NaN != 0: unknown price


def pending_costs(run, stages, tasks, models) -> dict[tuple, tuple[float, float]]:
    """Estimated (expected, at most) dollars of each unit of ``stages`` that is not up to
    date, by (stage, task, model, method); a stage's row is shared among its methods."""
    from .estimate import UNIT_STAGES, estimate

    table = estimate(run.profile)
    table["unit_stage"] = table["stage"].map(UNIT_STAGES)
    dollars: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in table.itertuples():
        share = dollars[(row.unit_stage, row.task, row.player)]
        share[0] += row.cost_usd
        share[1] += row.cost_usd_max
    chosen = {s.name: s for s in stages}
    pending = {}
    for status in run_status(run, stages, tasks, models):
        if status.state == UP_TO_DATE:
            continue
        expected, most = dollars.get((status.stage, status.task, status.model), (0.0, 0.0))
        methods = len(chosen[status.stage].methods or (None,))
        key = (status.stage, status.task, status.model, status.method)
        pending[key] = (expected / methods, most / methods)
    return pending


class Budget:
    """Consent and a cap for one invocation of the runner; ``log`` says what it decides."""

    def __init__(self, pending: dict[tuple, tuple[float, float]], cap: float | None, log):
        self.pending, self.cap, self.log, self.spent = pending, cap, log, 0.0

    def describe(self) -> str:
        """What the units to run are estimated to cost, in one line."""
        expected = sum(e for e, _ in self.pending.values())
        most = sum(m for _, m in self.pending.values())
        calling = sum(1 for e, _ in self.pending.values() if e != 0)  # NaN: unknown, but paid
        return (
            f"[cost] {len(self.pending)} unit(s) to run, {calling} calling paid models: about "
            f"{_dollars(expected)} (at most {_dollars(most)}) by moloch.estimate"
            + (f"; cap {_dollars(self.cap)} (--max-cost)" if self.cap is not None else "")
        )

    def consent(self, yes: bool, ask=input) -> None:
        self.log(self.describe())
        if yes or self.cap is not None or not self.pending:
            return
        if not sys.stdin.isatty():
            raise BudgetError(
                "this run calls paid models and there is no terminal to ask: pass --yes, or "
                "--max-cost DOLLARS to stop before spending more (nox -s estimate -- --profile "
                "NAME shows the estimate)"
            )
        if ask("Go on? [y/N] ").strip().lower() not in ("y", "yes"):
            raise BudgetError("stopped before any paid call: nothing was spent")

    def allow(self, key: tuple, where: str) -> None:
        """Raise before a unit whose estimate would take the spend past the cap."""
        estimated = self.pending.get(key, (0.0, 0.0))[0]
        if self.cap is None or estimated == 0:
            return
        if math.isnan(estimated):
            raise BudgetError(
                f"{where} calls a paid model without a listed price, so --max-cost cannot bound "
                f"it: add its price to moloch/prices.py, or run without --max-cost (with --yes)"
            )
        if self.spent + estimated > self.cap:
            raise BudgetError(
                f"{where} is estimated at {_dollars(estimated)}, and this run has spent "
                f"{_dollars(self.spent)} of its {_dollars(self.cap)} cap: stopped before it. "
                f"Finished units are kept: rerun with a higher --max-cost to go on"
            )

    def add(self, dollars: float) -> None:
        if not math.isnan(dollars):
            self.spent += dollars


def spending(unit) -> dict:
    """Each model's call counts (``Unit.llm_stats``) with ``dollars``: what its new calls
    cost at the listed prices (None for a paid model without one; cached calls are free)."""
    stats = unit.llm_stats()
    for role, served in stats.items():
        spent = cost(
            unit.spec(role),
            served.get("new_prompt_tokens", 0),
            served.get("new_completion_tokens", 0),
        )
        served["dollars"] = None if math.isnan(spent) else round(spent, 6)
    return stats


def _dollars(x: float) -> str:
    return "an unknown amount" if math.isnan(x) else f"${x:,.2f}"
