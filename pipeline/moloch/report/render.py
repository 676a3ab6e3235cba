"""The offline book renderer: ``_quarto.yml`` -> HTML pages and a Typst PDF, without Quarto.

It reads the chapter list of ``_quarto.yml``, expands ``embed`` shortcodes from
executed notebooks (see ``shortcodes`` for the supported features), converts each
chapter with pandoc (``pypandoc-binary``) into an HTML page with a sidebar, a table
of contents and prev/next links, and all chapters into one Typst document that
``typst.compile`` turns into the PDF. It never executes anything.

    python -m moloch.report.render            # render the book in the repository root
    python -m moloch.report.render --chapter sales --no-pdf
"""

from __future__ import annotations

import argparse
import html
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, MolochError
from ..files import write_atomic
from ..paths import ROOT
from .book import Book, Chapter, load_book
from .shortcodes import (
    Embedder,
    embeds,
    find_unsupported,
    number_crossrefs,
    resolve_crossrefs,
)

TEMPLATES = Path(__file__).parent / "templates"
FIGURES = "figures"
# Long tables (the claims table has one row per published number) must break
# across pages, and read better a size smaller than the text.
TYPST_TABLE_STYLE = (
    "#show figure.where(kind: table): set block(breakable: true)\n"
    "#show table: set text(size: 0.75em, hyphenate: false)\n"
    "#show table.cell: set par(justify: false)"
)
# Auto heading ids would repeat across chapters ("Win rates" in every task chapter),
# which Typst rejects once the chapters are one document.
TYPST_READER = "markdown-auto_identifiers"


@dataclass
class Rendered:
    pages: list[Path] = field(default_factory=list)
    pdf: Path | None = None
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def check_features(book: Book) -> None:
    """Refuse to render a chapter that uses a Quarto feature the offline renderer lacks."""
    problems = []
    for chapter in book.chapters:
        found = find_unsupported(chapter.body, chapter.meta)
        problems += [f"{chapter.source}: {p}" for p in found]
    if problems:
        raise DataError(
            "chapters use features the offline renderer does not support "
            "(see moloch/report/shortcodes.py for the list):\n  " + "\n  ".join(problems)
        )


def _crossref_pages(book: Book) -> dict[str, str]:
    return {label: c.page for c in book.chapters for _, label in embeds(c.body)}


def _sidebar(book: Book, current: Chapter) -> str:
    items, in_appendix = [], False
    for chapter in book.chapters:
        if chapter.number.isalpha() and not in_appendix:
            items.append('<li class="appendix-label">Appendices</li>')
            in_appendix = True
        css = ' class="current"' if chapter is current else ""
        label = html.escape(chapter.label)
        items.append(f'<li{css}><a href="{chapter.page}">{label}</a></li>')
    return "<ol>" + "".join(items) + "</ol>"


def _pager_link(chapter: Chapter | None, arrow: str) -> str:
    if chapter is None:
        return ""
    text = f"{arrow} {chapter.label}" if arrow == "←" else f"{chapter.label} {arrow}"
    return f'<a href="{chapter.page}">{html.escape(text)}</a>'


def render_page(book: Book, chapter: Chapter, embedder: Embedder, numbers: dict) -> Path:
    """One chapter as ``<output-dir>/<page>``."""
    import pypandoc

    text = embedder.expand(chapter.body, chapter.source)
    text = resolve_crossrefs(text, "html", numbers, _crossref_pages(book))
    index = book.chapters.index(chapter)
    before = book.chapters[index - 1] if index > 0 else None
    after = book.chapters[index + 1] if index + 1 < len(book.chapters) else None
    variables = {
        "book-title": html.escape(book.title),
        "book-subtitle": html.escape(book.subtitle) if chapter.name == "index" else "",
        "page-title": html.escape(chapter.title),
        "chapter-title": html.escape(chapter.label),
        "sidebar": _sidebar(book, chapter),
        "prev": _pager_link(before, "←"),
        "next": _pager_link(after, "→"),
        "pdf": book.pdf.name,
    }
    args = ["--template", str(TEMPLATES / "page.html"), "--toc", "--toc-depth=3"]
    for key, value in variables.items():
        args += ["-V", f"{key}={value}"]
    page = pypandoc.convert_text(text, "html5", format="markdown", extra_args=args)
    out = book.output_dir / chapter.page
    write_atomic(out, page)
    return out


