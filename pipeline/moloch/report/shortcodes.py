"""The Quarto features the offline renderer understands, and the ``embed`` shortcode.

Chapters may use only these (``find_unsupported`` lists anything else, and the
renderer refuses a chapter that uses it, so the offline and Quarto books never differ):

- YAML front matter with ``title`` only;
- pandoc Markdown (headings from ``##`` down, lists, emphasis, links, pipe tables,
  plain fenced code blocks, raw ``{=html}`` / ``{=typst}`` inlines);
- ``{{< embed path/to/notebook.ipynb#label >}}`` alone on a line: the outputs of
  the cell with ``#| label: label`` in an executed notebook (PNG/SVG images, then
  text/markdown, text/html or text/plain outputs, and stdout);
- cross-references ``@fig-x`` / ``@tbl-x`` to embedded cells labelled ``fig-x`` /
  ``tbl-x`` (numbered captions from the cell's ``fig-cap`` / ``tbl-cap`` option; a cell
  with another label gets its caption unnumbered, so one notebook can serve several
  chapters, as cross-reference labels must be unique in a book);
- callouts ``::: {.callout-note}`` (also tip, warning, important, caution) closed by ``:::``.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

from ..errors import DataError

EMBED = re.compile(
    r"^\{\{<\s*embed\s+(?P<path>[^#\s]+\.ipynb)#(?P<label>[\w-]+)\s*>\}\}[ \t]*$", re.M
)
# Not after a backslash: an escaped "\@fig-x" in shown text is literal, not a reference.
CROSSREF = re.compile(r"(?<![\w@`\\])@(?P<label>(?:fig|tbl)-[\w-]*\w)")
CALLOUTS = ("note", "tip", "warning", "important", "caution")
FRONT_MATTER_KEYS = ("title",)

_UNSUPPORTED = (
    (re.compile(r"\{\{<.*?>\}\}"), "shortcode"),
    (re.compile(r"^\s*(`{3,}|~{3,})\s*\{[A-Za-z]", re.M), "executable code cell"),
    (re.compile(r"`\{[A-Za-z]+\}[^`]*`"), "inline code expression"),
    (re.compile(r"(?<![\w@`])@[A-Za-z][\w:-]*"), "citation or cross-reference"),
    (re.compile(r"^:::+.*$", re.M), "fenced div"),
)
_SUPPORTED_DIV = re.compile(r"^:::+\s*(\{\.callout-(" + "|".join(CALLOUTS) + r")\})?\s*$")
_IMAGE_TYPES = {"image/png": "png", "image/svg+xml": "svg", "image/jpeg": "jpg"}


def find_unsupported(text: str, meta: dict | None = None) -> list[str]:
    """Every use of a feature the offline renderer does not handle, as readable strings."""
    problems = [f"front matter key {k!r}" for k in (meta or {}) if k not in FRONT_MATTER_KEYS]
    stripped = EMBED.sub("", text)
    stripped = CROSSREF.sub("", stripped)
    for pattern, what in _UNSUPPORTED:
        for match in pattern.finditer(stripped):
            snippet = match.group(0).strip()
            if what == "fenced div" and _SUPPORTED_DIV.match(snippet):
                continue
            problems.append(f"{what}: {snippet[:60]}")
    return problems


def embeds(text: str) -> list[tuple[str, str]]:
    """(notebook path as written, cell label) of every embed shortcode, in order."""
    return [(m.group("path"), m.group("label")) for m in EMBED.finditer(text)]


@dataclass(frozen=True)
class Cell:
    notebook: Path
    label: str
    options: dict  # the cell's `#|` options
    outputs: tuple = field(repr=False)


def cell_options(source: str) -> dict:
    """The ``#| key: value`` lines at the top of a code cell, as YAML."""
    lines = []
    for line in source.splitlines():
        if not line.startswith("#|"):
            break
        # "#| " then YAML: keep the indentation after the one space, so folded values work
        lines.append(line[3:] if line.startswith("#| ") else line[2:])
    try:
        options = yaml.safe_load("\n".join(lines)) if lines else {}
    except yaml.YAMLError as err:
        raise DataError(f"cell options are not valid YAML ({err}): {lines}") from err
    return options if isinstance(options, dict) else {}


def find_cell(notebook: Path, label: str) -> Cell:
    """The cell labelled ``label`` (``#| label:``, else the cell id) of an executed notebook."""
    if not notebook.is_file():
        raise DataError(
            f"embedded notebook {notebook} does not exist: execute the analysis notebooks "
            "first (`nox -s report` does it for a finished run)"
        )
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        options = cell_options(cell.source)
        if label in (options.get("label"), cell.get("id")):
            for out in cell.outputs:
                if out.output_type == "error":
                    raise DataError(
                        f"{notebook}, cell {label!r} failed when executed "
                        f"({out.ename}: {out.evalue}); fix the notebook and execute it again"
                    )
            return Cell(notebook, label, options, tuple(cell.outputs))
    raise DataError(
        f"{notebook} has no cell labelled {label!r}; add `#| label: {label}` to the cell"
    )


