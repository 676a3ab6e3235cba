"""The openai backend's pool against the waves it replaced, on the same calls.

Usage: python -m moloch.bench_pool [--calls 640] [--concurrency 32] [--latency 0.2]

A local FaultServer (127.0.0.1, no faults) answers each call after an exponential
delay of mean ``--latency`` seconds, drawn from the request, so both ways meet the same
delays. ``waves``: the client cuts the calls into batches of ``max_concurrency`` and waits
for the slowest call of each (how the backend ran before the pool); ``pool``: every call at
once, ``max_concurrency`` in flight until the last. Both go through the real client and a
fresh call cache. Figures in data/runs/bench/pool.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from .bench_runtime import machine, write_result
from .config import ModelSpec
from .faults import FaultServer
from .llm import LLM, CallCache, ChatRequest
from .llm.openai_backend import OpenAIBackend
from .paths import runs_dir


class Waves:
    """The openai backend as the client drove it before the pool: one wave per batch."""

    pool = False

    def __init__(self, backend: OpenAIBackend):
        self.backend, self.name = backend, backend.name

    def identity(self) -> dict:
        return self.backend.identity()

    def generate(self, requests):
        return self.backend.generate(requests)


def ballots(n: int) -> list[ChatRequest]:
    system = "Reply with your thoughts, then give your final vote inside <vote></vote>."
    return [ChatRequest.chat(system, f"ballot {i}", temperature=0.1, max_tokens=16)
            for i in range(n)]  # fmt: skip


def timed_run(way: str, calls: int, concurrency: int, latency: float) -> dict:
    spec = ModelSpec(backend="openai", model="bench-voter", temperature=0.1, max_tokens=16,
                     max_concurrency=concurrency)  # fmt: skip
    with (
        FaultServer(latency_s=latency, exponential=True) as server,
        tempfile.TemporaryDirectory() as folder,
    ):
        backend = OpenAIBackend(spec, env={"OPENAI_BASE_URL": server.url})
        driven = Waves(backend) if way == "waves" else backend
        llm = LLM(driven, CallCache(Path(folder) / "calls.sqlite"), mode="live",
                  role=way, batch_size=concurrency)  # fmt: skip
        started = time.perf_counter()
        answers = llm.complete(ballots(calls))
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "answers": len(answers),
            "backend_calls": llm.stats()["backend_calls"]}  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2, help="mean seconds per call")
    parser.add_argument("--out", type=Path, default=runs_dir() / "bench" / "pool.json")
    args = parser.parse_args(argv)
    result = {"machine": machine(), "calls": args.calls, "max_concurrency": args.concurrency,
              "latency_mean_s": args.latency, "latency": "exponential"}  # fmt: skip
    for way in ("waves", "pool"):
        result[way] = timed_run(way, args.calls, args.concurrency, args.latency)
        print(way, result[way])
    # The floor: all calls' delays spread evenly over the slots.
    result["ideal_s"] = round(args.calls * args.latency / args.concurrency, 3)
    result["speedup"] = round(result["waves"]["seconds"] / result["pool"]["seconds"], 2)
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
