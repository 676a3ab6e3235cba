"""What the analysis notebooks compute, as functions: open a run, summarise, format.

The notebooks in ``pipeline/analysis/`` stay thin: they call these and display
the results (Markdown tables render in both the HTML page and the PDF). Every
number they show comes from the run's cells table (``moloch.cells``) or its
claims table, so the chapters and the verdicts always agree.

    >>> from moloch.report import analysis as an
    >>> run = an.open_run("smoke", None)           # the notebooks' first call
    >>> votes = run.table("compete", "votes.jsonl", task="sales")
"""

from __future__ import annotations

import math
import re

import pandas as pd

from ..config import Profile
from ..files import read_json
from ..manifests import MANIFEST, call_totals
from ..runs import Run, find_run

RAW_INLINE = re.compile(r"`[^`]*`\{=\w+\}")  # pandoc raw HTML/Typst: not shown, takes no width
BOLD_WIDTH = 1.25  # a bold letter's width in plain letters (the PDF's bold verdicts overflowed)
VERDICT_COLOURS = {"green": "#1a7f37", "amber": "#9a6700", "red": "#cf222e", "grey": "#57606a"}


def open_run(profile: str | None, run_dir: str | None) -> Run:
    """The run an analysis notebook reports (its two parameters), with the figures' style set."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return find_run(profile, run_dir)


def manifests(run: Run) -> pd.DataFrame:
    """One row per finished stage unit: where, how long, how many model calls."""
    from ..stages import STAGE_NAMES

    rows = []
    for folder in (f for stage in STAGE_NAMES for f in run.finished_units(stage)):
        m = read_json(folder / MANIFEST, "manifest")
        rows.append(
            {
                "stage": m.get("stage"),
                "task": m.get("task"),
                "model": m.get("model"),
                "method": m.get("method") or "",
                "wall_s": m.get("wall_s"),
                "finished": m.get("finished"),
                **call_totals(m),
                "commit": (m.get("code") or {}).get("commit"),
                "profile_digest": m.get("profile_digest"),
            }
        )
    return pd.DataFrame(rows)


def pct(x: float | None, digits: int = 1, signed: bool = False) -> str:
    """A fraction as percent text; a missing value says so in words (never "nan")."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):  # a relative change from a base rate of zero
        return "+\u221e" if x > 0 else "\u2212\u221e"
    return f"{x * 100:{'+' if signed else ''}.{digits}f}%"


# Every ASCII punctuation mark pandoc's Markdown may read as structure (emphasis, headings,
# lists, links, raw HTML, tables, shortcodes, cross-references); a backslash makes it literal.
_MARKUP = re.compile(r"([!-/:-@\[-`{-~])")


def literal(text: object) -> str:
    """Untrusted text (a model's reply, a persona's name) as Markdown that shows it literally.

    Whitespace is folded to single spaces and every punctuation mark is escaped, so no reply
    can become a heading, a table, raw HTML, a Typst command, a shortcode or a reference.
    """
    return _MARKUP.sub(r"\\\1", " ".join(str(text).split()))


def quote(text: object, limit: int = 700) -> str:
    """Untrusted text as a Markdown block quote, cut at ``limit`` characters."""
    text = " ".join(str(text or "(empty)").split())
    return "> " + literal(text[:limit]) + (" ..." if len(text) > limit else "")


def interval(estimate: float, low: float, high: float, signed: bool = False) -> str:
    """``55.0% [48.1%, 61.2%]``."""
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (low, high)):
        return f"{pct(estimate, signed=signed)} (no interval)"
    return f"{pct(estimate, signed=signed)} [{pct(low, signed=signed)}, {pct(high, signed=signed)}]"


def coloured(text: str, colour: str) -> str:
    """Markdown text in a colour, in the HTML page (a span) and in the PDF (Typst text)."""
    hex_ = VERDICT_COLOURS.get(colour, colour)
    return (
        f'`<span style="color:{hex_};font-weight:600">`{{=html}}'
        f'`#text(fill: rgb("{hex_}"), weight: "bold")[`{{=typst}}{text}`]`{{=typst}}'
        "`</span>`{=html}"
    )


def markdown_table(df: pd.DataFrame) -> str:
    """A pipe table; missing values show as "n/a"."""

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return "n/a"
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rows = [[cell(v) for v in row] for row in df.itertuples(index=False)]
    # pandoc sizes the columns of a wide table by the dashes under each header: room for
    # the longest word (tables are not hyphenated), and up to 30 characters of a long text.
    # A coloured cell is bold, wider per letter: measured as BOLD_WIDTH plain letters each.
    widths = []
    for i, name in enumerate(df.columns):
        texts = [(str(name), 1.0)]
        texts += [
            (RAW_INLINE.sub("", r[i]), BOLD_WIDTH if RAW_INLINE.search(r[i]) else 1.0) for r in rows
        ]
        word = max(math.ceil(len(w) * k) for t, k in texts for w in [*t.split(), ""])
        longest = max(math.ceil(len(t) * k) for t, k in texts)
        widths.append(max(word, min(longest, 30), 3) + 3)  # + padding
    rule = "|" + "|".join(":" + "-" * w for w in widths) + "|"
    body = ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([header, rule, *body])


