"""The report renderer: book structure, supported features, embeds, rendering, checks.

A tiny book is built in tmp_path around a notebook executed here with nbclient,
then rendered offline (pandoc + Typst) and checked.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moloch.cells import write_cells
from moloch.claims import write_claims
from moloch.errors import DataError, ProfileError, StageError
from moloch.paths import ROOT
from moloch.report import notebooks
from moloch.report.book import load_book
from moloch.report.checks import bad_text, check_book, check_page, pdf_text, table_first_column
from moloch.report.render import render_book
from moloch.report.shortcodes import embeds, find_cell, find_unsupported
from moloch.runs import find_run

CELLS = {
    "summary": (
        "from IPython.display import Markdown, display\n"
        "rate = 0.625\n"
        "display(Markdown(f'The trained player won **{rate:.1%}** of duels.'))"
    ),
    "tbl-claims": (
        "#| tbl-cap: Claims and verdicts\n"
        "display(Markdown('| claim | verdict |\\n|---|---|\\n"
        "| abstract_v1.sales.performance | reproduced |\\n| abstract_v1.sm.harm | not |'))"
    ),
    "fig-rates": (
        "#| fig-cap: Win rates by pair\n"
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(figsize=(3, 2))\nax.bar(['a', 'b'], [0.4, 0.6])\n"
        "display(fig)\nplt.close(fig)"
    ),
    "frame": "import pandas as pd\npd.DataFrame({'pair': ['base-rft'], 'win': [0.55]})",
}
QUARTO = """project:
  type: book
  output-dir: _book
book:
  title: "Tiny book"
  output-file: tiny
  chapters:
    - index.qmd
    - chapters/one.qmd
  appendices:
    - chapters/extra.qmd
"""
INDEX = """---
title: Summary
---

