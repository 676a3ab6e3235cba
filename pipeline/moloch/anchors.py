"""Typed records of the study's inputs: the anchors of each task and the personas.

Reading and verifying the files is ``data.py``'s job; this module only says
what one record is and turns a raw dict into one, naming what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import DataError


@dataclass(frozen=True)
class SalesAnchor:
    title: str
    categories: tuple[str, ...]
    description: str

    def template_fields(self) -> dict[str, str]:
        return {
            "title": self.title,
            "categories": ", ".join(self.categories),
            "description": self.description,
        }


@dataclass(frozen=True)
class ElectionsAnchor:
    candidate_webname: str
    cand_party: str
    biography_text: str

    def template_fields(self) -> dict[str, str]:
        return {"candidate_webname": self.candidate_webname, "biography_text": self.biography_text}


@dataclass(frozen=True)
class SocialMediaAnchor:
    article: str
    highlights: str
    id: str

    def template_fields(self) -> dict[str, str]:
        return {"article": self.article}


Anchor = SalesAnchor | ElectionsAnchor | SocialMediaAnchor

ANCHOR_TYPES: dict[str, type] = {
    "sales": SalesAnchor,
    "elections": ElectionsAnchor,
    "social_media": SocialMediaAnchor,
}


@dataclass(frozen=True)
class Persona:
    """One simulated audience member (a PRODIGY character)."""

    character_name: str
    gender: str
    mbti: str
    biography: tuple[str, ...]
    raw: dict  # the record as the file holds it: the voter prompt prints this dict

    def as_printed(self) -> str:
        """The persona as the authors inserted it: Python's repr of the dict."""
        return str(self.raw)


def _require(record: object, names: list[str], where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [n for n in names if n not in record]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing}; the file may be truncated or of another "
            f"version: delete it from the cache and fetch again (nox -s data)"
        )
    return record


def make_anchor(task: str, record: object, where: str) -> Anchor:
    """Build the typed anchor of ``task`` from one raw record."""
    cls = ANCHOR_TYPES[task]
    names = [f.name for f in fields(cls)]
    rec = _require(record, names, where)
    values = {}
    for name in names:
        value = rec[name]
        if name == "categories":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DataError(f"{where}: field 'categories' must be a list of strings")
            value = tuple(value)
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        values[name] = value
    return cls(**values)


def make_persona(record: object, where: str) -> Persona:
    rec = _require(record, ["character_name", "gender", "mbti", "biography"], where)
    if not isinstance(rec["biography"], list):
        raise DataError(f"{where}: field 'biography' must be a list of sentences")
    return Persona(
        character_name=str(rec["character_name"]),
        gender=str(rec["gender"]),
        mbti=str(rec["mbti"]),
        biography=tuple(str(s) for s in rec["biography"]),
        raw=rec,
    )
