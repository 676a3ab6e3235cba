"""The eight stages of the study, one module each (docs/protocol.md: what each reads and writes).

Each stage runs once per (task, model), or per (task, model, method) for
``train`` and ``generate``, in ``<run>/<stage>/<task>/<model>[/<method>]``:

=========  ==================================  =========================================
stage      reads                               writes
=========  ==================================  =========================================
prepare    anchors and personas (data.py)      train.jsonl, test.jsonl, voters.jsonl
candidates prepare                             candidates.jsonl
episodes   prepare, candidates                 votes.jsonl
trainsets  prepare, candidates, episodes                   rft.jsonl, tfb.jsonl, summary.json
train      trainsets                           adapter/ (LoRA, train_summary.json)
generate   prepare (+ train for rft and tfb)   generations.jsonl
compete    prepare, generate x 3               votes.jsonl
probe      prepare, generate x 3               labels.jsonl
=========  ==================================  =========================================

A stage's code fingerprint is the import closure of its module
(``moloch.fingerprints``), so each module imports only what its stage runs.
"""

from __future__ import annotations

from ..errors import StageError
from ..units import Stage
from . import candidates, compete, episodes, generate, prepare, probe, train, trainsets

STAGES: list[Stage] = [
    prepare.STAGE,
    candidates.STAGE,
    episodes.STAGE,
    trainsets.STAGE,
    train.STAGE,
    generate.STAGE,
    compete.STAGE,
    probe.STAGE,
]
STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise StageError(f"unknown stage {name!r}: choose from {', '.join(STAGE_NAMES)}")
