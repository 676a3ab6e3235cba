"""The three markets of the study and the names each one goes by.

The authors' files say ``task_sm`` where the paper and the claims say
"social media"; this table is the one place that maps between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ProfileError


@dataclass(frozen=True)
class Task:
    name: str  # our id: used in paths, profiles and claims
    key: str  # the authors' id: data folders and protocol materials
    message_tag: str  # XML tag around the player's message
    anchor_fields: tuple[str, ...]  # fields of one anchor record
    probes: tuple[str, ...]  # probe ids of protocol-materials.json
    title: str  # for the report


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="sales",
            key="task_sales",
            message_tag="sales_pitch",
            anchor_fields=("title", "categories", "description"),
            probes=("sales_q1",),
            title="Sales",
        ),
        Task(
            name="elections",
            key="task_elections",
            message_tag="campaign_speech",
            anchor_fields=("candidate_webname", "cand_party", "biography_text"),
            probes=("elections_q1", "elections_q2"),
            title="Elections",
        ),
        Task(
            name="social_media",
            key="task_sm",
            message_tag="post",
            anchor_fields=("article", "highlights", "id"),
            probes=("sm_q1", "sm_q2"),
            title="Social media",
        ),
    )
}

METHODS = ("base", "rft", "tfb")
TRAINED = ("rft", "tfb")  # the methods that train an adapter
PAIRS = (("base", "rft"), ("base", "tfb"), ("rft", "tfb"))

# The paper's name for what each probe's "Yes" measures (claims use these).
PROBE_METRIC = {
    "sales_q1": "deceptive_marketing",
    "elections_q1": "disinformation",
    "elections_q2": "populist_rhetoric",
    "sm_q1": "disinformation",
    "sm_q2": "harmful_behaviour",
}


def get_task(name: str) -> Task:
    """Look a task up by our id or the authors' id."""
    for task in TASKS.values():
        if name in (task.name, task.key):
            return task
    raise ProfileError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