{{< embed _analysis/nb.ipynb#summary >}}

The claims are in @tbl-claims.

{{< embed _analysis/nb.ipynb#tbl-claims >}}
"""
ONE = """---
title: One task
---

## Win rates

As @fig-rates shows, the second method wins.

{{< embed ../_analysis/nb.ipynb#fig-rates >}}

::: {.callout-note}
A note.
:::

{{< embed ../_analysis/nb.ipynb#frame >}}
"""
EXTRA = "# Provenance\n\nText only.\n"


def _cell(label: str, body: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(f"#| label: {label}\n{body}")


@pytest.fixture(scope="module")
def executed_notebook(tmp_path_factory) -> Path:
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [_cell(label, body) for label, body in CELLS.items()]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    path = tmp_path_factory.mktemp("nb") / "nb.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture
def book_root(tmp_path, executed_notebook) -> Path:
    (tmp_path / "_quarto.yml").write_text(QUARTO)
    (tmp_path / "index.qmd").write_text(INDEX)
    (tmp_path / "chapters").mkdir()
    (tmp_path / "chapters" / "one.qmd").write_text(ONE)
    (tmp_path / "chapters" / "extra.qmd").write_text(EXTRA)
    (tmp_path / "_analysis").mkdir()
    shutil.copy(executed_notebook, tmp_path / "_analysis" / "nb.ipynb")
    return tmp_path


def test_load_book_reads_chapters_numbers_and_titles(book_root):
    book = load_book(book_root)
    assert [c.name for c in book.chapters] == ["index", "one", "extra"]
    assert [c.number for c in book.chapters] == ["", "1", "A"]
    assert [c.title for c in book.chapters] == ["Summary", "One task", "Provenance"]
    assert "# Provenance" not in book.chapters[2].body
    assert book.pdf == book_root / "_book" / "tiny.pdf"


def test_load_book_names_a_missing_chapter(book_root):
    (book_root / "chapters" / "one.qmd").unlink()
    with pytest.raises(DataError, match="chapters/one.qmd"):
        load_book(book_root)


def test_offline_render_gives_pages_figures_and_pdf(book_root):
    result = render_book(book_root)
    out = book_root / "_book"
    index, one = (out / "index.html").read_text(), (out / "one.html").read_text()
    assert "62.5%" in index  # the notebook's computed number, inlined from text/markdown
    assert 'href="one.html"' in index and 'href="extra.html"' in one  # sidebar and pager
    assert '<a href="index.html#tbl-claims">Table 1</a>' in index
    assert 'href="one.html#fig-rates">Figure 1</a>' in one
    assert "Figure 1: Win rates by pair" in one
    assert 'class="callout-note"' in one
    assert "base-rft" in one  # a DataFrame's HTML output
    assert [p.name for p in result.figures] == ["nb-fig-rates-0.png"]
    assert (book_root / "figures" / "nb-fig-rates-0.png").is_file()  # the project's figures/
    assert all(check_page(page) == [] for page in result.pages)
    text = pdf_text(result.pdf)
    assert "abstract_v1.sales.performance" in re.sub(r"\s+", "", text)
    assert "Figure\xa01" in text and "Appendix A" in text  # Typst joins "Figure 1" with a nbsp
    assert "{=html}" not in text
    check_book(out, result.pdf, ["abstract_v1.sales.performance", "abstract_v1.sm.harm"])


def test_single_chapter_render_leaves_other_pages_alone(book_root):
    render_book(book_root)
    index = book_root / "_book" / "index.html"
    before = index.stat().st_mtime_ns
    result = render_book(book_root, chapter="one", pdf=False)
    assert [p.name for p in result.pages] == ["one.html"] and result.pdf is None
    assert index.stat().st_mtime_ns == before


def test_check_book_reports_nan_missing_image_and_missing_pdf_text(book_root):
    result = render_book(book_root)
    page = book_root / "_book" / "one.html"
    page.write_text(page.read_text().replace("second method", "nan method"))
    (book_root / "_book" / "figures" / "nb-fig-rates-0.png").unlink()
    with pytest.raises(DataError) as err:
        check_book(book_root / "_book", result.pdf, ["a claim the table lacks"])
    message = str(err.value)
    assert "nan method" in message
    assert "nb-fig-rates-0.png does not exist" in message
    assert "lacks 'a claim the table lacks'" in message


def test_pdf_check_skips_what_the_pages_quote_and_nothing_else(tmp_path, monkeypatch):
    """A model's reply may say "@fig-x" or "{{< y >}}": quoted in the HTML, literal in the PDF."""
    from moloch.report import checks

    page = tmp_path / "one.html"
    quote = "<blockquote><p>I cite @fig-x and {{< embed y >}}.</p></blockquote>"
    page.write_text("<p>Votes</p>" + quote)
    pdf = tmp_path / "book.pdf"
    pdf.write_bytes(b"%PDF")
    shown = "Votes\nI cite @fig-x and\n{{< embed y >}}.\n"
    monkeypatch.setattr(checks, "pdf_text", lambda _: shown)
    check_book(tmp_path, pdf)  # quoted: no problem
    monkeypatch.setattr(checks, "pdf_text", lambda _: shown + "See @fig-x for the rates.")
    with pytest.raises(DataError, match="shows .*See @fig-x"):
        check_book(tmp_path, pdf)  # the same reference outside the quote is unresolved


def test_missing_cell_and_failed_cell_are_named(book_root, executed_notebook):
    with pytest.raises(DataError, match="no cell labelled 'fig-nope'"):
        find_cell(executed_notebook, "fig-nope")
    nb = nbformat.read(executed_notebook, as_version=4)
    nb.cells[0].outputs = [
        nbformat.v4.new_output("error", ename="KeyError", evalue="'task'", traceback=[])
    ]
    broken = book_root / "_analysis" / "nb.ipynb"
    nbformat.write(nb, broken)
    with pytest.raises(DataError, match="cell 'summary' failed when executed"):
        render_book(book_root)


def test_render_refuses_unsupported_features(book_root):
    chapter = book_root / "chapters" / "one.qmd"
    chapter.write_text(ONE + "\n{{< include other.qmd >}}\n")
    with pytest.raises(DataError, match="shortcode: \\{\\{< include"):
        render_book(book_root)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("{{< include x.qmd >}}", "shortcode"),
        ("{{< embed a.ipynb#x echo=true >}}", "shortcode"),
        ("```{python}\n1\n```", "executable code cell"),
        ("Value `{python} x`.", "inline code expression"),
        ("See @sec-intro.", "citation or cross-reference"),
        ("As [@smith2020] says.", "citation or cross-reference"),
        ("::: {.column-margin}\nx\n:::", "fenced div"),
        ("::: {layout-ncol=2}\nx\n:::", "fenced div"),
    ],
)
def test_find_unsupported_flags(text, what):
    assert any(p.startswith(what) for p in find_unsupported(text))


def test_find_unsupported_accepts_the_supported_set():
    text = (
        "## Head\n\n{{< embed ../_analysis/sales.ipynb#fig-win-rates >}}\n\n"
        "See @fig-win-rates and @tbl-x; mail a@b.org.\n\n::: {.callout-warning}\nw\n:::\n\n"
        "```python\nprint(1)\n```\n"
    )
    assert find_unsupported(text, {"title": "T"}) == []
    assert find_unsupported("x", {"title": "T", "format": "pdf"}) == ["front matter key 'format'"]


@given(st.text(alphabet=st.characters(blacklist_characters="{}@`:~"), max_size=200))
def test_plain_prose_is_always_supported(text):
    assert find_unsupported(text) == []


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9_.]{0,15}", fullmatch=True),
            st.from_regex(r"[a-z0-9 .%]{1,10}", fullmatch=True),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_table_first_column_returns_every_data_row(rows):
    table = "| claim | value |\n|:--|--:|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
    assert table_first_column("Intro text.\n\n" + table) == [a for a, _ in rows]


def test_markdown_table_sizes_columns_by_visible_text_and_says_n_a():
    from moloch.report.analysis import coloured, markdown_table

    df = pd.DataFrame(
        {"claim": ["abstract_v1.sales.performance"], "verdict": [coloured("ok", "green")],
         "value": [float("nan")]}
    )  # fmt: skip
    header, rule, row = markdown_table(df).splitlines()
    assert [len(d) for d in rule.strip("|").split("|")] == [33, 11, 9]  # ":" + dashes + padding
    long = pd.DataFrame({"reason": ["word " * 20], "id": ["x"]})
    assert markdown_table(long).splitlines()[1] == "|:" + "-" * 33 + "|:------|"
    assert row.endswith("| n/a |")
    # coloured (bold) text gets room for its wider letters: 14 letters as 18, + 3
    bold = pd.DataFrame({"verdict": [coloured("not comparable", "grey")]})
    assert markdown_table(bold).splitlines()[1] == "|:" + "-" * 21 + "|"


def test_claims_table_says_the_run_wide_reason_once():
    from moloch.config import load_profile
    from moloch.report.analysis import claims_table

    smoke = load_profile("smoke")
    verdicts = pd.DataFrame(
        {"claim_id": ["a.b", "c.d"], "published": [6.3, 0.54], "unit": ["percent", "fraction"],
         "value": [6.25, float("nan")], "ci_low": [-6.25, float("nan")],
         "ci_high": [17.5, float("nan")], "status": ["not comparable"] * 2,
         "rule": ["equivalence_any_candidate", "equivalence"],
         "reason": ["profile 'smoke' is marked comparable: false; 5 voters, claim's 20",
                    "profile 'smoke' is marked comparable: false"]}
    )  # fmt: skip
    table = claims_table(verdicts, smoke)
    assert list(table["reason"]) == ["5 voters, claim's 20", "-"]
    assert list(table["this run"]) == ["6.25 [-6.25, 17.5]", "n/a"]
    assert list(table["published"]) == ["6.3 percent", "0.54 fraction"]


def test_a_long_table_breaks_across_pdf_pages(book_root):
    rows = "".join(f"| claim_{i:03d} | {'a long reason ' * 6} |\n" for i in range(120))
    table = "| claim | reason |\n|---|---|\n" + rows + "\n: Many claims {#tbl-many}\n"
    (book_root / "chapters" / "one.qmd").write_text(f"---\ntitle: One\n---\n\n{table}")
    result = render_book(book_root)
    from pypdf import PdfReader

    pages = [page.extract_text() for page in PdfReader(result.pdf).pages]
    holding = [[f"claim_{i:03d}" in page for page in pages].index(True) for i in range(120)]
    assert holding == sorted(holding) and holding[-1] - holding[0] >= 2  # spread, in order


def test_bad_text_finds_missing_values_but_not_words_that_contain_them():
    assert bad_text("rate nan %") and bad_text("a None b") and bad_text("?@fig-x")
    assert bad_text("see {{< embed x >}}")
    assert bad_text("financial nonetheless Nonesuch banana") == []


# --- the repository's own book --------------------------------------------------------------


def test_repository_chapters_use_only_supported_features():
    book = load_book(ROOT)
    for chapter in book.chapters:
        assert find_unsupported(chapter.body, chapter.meta) == [], chapter.source


def test_every_chapter_has_a_notebook_and_embeds_only_from_it():
    book = load_book(ROOT)
    assert [c.name for c in book.chapters] == list(notebooks.CHAPTER_NOTEBOOKS)
    for chapter in book.chapters:
        for path, _ in embeds(chapter.body):
            assert Path(path).name == f"{chapter.name}.ipynb", (chapter.name, path)
            resolved = (chapter.source.parent / path).resolve()
            assert resolved.parent == notebooks.STAGED_DIR.resolve()


def _labels(notebook: Path) -> set[str]:
    nb = json.loads(notebook.read_text())
    sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    return {m for s in sources for m in re.findall(r"^#\| label: *([\w-]+)", s, re.M)}


def test_every_embedded_label_exists_in_the_analysis_notebook():
    book = load_book(ROOT)
    absent = []
    for chapter in book.chapters:
        name, _ = notebooks.CHAPTER_NOTEBOOKS[chapter.name]
        source = notebooks.ANALYSIS_DIR / f"{name}.ipynb"
        if not source.is_file():
            absent.append(source.name)
            continue
        missing = {label for _, label in embeds(chapter.body)} - _labels(source)
        assert not missing, (chapter.name, missing)
    if absent:  # released.ipynb is delivered separately, with moloch.released
        pytest.skip(f"analysis notebook(s) not written yet: {absent}")


def test_analysis_notebooks_are_parametrised():
    for name in {n for n, _ in notebooks.CHAPTER_NOTEBOOKS.values()}:
        source = notebooks.ANALYSIS_DIR / f"{name}.ipynb"
        if not source.is_file():
            continue  # the previous test names it
        nb = json.loads(source.read_text())
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, name
        if name != "released":  # the released chapter reads published values, not a run
            assert "profile" in "".join(tagged[0]["source"]), name


def test_stage_names_the_missing_executed_notebooks(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLOCH_RUNS", str(tmp_path))
    with pytest.raises(StageError, match="no executed notebook for chapter"):
        notebooks.stage(find_run("smoke"), staged=tmp_path / "_analysis")
    with pytest.raises(StageError, match="no run at"):
        notebooks.execute_chapter(find_run("smoke"), "index")
    with pytest.raises(ProfileError, match="unknown profile 'nowhere'"):
        find_run("nowhere")
    with pytest.raises(ProfileError, match="records no profile"):
        find_run(run_dir=tmp_path / "elsewhere")


def test_a_code_change_makes_executed_notebooks_stale(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("MOLOCH_RUNS", str(tmp_path / "runs"))
    code = tmp_path / "code"
    code.mkdir()
    (code / "stats.py").write_text("")
    os.utime(code / "stats.py", (1, 1))
    monkeypatch.setattr(notebooks, "PACKAGE_DIR", code)
    run = find_run("smoke")
    out = notebooks.executed_path(run, "sales")
    out.parent.mkdir(parents=True)
    out.write_text("{}")
    assert not notebooks.is_stale(run, "sales")
    later = time.time() + 60
    os.utime(code / "stats.py", (later, later))
    assert notebooks.is_stale(run, "sales")


def _write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a finished unit has a manifest that lists its outputs
    from moloch.manifests import output_files

    (path.parent / "manifest.json").write_text(json.dumps({"outputs": output_files(path.parent)}))


def _synthetic_run(run: Path, model: str = "SmolLM2-135M-Instruct", anchors: int = 6) -> None:
    """A finished run of one task (sales) in the stages' tidy tables, drawn from a seeded RNG."""
    import random

    from moloch.tasks import PAIRS, PROBE_METRIC

    rng = random.Random(7)
    task, ids = "sales", [f"sales/test/{i:04d}" for i in range(anchors)]
    votes = [
        dict(task=task, model=model, pair=f"{a}-{b}", first=a, second=b, anchor_id=i, voter=v,
             voter_name=f"Voter {v}", swapped=False, letter="A", choice=c, valid=c is not None,
             invalid_reason=None if c else "no vote tag", thought=f"{c} is better" if c else None)
        for a, b in PAIRS for i in ids for v in range(3)
        for c in [rng.choice(["first", "second", "second", None])]
    ]  # fmt: skip
    labels = [
        dict(task=task, model=model, method=m, probe_id="sales_q1", metric=PROBE_METRIC["sales_q1"],
             anchor_id=i, label=int(rng.random() < 0.5), valid=True, invalid_reason=None,
             thought="It overstates the battery life.")
        for m in ("base", "rft", "tfb") for i in ids
    ]  # fmt: skip
    _write_lines(run / "compete" / task / model / "votes.jsonl", votes)
    _write_lines(run / "probe" / task / model / "labels.jsonl", labels)
    for m in ("base", "rft", "tfb"):
        gens = [
            dict(task=task, model=model, method=m, anchor_id=i, sample_index=s, valid=True,
                 shown=f"Buy the {m} gadget {i}.", message=f"Buy the {m} gadget {i}.")
            for i in ids for s in (0, 1)
        ]  # fmt: skip
        _write_lines(run / "generate" / task / model / m / "generations.jsonl", gens)


def _book_root(folder: Path) -> Path:
    """A copy of the repository's book (configuration and chapters) to render into."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("_quarto.yml", "index.qmd", "chapters"):
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, folder / part)
    return folder


@pytest.mark.integration
def test_task_notebook_executes_on_a_run_and_its_chapter_renders(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLOCH_RUNS", str(tmp_path / "runs"))
    _synthetic_run(tmp_path / "runs" / "smoke")
    run = find_run("smoke")
    write_cells(run)
    executed = notebooks.execute_chapter(run, "sales")
    root = tmp_path / "book"
    (root / "chapters").mkdir(parents=True)
    (root / "_analysis").mkdir()
    shutil.copy(ROOT / "chapters" / "sales.qmd", root / "chapters" / "sales.qmd")
    (root / "index.qmd").write_text("---\ntitle: Summary\n---\n\nA summary.\n")
    (root / "_quarto.yml").write_text(
        "project: {type: book, output-dir: _book}\n"
        "book: {title: T, output-file: t, chapters: [index.qmd, chapters/sales.qmd]}\n"
    )
    shutil.copy(executed, root / "_analysis" / "sales.ipynb")
    result = render_book(root)
    page = (root / "_book" / "sales.html").read_text()
    assert "duels" in page and "sales_q1" in page
    assert len(result.figures) == 2  # win rates and probe rates
    check_book(root / "_book", result.pdf, ["base-rft", "base-tfb", "rft-tfb"])


@pytest.mark.integration
def test_the_chapters_and_the_verdicts_read_the_same_cells_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLOCH_RUNS", str(tmp_path / "runs"))
    _synthetic_run(tmp_path / "runs" / "smoke")
    run = find_run("smoke")
    write_cells(run)
    cells = pd.read_csv(run.cells_path)
    pick = (cells.kind == "win_rate") & (cells.pair == "base-tfb")
    assert set(cells[pick].statistic) == {"win_rate_second", "win_rate_second_v1"}  # one each
    cells.loc[pick, ["estimate", "ci_low", "ci_high"]] = [0.987654, 0.9, 0.99]
    cells.to_csv(run.cells_path, index=False)  # as if the cells step had computed this

    claims_table = pd.read_csv(write_claims(run)).set_index("claim_id")
    executed = notebooks.execute_chapter(run, "sales")
    assert "48.765" in claims_table.loc["abstract_v1.sales.performance", "candidates"]
    table = find_cell(executed, "win-rates-table").outputs[0]["data"]["text/markdown"]
    assert "98.8% [90.0%, 99.0%]" in table


def _fake_run(tmp_path: Path, name: str, monkeypatch) -> Path:
    from fakes import fake_train_adapter, run, write_profile

    monkeypatch.setattr("moloch.training.train_adapter", fake_train_adapter)
    folder = tmp_path / f"run-{name}"
    run(write_profile(tmp_path, tasks=("sales", "elections", "social_media"), name=name), folder)
    return folder


@pytest.mark.integration
def test_a_run_made_in_its_own_folder_is_reported_from_that_folder_alone(
    tmp_path, mirror_env, monkeypatch
):
    """moloch run --run-dir X, then the report of X with no profile named; two books coexist."""
    from moloch.report.__main__ import main

    root = _book_root(tmp_path / "book")
    for name in ("alpha", "beta"):
        folder = _fake_run(tmp_path, name, monkeypatch)
        assert main(["--run-dir", str(folder), "--root", str(root)]) == 0
    for name in ("alpha", "beta"):
        book = root / "_book" / name
        assert f"profile <strong>{name}</strong>" in (book / "index.html").read_text()
        assert (book / "moloch-bargain-reproduction.pdf").stat().st_size > 0
        assert any((root / "figures" / name).glob("*.png"))
        claims_table = pd.read_csv(tmp_path / f"run-{name}" / "claims.csv")
        assert len(claims_table) == 145


@pytest.mark.integration
def test_report_of_a_real_tiny_run_renders_and_passes_its_checks(
    tmp_path, mirror_env, monkeypatch, tiny_profile
):
    """All three tasks with the embedded model everywhere, then the whole book from that run."""
    pytest.importorskip("moloch.llm.hf")
    from moloch.report.__main__ import build
    from moloch.runner import run_pipeline

    monkeypatch.setenv("MOLOCH_RUNS", str(tmp_path / "runs"))
    profile = str(tiny_profile(tasks=("sales", "elections", "social_media")))
    run_pipeline(profile, notebooks=False, log=lambda _: None)
    root = _book_root(tmp_path / "book")

    out = build(find_run(profile), root=root)  # raises if any check of moloch.report.checks fails

    assert out["renderer"] == "offline" or shutil.which("quarto")
    assert out["executed"] == list(notebooks.CHAPTER_NOTEBOOKS)
    claims = pd.read_csv(tmp_path / "runs" / "tiny" / "claims.csv")
    published = pd.read_csv(ROOT / "data" / "reference" / "published-values.csv")
    assert set(claims.claim_id) == set(published.claim_id)
    assert claims.status.notna().all() and claims.reason.notna().all()
    summary = out["html"].read_text()
    assert all(claim_id in summary for claim_id in published.claim_id)
    assert out["pdf"].stat().st_size > 0 and out["html"].parent == root / "_book" / "tiny"
    for page in (root / "_book" / "tiny").glob("*.html"):
        for src in re.findall(r'<img src="([^"]+)"', page.read_text()):
            assert (page.parent / src).is_file(), (page.name, src)
