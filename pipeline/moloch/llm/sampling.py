"""The sampling settings a request is answered with, when its profile leaves some unset.

v1 called ``model.generate(do_sample=True, temperature=0.7, max_new_tokens=...)``
and nothing more, so every other setting came from the model's own
``generation_config.json`` and, where that is silent, from transformers'
defaults (``top_k`` 50, ``top_p`` 1.0). Qwen3-8B's file sets top_k 20 and top_p
0.95; Llama-3.1-8B-Instruct's sets top_p 0.9 and leaves top_k at 50. A profile
that leaves ``top_p``/``top_k`` unset gets exactly those, from both local
backends (vLLM's own default would leave top_k off), and the values used are
recorded in the manifest.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from .base import ChatRequest

# transformers' generate() defaults for the settings a generation config may leave unset.
GENERATE_DEFAULTS = {"top_k": 50, "top_p": 1.0}
# Settings some generation configs carry that the local samplers do not apply.
UNSUPPORTED = {"repetition_penalty": 1.0, "min_p": None, "typical_p": 1.0}


def model_defaults(source: str | Path, revision: str | None = None) -> dict:
    """The model's sampling defaults: its generation config over transformers' defaults."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(source, revision=revision).to_dict()
    except OSError:  # a checkpoint without generation_config.json: transformers' defaults
        config = {}
    odd = {
        k: config[k] for k, neutral in UNSUPPORTED.items() if config.get(k) not in (None, neutral)
    }
    if odd:
        raise ModelError(
            f"{source}: its generation config sets {odd}, which the local samplers do not apply; "
            f"set top_p and top_k in the profile and serve the model another way"
        )
    return {
        k: config.get(k) if config.get(k) is not None else v for k, v in GENERATE_DEFAULTS.items()
    }


def resolve(request: ChatRequest, defaults: dict) -> tuple[int | None, float]:
    """(top_k, top_p) for one request: its own values, else the model's defaults.

    A top_k of 0 means no cut (transformers' convention); returned as None.
    """
    top_k = request.top_k if request.top_k is not None else defaults["top_k"]
    top_p = request.top_p if request.top_p is not None else defaults["top_p"]
    return (top_k or None), float(top_p)
