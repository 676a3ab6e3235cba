"""Reference reproduction of "Moloch's Bargain" (El & Zou, arXiv 2510.06105).

The package mirrors the study: ``data`` (inputs), ``prompts`` (the authors'
wording), ``llm`` (models behind one interface), ``audience``, ``training``,
``competition``, ``probes``, ``stats``, ``claims`` and ``report``.
"""

__version__ = "0.1.0"
