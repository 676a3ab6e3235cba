"""What model calls cost in dollars: the one table of prices (estimates and manifests)."""

from __future__ import annotations

import math
import os
from urllib.parse import urlsplit

from .config import ModelSpec
from .llm.base import LOOPBACK, OPENAI_URL
from .llm.embedded import EMBEDDED

# USD per 1M tokens (input, output), standard tier, from the OpenAI API pricing
# page (https://openai.com/api/pricing/) as listed in 2025 (checked 2025-10).
PRICES_PER_MILLION: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
}
PRICES_AS_OF = "2025-10"
BATCH_DISCOUNT = 0.5  # the Batch API's price, as a share of the standard one (same page)
LOCAL_BACKENDS = ("transformers", "vllm", "fake")


def served_here(spec: ModelSpec) -> bool:
    """Whether ``spec``'s model runs on this machine: a local backend, the embedded model, or
    an OpenAI-compatible server on loopback (its address from the role's variable)."""
    if spec.backend in LOCAL_BACKENDS or spec.model == EMBEDDED:
        return True
    return urlsplit(os.environ.get(spec.base_url_env) or OPENAI_URL).hostname in LOOPBACK


def cost(spec: ModelSpec, tokens_in: float, tokens_out: float, batch: bool | None = None) -> float:
    """Dollar cost of the tokens on ``spec``'s model; NaN for a paid model of unknown price.
    ``batch``: at the Batch API's price (None: where the role's backend is openai-batch)."""
    if served_here(spec):  # free
        return 0.0
    price = PRICES_PER_MILLION.get(spec.model)
    if price is None:
        return math.nan
    batch = spec.backend == "openai-batch" if batch is None else batch
    share = BATCH_DISCOUNT if batch else 1.0
    return share * (tokens_in * price[0] + tokens_out * price[1]) / 1e6
