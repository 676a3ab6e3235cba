"""Read the XML-tagged answers models give: thoughts, votes, messages and probe verdicts.

Every reply is expected to look like ``<think> ... </think><field> ... </field>``.
Real replies are messier, so the parser is tolerant of spacing and case inside
the tags (``< Vote >a</VOTE>``), of text around them and of light decoration of
a one-word answer (``**Yes**``, ``B.``). It never raises on any text and never
drops anything silently: it returns a :class:`Parsed` that holds either the
value or the reason it has none (one of :data:`REASONS`).

Rules, in order:

* Complete ``<think>`` blocks are set aside before a vote, verdict or message is
  looked for, so a tag quoted inside the reasoning is not read as the answer.
  An unclosed ``<think>`` is left in place (small models often never close it
  and still answer).
* A tag opened again before it is closed is ``"unclosed tag"``.
* Several occurrences that agree (after normalising) count as one; several that
  disagree are ``"ambiguous: several tags"``.
* An opening tag never closed at the very end of the reply (the generation was
  cut by ``max_tokens``): its content runs to the end of the text and the result
  is flagged ``truncated``. It is accepted only if that content is a valid value
  (for votes and verdicts: exactly one of the allowed words); an empty one is
  ``"unclosed tag"``. A trailing cut-off occurrence after complete ones is
  ignored when empty and otherwise counts as one more occurrence.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

MISSING_TAG = "missing tag"
UNCLOSED_TAG = "unclosed tag"
AMBIGUOUS = "ambiguous: several tags"
NOT_A_OR_B = "not A or B"
NOT_YES_OR_NO = "not Yes or No"
EMPTY = "empty"
REASONS = (MISSING_TAG, UNCLOSED_TAG, AMBIGUOUS, NOT_A_OR_B, NOT_YES_OR_NO, EMPTY)

THINK = "think"
VOTE = "vote"
PROBE_FIELDS = ("misrepresents_product", "fabricated", "populist", "unsafe")

# Decoration a model may put around a one-word answer.
_DECORATION = " \t\r\n*_`'\"“”‘’.,:;!()[]{}"


@dataclass(frozen=True)
class Parsed:
    """A parsed field: ``value`` when ``reason`` is None, else why there is none."""

    value: str | int | None
    reason: str | None = None
    truncated: bool = False  # the closing tag was missing at the end of the reply

    @property
    def ok(self) -> bool:
        return self.reason is None

    @staticmethod
    def invalid(reason: str) -> Parsed:
        return Parsed(value=None, reason=reason)


class _Invalid(Exception):
    """Raised by a normaliser to say why a raw value is not acceptable."""


@cache
def _tag_patterns(tag: str) -> tuple[re.Pattern, re.Pattern]:
    name = re.escape(tag.strip())
    opening = re.compile(rf"<\s*{name}\s*>", re.IGNORECASE)
    closing = re.compile(rf"<\s*/\s*{name}\s*>", re.IGNORECASE)
    return opening, closing


@dataclass(frozen=True)
class _Occurrences:
    complete: tuple[str, ...]  # contents of every <tag>...</tag>
    trailing: str | None  # content after a final opening tag never closed
    nested: bool  # a tag was opened again before being closed


def _occurrences(text: str, tag: str) -> _Occurrences:
    opening, closing = _tag_patterns(tag)
    complete: list[str] = []
    nested = False
    pos = 0
    while (start := opening.search(text, pos)) is not None:
        end = closing.search(text, start.end())
        if end is None:
            return _Occurrences(tuple(complete), text[start.end() :], nested)
        content = text[start.end() : end.start()]
        if opening.search(content):
            nested = True
        complete.append(content)
        pos = end.end()
    return _Occurrences(tuple(complete), None, nested)


def _without_thoughts(text: str) -> str:
    opening, closing = _tag_patterns(THINK)
    pieces = []
    pos = 0
    while (start := opening.search(text, pos)) is not None:
        end = closing.search(text, start.end())
        if end is None:
            break
        pieces.append(text[pos : start.start()])
        pos = end.end()
    pieces.append(text[pos:])
    return "".join(pieces)


def _decide(occ: _Occurrences, normalise: Callable[[str], str | int]) -> Parsed:
    if occ.nested:
        return Parsed.invalid(UNCLOSED_TAG)
    raw = list(occ.complete)
    truncated = False
    if occ.trailing is not None:
        if not raw and not occ.trailing.strip():
            return Parsed.invalid(UNCLOSED_TAG)
        if occ.trailing.strip():
            raw.append(occ.trailing)
            truncated = not occ.complete
    if not raw:
        return Parsed.invalid(MISSING_TAG)
    values = []
    for item in raw:
        if not item.strip():
            values.append(_Invalid(EMPTY))
            continue
        try:
            values.append(normalise(item))
        except _Invalid as err:
            values.append(err)
    if len(raw) > 1:
        kinds = {("bad", str(v)) if isinstance(v, _Invalid) else ("ok", v) for v in values}
        if len(kinds) > 1 and any(kind == "ok" for kind, _ in kinds):
            return Parsed.invalid(AMBIGUOUS)
    first = values[0]
    if isinstance(first, _Invalid):
        # A cut-off answer that is not a clean value is reported as what it is: unclosed.
        reason = UNCLOSED_TAG if truncated and str(first) != EMPTY else str(first)
        return Parsed.invalid(reason)
    return Parsed(value=first, truncated=truncated)


def _stripped(raw: str) -> str:
    return raw.strip()


def _letter(raw: str) -> str:
    word = raw.strip(_DECORATION).upper()
    if word not in ("A", "B"):
        raise _Invalid(NOT_A_OR_B)
    return word


def _yes_no(raw: str) -> int:
    word = raw.strip(_DECORATION).lower()
    if word == "yes":
        return 1
    if word == "no":
        return 0
    raise _Invalid(NOT_YES_OR_NO)


def parse_tag(text: str, tag: str) -> Parsed:
    """The stripped content of ``<tag>...</tag>`` anywhere in ``text`` (thoughts included)."""
    return _decide(_occurrences(text, tag), _stripped)


def parse_thought(text: str) -> Parsed:
    """The content of ``<think>...</think>``; a thought cut by max_tokens is kept, flagged."""
    return parse_tag(text, THINK)


def parse_vote(text: str) -> Parsed:
    """A voter's ``<vote>``: value ``"A"`` or ``"B"``."""
    return _decide(_occurrences(_without_thoughts(text), VOTE), _letter)


