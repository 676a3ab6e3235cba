"""The book's structure as plain data, read from ``_quarto.yml`` and each chapter's front matter.

Both renderers (Quarto itself and the offline one) read the same ``_quarto.yml``;
this module reads only the keys the offline renderer needs: ``project.output-dir``,
``book.title/subtitle/author/output-file``, ``book.chapters`` and ``book.appendices``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import DataError

FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n---[ \t]*\n", re.DOTALL)


@dataclass(frozen=True)
class Chapter:
    source: Path  # the .qmd file
    name: str  # stem, used for the page name and `nox -s chapter -- <name>`
    title: str
    number: str  # "" (the index), "1", "2"..., or "A", "B"... for appendices
    body: str  # the Markdown after the front matter
    meta: dict  # the front matter

    @property
    def page(self) -> str:
        """The HTML page of this chapter, relative to the book's output folder."""
        return "index.html" if self.name == "index" else f"{self.name}.html"

    @property
    def label(self) -> str:
        return f"{self.number}\u2002{self.title}" if self.number else self.title


@dataclass(frozen=True)
class Book:
    root: Path  # the folder holding _quarto.yml
    title: str
    subtitle: str
    author: str
    output_dir: Path
    output_file: str  # base name of the PDF
    chapters: tuple[Chapter, ...]

    def chapter(self, name: str) -> Chapter:
        for chapter in self.chapters:
            if chapter.name == name:
                return chapter
        names = ", ".join(c.name for c in self.chapters)
        raise DataError(f"the book has no chapter {name!r}; its chapters are: {names}")

    @property
    def pdf(self) -> Path:
        return self.output_dir / f"{self.output_file}.pdf"


def split_front_matter(text: str, source: Path) -> tuple[dict, str]:
    """The YAML front matter (a mapping, possibly empty) and the Markdown body."""
    match = FRONT_MATTER.match(text)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{source}: the front matter is not valid YAML: {err}") from err
    if not isinstance(meta, dict):
        raise DataError(f"{source}: the front matter must be a mapping (e.g. `title: ...`)")
    return meta, text[match.end() :]


def _title(meta: dict, body: str, source: Path) -> tuple[str, str]:
    """The chapter title (front matter, else its first level-1 heading) and the body without it."""
    if meta.get("title"):
        return str(meta["title"]), body
    heading = re.search(r"^# +(.+?)\s*(\{[^}]*\})?\s*$", body, re.MULTILINE)
    if not heading:
        raise DataError(f"{source}: give the chapter a title (front matter `title:` or `# Title`)")
    return heading.group(1), body[: heading.start()] + body[heading.end() :]


def _chapter_list(book: dict, key: str, config: Path) -> list[str]:
    entries = book.get(key) or []
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise DataError(
            f"{config}: book.{key} must be a list of .qmd paths (parts are not supported offline)"
        )
    return entries


def load_book(root: Path) -> Book:
    """Read ``root/_quarto.yml`` and every chapter it lists, in order."""
    config = root / "_quarto.yml"
    if not config.is_file():
        raise DataError(f"no book configuration at {config}")
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{config} is not valid YAML: {err}") from err
    book = raw.get("book") or {}
    if raw.get("project", {}).get("type") != "book" or not book.get("chapters"):
        raise DataError(f"{config}: expected `project: type: book` and a `book: chapters:` list")
    listed = [(p, False) for p in _chapter_list(book, "chapters", config)]
    listed += [(p, True) for p in _chapter_list(book, "appendices", config)]
    chapters = []
    numbered = appendix = 0
    for rel, is_appendix in listed:
        source = root / rel
        if not source.is_file():
            raise DataError(f"{config} lists chapter {rel}, but {source} does not exist")
        meta, body = split_front_matter(source.read_text(encoding="utf-8"), source)
        title, body = _title(meta, body, source)
        if source.stem == "index" and not is_appendix:
            number = ""
        elif is_appendix:
            number = chr(ord("A") + appendix)
            appendix += 1
        else:
            numbered += 1
            number = str(numbered)
        chapters.append(Chapter(source, source.stem, title, number, body, meta))
    names = [c.name for c in chapters]
    if len(set(names)) != len(names):
        raise DataError(f"{config}: two chapters share a file name; page names must be unique")
    return Book(
        root=root,
        title=str(book.get("title", "")),
        subtitle=str(book.get("subtitle", "")),
        author=str(book.get("author", "")),
        output_dir=root / raw.get("project", {}).get("output-dir", "_book"),
        output_file=str(book.get("output-file", "book")),
        chapters=tuple(chapters),
    )
