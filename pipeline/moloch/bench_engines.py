"""The embedded model three ways, on the same requests and machine, one after another:
the transformers backend (the smoke profile's), vLLM's engine in this process (the paper
profile's players) and ``vllm serve`` through the openai backend (the rehearsal's audience
and judge, as the paper's API roles are reached). Each generates exactly ``--new-tokens``
tokens per request at each batch size, after one warm-up call; prefill is timed apart
(:func:`moloch.bench_runtime.bench_generation`). The two engines that can force an answer
format (the transformers backend, and ``vllm serve`` through structured outputs) also
answer one compete unit of the smoke profile (240 ballots,
:func:`moloch.bench_runtime.compete_ballots`), at the rehearsal audience's token budget
(``served_ballots``: a server's forced tags need more tokens than the smoke audience has).
The figures go into ``data/runs/bench/runtime.json`` under ``engines`` (with the machine:
cores, CPU flags, versions, and each engine's start time), beside what
``moloch.bench_runtime`` wrote there.

Needs vLLM: ``nox -s bench`` runs it in the paper path's environment (.nox/vllm).

    python -m moloch.bench_engines                  # batch 1, 8, 16; 64 tokens each
    python -m moloch.bench_engines --batches 1,16 --new-tokens 32 --no-compete
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time
from pathlib import Path

from .bench_runtime import (
    bench_generation,
    bench_requests,
    compete_ballots,
    machine,
    time_unit,
    write_result,
)
from .config import ModelSpec, load_profile
from .paths import runs_dir

ENGINE = load_profile("rehearsal").players[0].engine  # as the rehearsal's players


def _spec(backend: str, new_tokens: int, batch: int, **extra) -> ModelSpec:
    return ModelSpec(
        backend=backend, model="embedded", temperature=0.7, max_tokens=new_tokens,
        batch_size=batch, max_concurrency=batch, dtype="float32", **extra,
    )  # fmt: skip


def _measure(name: str, backend, start, batches: list[int], new_tokens: int) -> dict:
    """Start ``backend`` (timed), warm it up, then one row per batch size."""
    began = time.perf_counter()
    start()
    backend.generate_batch(bench_requests(1, 4))  # warm-up: compiled kernels, first call
    rows = []
    for batch in batches:
        row = {"engine": name, **bench_generation(backend, batch, new_tokens)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"engine": name, "start_s": round(time.perf_counter() - began, 1), "rows": rows}


def served_ballots() -> list:
    """The compete unit's ballots (:func:`moloch.bench_runtime.compete_ballots`) with the
    token budget the rehearsal's audience has: a server forces the answer tags through a
    regex that may spend a token per character (``answer_regex``), which the smoke
    audience's 24 tokens cannot hold. Both engines answer these same requests."""
    budget = load_profile("rehearsal").audience.max_tokens
    return [
        dataclasses.replace(b, max_tokens=max(b.max_tokens or 0, budget)) for b in compete_ballots()
    ]


def _compete_unit(backend, ballots) -> dict:
    """The compete unit's ballots in one call, as a compete stage sends them."""
    _, timing = time_unit(backend, ballots)
    row = {"ballots": len(ballots), **timing}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,16", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=runs_dir() / "bench" / "runtime.json")
    parser.add_argument("--no-compete", action="store_true", help="skip the compete units")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    n, top = args.new_tokens, max(batches)
    voters = load_profile("smoke").audience  # the compete unit's audience, batch and all
    ballots = None if args.no_compete else served_ballots()

    from .llm.embedded import embedded_checkpoint
    from .llm.hf import TransformersBackend
    from .llm.openai_backend import OpenAIBackend
    from .llm.serve import VLLMServer
    from .llm.vllm_backend import VLLMBackend

    result: dict = {
        "machine": machine(),
        "loadavg_start": os.getloadavg(),
        "new_tokens_each": n,
        "vllm_env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
        "runs": [],
    }
    local = TransformersBackend(_spec("transformers", n, top))
    result["runs"].append(_measure("transformers", local, lambda: None, batches, n))
    if ballots:  # at the profile's batch, not the generation rows'
        audience = TransformersBackend(voters.model_copy(update={"dtype": "float32"}))
        result["runs"][-1]["compete_unit"] = _compete_unit(audience, ballots)
        del audience
    del local
    gc.collect()

    engine = VLLMBackend(_spec("vllm", n, top, engine=ENGINE))
    try:
        result["runs"].append(_measure("vllm engine", engine, engine.engine, batches, n))
    finally:
        engine.close()
    del engine
    gc.collect()

    log = args.out.with_name("engines-vllm-serve.log")
    began = time.perf_counter()
    with VLLMServer(embedded_checkpoint(), served_name="embedded", log=log) as url:
        # Requests in flight: the generation rows' batch, and the audience's for the ballots.
        spec = _spec("openai", n, max(top, voters.batch_size))
        served = OpenAIBackend(spec, env={"OPENAI_BASE_URL": url})
        name = "vllm serve (openai backend)"
        row = _measure(name, served, lambda: None, batches, n)
        row["start_s"] = round(time.perf_counter() - began, 1)  # the server's start
        if ballots:
            row["compete_unit"] = _compete_unit(served, ballots)
        result["runs"].append(row)
    return write_result(args.out, result, section="engines")


if __name__ == "__main__":
    main()
