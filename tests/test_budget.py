"""Consent and a cap before paid model calls (moloch.budget), and where they act."""

from __future__ import annotations

import io
import math

import pytest

from moloch.budget import Budget, BudgetError, paid, pending_costs
from moloch.config import load_profile
from moloch.estimate import estimate
from moloch.runs import find_run
from moloch.stages import STAGES

KEY = ("compete", "sales", "Qwen3-8B", None)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_paid_run_needs_consent(monkeypatch):
    said: list[str] = []
    budget = Budget({KEY: (1.5, 4.0)}, cap=None, log=said.append)
    monkeypatch.setattr("sys.stdin", io.StringIO())  # no terminal: nobody to ask
    with pytest.raises(BudgetError, match="pass --yes, or --max-cost"):
        budget.consent(yes=False)
    assert said == ["[cost] 1 unit(s) to run, 1 calling paid models: about $1.50 (at most "
                    "$4.00) by moloch.estimate"]  # fmt: skip
    budget.consent(yes=True)
    Budget({KEY: (1.5, 4.0)}, cap=2.0, log=said.append).consent(yes=False)  # a cap consents
    monkeypatch.setattr("sys.stdin", Terminal())
    with pytest.raises(BudgetError, match="nothing was spent"):
        budget.consent(yes=False, ask=lambda prompt: "n")
    budget.consent(yes=False, ask=lambda prompt: "y")


def test_the_cap_stops_before_the_unit_that_would_pass_it():
    budget = Budget({KEY: (0.6, 1.0), ("probe", "sales", "Qwen3-8B", None): (0.0, 0.0)},
                    cap=1.0, log=print)  # fmt: skip
    budget.allow(KEY, "compete/sales/Qwen3-8B")
    budget.add(0.5)
    budget.add(math.nan)  # a unit of unknown price adds nothing it knows
    with pytest.raises(BudgetError, match=r"spent \$0.50 of its \$1.00 cap.*higher --max-cost"):
        budget.allow(KEY, "compete/sales/Qwen3-8B")
    budget.allow(("probe", "sales", "Qwen3-8B", None), "probe/sales/Qwen3-8B")  # free: allowed


def test_pending_costs_share_out_the_estimate_over_the_units_to_run(
    mirror_env, tmp_path, monkeypatch
):
    """A fresh paper run: every unit is to run, and the units' shares add up to the estimate."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    profile = load_profile("paper").model_copy(update={"tasks": ("sales",)})
    run = find_run(profile, tmp_path / "paper")
    players = [p.name for p in profile.players]
    pending = pending_costs(run, STAGES, ["sales"], players)
    table = estimate(profile)
    assert sum(e for e, _ in pending.values()) == pytest.approx(table.cost_usd.sum())
    assert sum(m for _, m in pending.values()) == pytest.approx(table.cost_usd_max.sum())
    assert pending[("generate", "sales", players[0], "rft")][0] == 0  # players are local
    assert pending[("compete", "sales", players[0], None)][0] > 0
    assert paid([profile.audience]) and not paid([profile.players[0]])


def test_status_says_what_the_rest_of_a_paid_run_costs(mirror_env, tmp_path, monkeypatch, capsys):
    from moloch import cli

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    argv = ["status", "--profile", "paper", "--run-dir", str(tmp_path / "p"), "--task", "sales"]
    assert cli.main(argv) == 0
    # two players: episodes, compete and probe call the paid audience or judge
    assert "[cost] 22 unit(s) to run, 6 calling paid models: about $" in capsys.readouterr().out
    assert not (tmp_path / "p").exists()  # status writes nothing


def test_the_runner_asks_before_the_first_unit_and_caps_unit_by_unit(tmp_path, mirror_env,
                                                                     monkeypatch):  # fmt: skip
    """The fault suite's profile (audience and judge behind a local fake server) taken for a
    remote one: refused without consent before anything runs; with a cap, the units that
    call no paid model run and the first one whose cost cannot be bounded is refused."""
    from moloch import faults, prices
    from moloch.runner import run_pipeline

    profile = faults.suite_profile(tmp_path)
    monkeypatch.setattr(prices, "served_here", lambda spec: spec.backend in prices.LOCAL_BACKENDS)
    monkeypatch.setattr("sys.stdin", io.StringIO())
    runs = tmp_path / "run"
    with faults.FaultServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        with pytest.raises(BudgetError, match="pass --yes"):
            run_pipeline(profile, run_dir=runs, notebooks=False, log=lambda _: None)
        assert not (runs / "prepare").exists()
        with pytest.raises(BudgetError, match="episodes/sales/.*without a listed price"):
            run_pipeline(profile, run_dir=runs, notebooks=False, log=lambda _: None, max_cost=5)
    assert (runs / "prepare" / "sales").is_dir() and not (runs / "episodes").exists()