def typst_source(book: Book, embedder: Embedder, numbers: dict) -> str:
    """All chapters as one Typst document (pandoc's default Typst template)."""
    import pypandoc

    parts = []
    for chapter in book.chapters:
        body = embedder.expand(chapter.body, chapter.source)
        body = resolve_crossrefs(body, "typst", numbers, {})
        heading = f"Appendix {chapter.label}" if chapter.number.isalpha() else chapter.label
        if parts:
            parts.append("```{=typst}\n#pagebreak()\n```")
        parts.append(f"# {heading}\n\n{body}")
    args = ["--standalone", "--toc", "-V", "papersize=a4", "-M", f"title={book.title}"]
    args += ["-V", f"header-includes={TYPST_TABLE_STYLE}"]
    if book.subtitle:
        args += ["-M", f"subtitle={book.subtitle}"]
    if book.author:
        args += ["-M", f"author={book.author}"]
    return pypandoc.convert_text("\n\n".join(parts), "typst", format=TYPST_READER, extra_args=args)


def render_pdf(book: Book, embedder: Embedder, numbers: dict) -> Path:
    import typst

    source = book.output_dir / f"{book.output_file}.typ"
    write_atomic(source, typst_source(book, embedder, numbers))
    try:
        pdf = typst.compile(str(source), root=str(book.output_dir))
    except Exception as err:  # typst raises its own TypstError
        raise DataError(f"Typst could not compile {source}: {err}") from err
    write_atomic(book.pdf, pdf)
    return book.pdf


def publish_figures(figures: list[Path], folder: Path, clear: bool) -> None:
    """Copy the book's figures to ``folder`` (``figures/<profile>``; a full render clears it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if clear:
        for old in folder.iterdir():
            if old.is_file() and not old.name.startswith("."):  # keeps .gitkeep
                old.unlink()
    for figure in figures:
        write_atomic(folder / figure.name, figure.read_bytes())


def render_book(
    root: Path = ROOT,
    chapter: str | None = None,
    pdf: bool = True,
    book: Book | None = None,
    figures_dir: Path | None = None,
) -> Rendered:
    """Render the whole book, or only ``chapter``'s page (plus the PDF unless ``pdf`` is False).

    ``book``: the book of ``root`` with another output folder (one per profile);
    ``figures_dir``: where the figures are published (default ``root/figures``).
    """
    start = time.perf_counter()
    book = book or load_book(root)
    check_features(book)
    numbers = number_crossrefs([c.body for c in book.chapters])
    figures = book.output_dir / FIGURES
    if chapter is None and figures.exists():
        shutil.rmtree(figures)  # a full render leaves no stale figure behind
    book.output_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATES / "book.css", book.output_dir / "book.css")
    result = Rendered()
    html_embedder = Embedder("html", figures, FIGURES, numbers)
    chosen = [book.chapter(chapter)] if chapter else list(book.chapters)
    result.pages = [render_page(book, c, html_embedder, numbers) for c in chosen]
    typst_embedder = Embedder("typst", figures, FIGURES, numbers)
    if pdf:
        result.pdf = render_pdf(book, typst_embedder, numbers)
    result.figures = sorted(set(html_embedder.written + typst_embedder.written))
    publish_figures(result.figures, figures_dir or root / FIGURES, clear=chapter is None)
    result.seconds = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="folder holding _quarto.yml")
    parser.add_argument("--chapter", help="render only this chapter's page (file stem)")
    parser.add_argument("--no-pdf", action="store_true", help="skip the Typst PDF")
    args = parser.parse_args(argv)
    try:
        result = render_book(args.root, args.chapter, pdf=not args.no_pdf)
    except MolochError as err:
        print(f"error: {err}")
        return 1
    print(
        f"rendered {len(result.pages)} page(s) and {'a' if result.pdf else 'no'} PDF "
        f"in {result.seconds:.1f} s -> {result.pages[0].parent}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