def html_to_markdown(html: str) -> str:
    """Pandoc's reading of an HTML output (a pandas table), for formats without raw HTML."""
    import pypandoc

    # Pipe tables only: pandoc's simple tables clip a header wider than its column.
    writer = "markdown" + "".join(
        f"-{ext}"
        for ext in ("raw_html", "raw_attribute", "native_divs", "native_spans")
        + ("simple_tables", "multiline_tables", "grid_tables")
    )
    return pypandoc.convert_text(html, writer, format="html-native_divs")


@dataclass
class Embedder:
    """Turns embed shortcodes into Markdown for one output format ("html" or "typst").

    Images are written to ``figures_dir`` and referenced as ``figures_rel/<file>``;
    ``numbers`` maps each cross-referenceable label to its "Figure N" / "Table N".
    """

    fmt: str
    figures_dir: Path
    figures_rel: str
    numbers: dict[str, str]
    written: list[Path] = field(default_factory=list)

    def expand(self, text: str, source: Path) -> str:
        def replace(match: re.Match) -> str:
            notebook = (source.parent / match.group("path")).resolve()
            cell = find_cell(notebook, match.group("label"))
            return self.cell_markdown(cell)

        return EMBED.sub(replace, text)

    def _image(self, cell: Cell, index: int, mime: str, data: str) -> str:
        name = f"{cell.notebook.stem}-{cell.label}-{index}.{_IMAGE_TYPES[mime]}"
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        path = self.figures_dir / name
        blob = data.encode() if mime == "image/svg+xml" else base64.b64decode(data)
        path.write_bytes(blob)
        self.written.append(path)
        return f"{self.figures_rel}/{name}"

    def _caption(self, cell: Cell, kind: str) -> str:
        caption = str(cell.options.get(f"{kind}-cap", "")).strip()
        if not caption:
            raise DataError(f"{cell.notebook}, cell {cell.label!r}: give it a `#| {kind}-cap:`")
        # Typst numbers figures itself; the HTML page shows our number.
        return caption if self.fmt == "typst" else f"{self.numbers[cell.label]}: {caption}"

    @staticmethod
    def _plain_caption(cell: Cell, kind: str) -> str | None:
        """An unnumbered caption (a cell not labelled fig-/tbl-), as an italic paragraph."""
        caption = str(cell.options.get(f"{kind}-cap", "")).strip()
        return f"*{caption}*" if caption else None

    def cell_markdown(self, cell: Cell) -> str:
        parts: list[str] = []
        figure_done = False
        for index, out in enumerate(cell.outputs):
            if out.output_type == "stream":
                if out.name == "stdout" and out.text.strip():
                    parts.append(f"```\n{out.text.rstrip()}\n```")
                continue
            data = out.get("data", {})
            image = next((m for m in _IMAGE_TYPES if m in data), None)
            if image:
                path = self._image(cell, index, image, data[image])
                if cell.label.startswith("fig-") and not figure_done:
                    parts.append(f"![{self._caption(cell, 'fig')}]({path}){{#{cell.label}}}")
                    figure_done = True
                else:
                    parts.append(f"![]({path})")
                    if not cell.label.startswith("fig-") and self._plain_caption(cell, "fig"):
                        parts.append(self._plain_caption(cell, "fig"))
            elif "text/markdown" in data:
                parts.append(data["text/markdown"].strip())
            elif "text/html" in data:
                html = data["text/html"]
                parts.append(
                    f"```{{=html}}\n{html.strip()}\n```"
                    if self.fmt == "html"
                    else html_to_markdown(html).strip()
                )
            elif "text/plain" in data:
                parts.append(f"```\n{data['text/plain'].rstrip()}\n```")
        if cell.label.startswith("fig-") and not figure_done:
            raise DataError(f"{cell.notebook}, cell {cell.label!r} is a figure but drew no image")
        if cell.label.startswith("tbl-"):
            parts.append(f": {self._caption(cell, 'tbl')} {{#{cell.label}}}")
        elif self._plain_caption(cell, "tbl"):
            parts.insert(0, self._plain_caption(cell, "tbl"))
        return "\n\n".join(parts)


def number_crossrefs(chapter_texts: list[str]) -> dict[str, str]:
    """ "Figure N" / "Table N" for every embedded fig-/tbl- cell, numbered through the book."""
    numbers: dict[str, str] = {}
    counts = {"fig": 0, "tbl": 0}
    for text in chapter_texts:
        for _, label in embeds(text):
            kind = label.split("-", 1)[0]
            if kind in counts:
                if label in numbers:
                    raise DataError(
                        f"the cross-reference label {label} is embedded twice; labels must be "
                        "unique in the book (use a label without fig-/tbl- to embed a cell again)"
                    )
                counts[kind] += 1
                numbers[label] = f"{'Figure' if kind == 'fig' else 'Table'} {counts[kind]}"
    return numbers


def resolve_crossrefs(text: str, fmt: str, numbers: dict[str, str], pages: dict[str, str]) -> str:
    """Replace ``@fig-x`` by a link (HTML) or a Typst reference; unknown labels are errors."""

    def replace(match: re.Match) -> str:
        label = match.group("label")
        if label not in numbers:
            raise DataError(f"cross-reference @{label} points at no embedded cell labelled {label}")
        if fmt == "typst":
            return f"`@{label}`{{=typst}}"
        return f"[{numbers[label]}]({pages[label]}#{label})"

    return CROSSREF.sub(replace, text)
