"""A stage of the study, and a *unit*: one stage for one (task, model[, method]) of a run.

A :class:`Stage` says what a step reads (``needs``), which profile sections
decide its outputs (``profile_keys``), which models it calls (``roles``) and
the function that does the work. A :class:`Unit` is that stage bound to a run
and a shard; its folder is ``<run>/<stage>/<task>/<model>[/<method>]``.
``Unit.of`` is the one way to make a unit, used by the runner and by a stage
notebook alike, and it checks the shard against the profile. Models come from
the unit's ``llm_factory`` (the runner gives the real one; tests give fakes),
so this module, and a stage's code fingerprint, need no model runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import Profile
from .errors import StageError
from .runs import Run

LlmFactory = Callable[["Unit", str], object]


@dataclass(frozen=True)
class Stage:
    """One step of the study. ``work(unit)`` writes the unit's outputs and returns its counts."""

    name: str
    notebook: str  # file name under pipeline/
    work: Callable[[Unit], dict]
    needs: Callable[[Unit], list[tuple[str, str | None]]]  # the (stage, method) units it reads
    profile_keys: tuple[str, ...]  # profile sections that decide its outputs
    methods: tuple[str, ...] = ()  # one unit per method; () = one unit per (task, model)
    roles: tuple[str, ...] = ()  # model roles it calls: player, audience, judge
    extra_inputs: Callable[[Unit], dict] | None = None  # hashes of inputs that are not units


@dataclass
class Unit:
    """One stage for one shard of a run, and how it gets its models."""

    stage: Stage
    run: Run
    task: str
    model: str
    method: str | None = None
    llm_factory: LlmFactory | None = None
    _llms: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(
        cls,
        stage: Stage,
        run: Run,
        task: str,
        model: str,
        method: str | None = None,
        llm_factory: LlmFactory | None = None,
    ) -> Unit:
        """The unit of ``stage`` for (task, model, method) of ``run``, checked against it."""
        if stage.methods and method not in stage.methods:
            raise StageError(
                f"stage {stage.name!r} runs per method: give method, one of {stage.methods}"
            )
        if not stage.methods and method is not None:
            raise StageError(f"stage {stage.name!r} does not run per method: leave method None")
        if task not in run.profile.tasks:
            raise StageError(
                f"profile {run.name!r} has no task {task!r}; it has {list(run.profile.tasks)}"
            )
        run.profile.player(model)  # names the players if this one is unknown
        return cls(stage, run, task, model, method, llm_factory)

    @property
    def profile(self) -> Profile:
        return self.run.profile

    @property
    def where(self) -> str:
        """``stage/task/model[/method]``, for messages."""
        return "/".join(p for p in (self.stage.name, self.task, self.model, self.method) if p)

    @property
    def out_dir(self) -> Path:
        return self.unit_dir(self.stage.name, self.method)

    def unit_dir(self, stage: str, method: str | None = None) -> Path:
        """The folder of another stage's unit of the same shard."""
        return self.run.unit_dir(stage, self.task, self.model, method)

    @property
    def player(self):
        return self.profile.player(self.model)

    def spec(self, role: str):
        """The model spec of ``role``: player (this shard's), audience or judge."""
        specs = {
            "player": self.player,
            "audience": self.profile.audience,
            "judge": self.profile.judge,
        }
        return specs[role]

    def llm(self, role: str):
        """The model of ``role``, made once per unit by the unit's ``llm_factory``."""
        if role not in self._llms:
            if self.llm_factory is None:
                raise StageError(f"{self.where}: no model factory was given to this unit")
            self._llms[role] = self.llm_factory(self, role)
        return self._llms[role]

    def llm_stats(self) -> dict:
        """What each model served this unit (requests, cache hits, tokens, time)."""
        return {role: llm.stats() for role, llm in self._llms.items() if hasattr(llm, "stats")}
