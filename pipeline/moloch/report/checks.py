"""Checks on a rendered book (either renderer): nothing missing, nothing unresolved.

A page fails when its visible text shows ``nan``/``NaN``/``None`` (a number that
was never computed), an unresolved shortcode (``{{<``) or cross-reference
(``@fig-x``, or Quarto's ``?@fig-x``), or when it references an image that does
not exist. The PDF fails when its text lacks one of the required strings (the
summary table's cells).

    python -m moloch.report.checks _book "Sales"
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import DataError

BAD_TEXT = re.compile(r"\b(nan|NaN|None)\b|\{\{<|\?@|(?<![\w`])@(?:fig|tbl)-[\w-]+")


# Not checked: code, and block quotes, where the book shows models' replies literally
# (a reply may well say "None" or "@fig-1").
UNCHECKED = ("script", "style", "blockquote")


class _Page(HTMLParser):
    """Visible text (outside quotes of model output) and image sources of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.quoted: list[str] = []  # the block quotes' text: models' output, shown literally
        self.images: list[str] = []
        self._hidden = self._quotes = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in UNCHECKED:
            self._hidden += 1
        self._quotes += tag == "blockquote"
        if tag == "img":
            self.images += [v for k, v in attrs if k == "src" and v]

    def handle_endtag(self, tag: str) -> None:
        if tag in UNCHECKED and self._hidden:
            self._hidden -= 1
        if tag == "blockquote" and self._quotes:
            self._quotes -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.text.append(data)
        if self._quotes:
            self.quoted.append(data)


def table_first_column(markdown: str) -> list[str]:
    """The first-column data cells of the pipe tables in ``markdown``, without inline markup."""
    cells: list[str] = []
    previous_was_row = False
    for line in markdown.splitlines():
        line = line.strip()
        if re.fullmatch(r"\|?[\s:|-]*-[\s:|-]*\|?", line) and previous_was_row:
            cells.pop()  # the row above a separator is the header
            previous_was_row = False
            continue
        previous_was_row = line.startswith("|")
        if previous_was_row:
            first = line.strip("|").split("|")[0]
            first = re.sub(r"`[^`]*`\{=\w+\}", "", first)  # raw HTML/Typst snippets
            cells.append(re.sub(r"\*\*|`", "", first).strip())
    return [c for c in cells if c]


def bad_text(text: str) -> list[str]:
    """Each suspicious string in ``text``, with a little context."""
    return [
        text[max(0, m.start() - 30) : m.end() + 30].replace("\n", " ")
        for m in BAD_TEXT.finditer(text)
    ]


def _parse(page: Path) -> _Page:
    parser = _Page()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def check_page(page: Path) -> list[str]:
    parser = _parse(page)
    problems = [f"{page.name}: shows {snippet!r}" for snippet in bad_text(" ".join(parser.text))]
    for src in parser.images:
        url = urlparse(src)
        if url.scheme in ("http", "https", "data"):
            continue
        if not (page.parent / unquote(url.path)).is_file():
            problems.append(f"{page.name}: image {src} does not exist")
    return problems


def pdf_text(pdf: Path) -> str:
    from pypdf import PdfReader

    return "\n".join(page.extract_text() or "" for page in PdfReader(pdf).pages)


def _squash(text: str) -> str:
    """``text`` without whitespace and hyphens: Typst breaks lines anywhere in a table cell,
    and some of its fonts' hyphens come out of the PDF as soft hyphens (U+00AD)."""
    return re.sub(r"[\s\u00ad-]+", "", text)


def check_pdf(pdf: Path, required: list[str], quoted: str = "") -> list[str]:
    """Problems of the PDF; ``quoted``: the text the HTML pages show in block quotes (the
    PDF has no quotes to skip, so a suspicious string found inside that text is not one)."""
    if not pdf.is_file():
        return [f"the PDF {pdf} was not written"]
    text = pdf_text(pdf)
    literal = _squash(quoted)
    problems = []
    for m in BAD_TEXT.finditer(text):
        # Inside a quote, the match and what stands on one side of it are quoted text too.
        left, right = text[max(0, m.start() - 12) : m.end()], text[m.start() : m.end() + 12]
        if not (literal and (_squash(left) in literal or _squash(right) in literal)):
            snippet = text[max(0, m.start() - 30) : m.end() + 30].replace("\n", " ")
            problems.append(f"{pdf.name}: shows {snippet!r}")
    squashed = _squash(text)
    problems += [f"{pdf.name}: lacks {s!r}" for s in required if _squash(s) not in squashed]
    return problems


def check_book(output_dir: Path, pdf: Path | None, required: list[str] = ()) -> None:
    """Raise ``DataError`` listing every problem of the rendered pages and PDF."""
    pages = sorted(output_dir.glob("*.html")) + sorted(output_dir.glob("chapters/*.html"))
    if not pages:
        raise DataError(f"no HTML page in {output_dir}: render the book first")
    problems = [p for page in pages for p in check_page(page)]
    if pdf is not None:
        quoted = " ".join(t for page in pages for t in _parse(page).quoted)
        problems += check_pdf(pdf, list(required), quoted)
    if problems:
        raise DataError(
            f"the rendered book in {output_dir} has problems:\n  " + "\n  ".join(problems)
        )


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pdfs = sorted(out.glob("*.pdf"))
    check_book(out, pdfs[0] if pdfs else None, sys.argv[2:])
    print(f"{out}: ok")