CLAIM_COLOURS = {
    "reproduced": "green",
    "differs": "red",
    "inconclusive": "amber",
    "not computable": "amber",
}
RULES = {  # the claims table's short names of the verdict rules (moloch.claims.TOLERANCES)
    "equivalence": "same cell",
    "equivalence_any_candidate": "any candidate",
}


def claims_table(verdicts: pd.DataFrame, profile: Profile) -> pd.DataFrame:
    """The summary's claims table: a row per published value, the run-wide reason left out.

    ``verdicts`` is ``moloch.claims.evaluate_claims``'s output; a reason that holds for
    every claim (``claims.run_reason``) is said once, next to the table, not in each row.
    """
    from ..claims import run_reason

    def number(v) -> str:
        return "n/a" if pd.isna(v) else f"{v:.3g}"

    shared = run_reason(profile)
    reasons = verdicts["reason"].fillna("")
    if shared:
        reasons = reasons.map(lambda r: r.removeprefix(shared).removeprefix("; ") or "-")
    return pd.DataFrame(
        {
            "claim": verdicts["claim_id"],
            "published": [
                f"{number(p)} {u}" for p, u in zip(verdicts.published, verdicts.unit, strict=True)
            ],
            "this run": [
                number(v) if pd.isna(lo) else f"{number(v)} [{number(lo)}, {number(hi)}]"
                for v, lo, hi in zip(verdicts.value, verdicts.ci_low, verdicts.ci_high, strict=True)
            ],
            "verdict": [coloured(s, CLAIM_COLOURS.get(s, "grey")) for s in verdicts.status],
            "rule": verdicts["rule"].map(RULES).fillna("-"),
            "reason": reasons,
        }
    )


def parser_note(wins: pd.DataFrame, rates: pd.DataFrame, profile: Profile) -> str:
    """One sentence: on how many votes and labels v1's reading and the tolerant parser differ."""
    votes = wins["n_parser_disagreements"].dropna()
    labels = rates["n_parser_disagreements"].dropna()
    if votes.empty and labels.empty:
        return "This run's tables predate the second reading of each reply."
    return (
        f"Read as v1 read them and by the tolerant parser, the replies give a different vote "
        f"on {int(votes.sum())} ballot(s) and a different label on {int(labels.sum())} "
        f"judgement(s); this run counts votes by the {profile.audience.parser} reading and "
        f"labels by the {profile.judge.parser} reading."
    )


def regime_note(cells: pd.DataFrame) -> str:
    """One sentence: how many cells lie where their interval's coverage was not validated."""
    regimes = cells["coverage_regime"].fillna("validated")
    off = regimes[regimes != "validated"].value_counts()
    if off.empty:
        return "Every interval here lies where the coverage benchmark validated its type."
    listed = ", ".join(f"{n} {why}" for why, n in off.items())
    return (
        f"Of its {len(cells)} intervals, some lie outside the sizes where the coverage "
        f"benchmark validated their type ({listed}): read them as approximate or conservative "
        f"(moloch.bench_coverage)."
    )


def win_rates(cells: pd.DataFrame) -> pd.DataFrame:
    """Win-rate cells (unrounded) with the performance figure (win rate minus 0.5) and the
    authors' statistic beside them (``v1_estimate``: each duel's share rounded first)."""
    w = cells[(cells["kind"] == "win_rate") & (cells["statistic"] == "win_rate_second")].copy()
    v1 = cells[(cells["kind"] == "win_rate") & (cells["statistic"] == "win_rate_second_v1")]
    rounded = v1.set_index(["task", "model", "pair"])["estimate"]
    w["v1_estimate"] = [rounded.get(k) for k in zip(w.task, w.model, w.pair, strict=True)]
    w["performance"] = w["estimate"] - 0.5
    return w


def probe_changes(cells: pd.DataFrame, statistic: str = "relative_change") -> pd.DataFrame:
    c = cells[(cells["kind"] == "probe_change") & (cells["statistic"] == statistic)]
    return c.copy()


def tradeoff(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (task, model, trained method, probe): performance gain vs misalignment change."""
    perf = win_rates(cells)
    perf = perf[perf["pair"].isin(["base-rft", "base-tfb"])]
    perf = perf.rename(
        columns={"estimate": "win_rate", "ci_low": "win_low", "ci_high": "win_high"}
    )[["task", "model", "method", "win_rate", "win_low", "win_high", "performance"]]
    change = probe_changes(cells).rename(
        columns={"estimate": "change", "ci_low": "change_low", "ci_high": "change_high"}
    )[
        [
            "task",
            "model",
            "method",
            "probe_id",
            "metric",
            "change",
            "change_low",
            "change_high",
        ]
    ]
    both = change.merge(perf, on=["task", "model", "method"], how="left")
    both["rose"] = both["change"] > 0
    both["rose_surely"] = both["change_low"] > 0
    return both
