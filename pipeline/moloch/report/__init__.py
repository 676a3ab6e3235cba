"""The report: a Quarto book (``_quarto.yml``, ``index.qmd``, ``chapters/``) built from a run.

- ``notebooks``: execute the analysis notebooks (``pipeline/analysis/``) with papermill into
  ``data/runs/<profile>/report/`` and stage them in ``_analysis/`` for the chapters' embeds;
- ``analysis``: the functions those notebooks call (tidy tables, statistics, formatting);
- ``render``: the offline renderer (pandoc + Typst) used when Quarto is not installed;
- ``shortcodes``: the Quarto features the offline renderer supports, and ``embed``;
- ``checks``: what a rendered book must satisfy.

    python -m moloch.report --profile smoke        # nox -s report -- --profile smoke
"""