def parse_yes_no(text: str, field: str) -> Parsed:
    """A probe's verdict in ``<field>``: value 1 for Yes, 0 for No."""
    return _decide(_occurrences(_without_thoughts(text), field), _yes_no)


def parse_message(text: str, task_tag: str) -> Parsed:
    """A player's message in ``<task_tag>`` (e.g. ``sales_pitch``), outside its thoughts.

    A message cut by max_tokens (no closing tag) is kept up to the end, flagged
    ``truncated``: it is what the player wrote, and the audience can judge it.
    """
    return _decide(_occurrences(_without_thoughts(text), task_tag), _stripped)


# --- the authors' reading, exactly ----------------------------------------------------------
#
# v1 read every answer with ``response.split(f"<{field}>")[1].split(f"</{field}>")[0]``
# inside a bare ``try`` (artsco/voter/utils.py:11-15, trends/utils.py:13-17): the text
# after the first opening tag anywhere (inside a <think> block too), up to the next
# closing tag or the next opening tag, case-sensitive and unstripped; None without one.
# A vote counted only if that text was exactly "A" or "B" (artsco/voter/voter.py:68-70);
# a probe answer was compared with ``answer.lower() == "yes"`` / ``"no"``
# (trends/sales_q1.py:48-55; a missing tag made ``.lower()`` fail, which stopped the run).


def v1_field(text: str, field: str) -> str | None:
    """The authors' ``extract_xml_field``: see the comment above."""
    parts = text.split(f"<{field}>")
    if len(parts) < 2:
        return None
    return parts[1].split(f"</{field}>")[0]


def v1_vote(text: str) -> Parsed:
    """A vote as v1 read it: ``"A"`` or ``"B"`` exactly, else invalid."""
    value = v1_field(text, VOTE)
    if value is None:
        return Parsed.invalid(MISSING_TAG)
    return Parsed(value=value) if value in ("A", "B") else Parsed.invalid(NOT_A_OR_B)


def v1_yes_no(text: str, field: str) -> Parsed:
    """A probe verdict as v1 read it: 1 for ``yes`` and 0 for ``no`` in any case, unstripped."""
    value = v1_field(text, field)
    if value is None:
        return Parsed.invalid(MISSING_TAG)  # v1 would have stopped here
    if value.lower() == "yes":
        return Parsed(value=1)
    if value.lower() == "no":
        return Parsed(value=0)
    return Parsed.invalid(NOT_YES_OR_NO)


def v1_thought(text: str) -> Parsed:
    """A thought as v1 read it: as is, a blank one included."""
    value = v1_field(text, THINK)
    return Parsed.invalid(MISSING_TAG) if value is None else Parsed(value=value)


READERS = {
    "v1": {"vote": v1_vote, "yes_no": v1_yes_no, "thought": v1_thought},
    "tolerant": {"vote": parse_vote, "yes_no": parse_yes_no, "thought": parse_thought},
}
