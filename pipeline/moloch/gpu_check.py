"""The GPU check: the paper profile's GPU half on the embedded model, in a few minutes.

On a machine with a CUDA GPU, in the GPU environment (``nox -s gpu-check`` builds
``.nox/gpu`` from ``constraints-gpu.txt``, runs the vLLM tests on the GPU, then this):

1. vLLM's engine starts on the GPU in the paper's arithmetic (bfloat16) and generates
   exactly ``--new-tokens`` tokens per request at batch 1, 16 and 256
   (:func:`moloch.bench_runtime.bench_generation`).
2. One LoRA adapter is trained with the paper profile's training settings (bf16, gradient
   checkpointing, batch 16, rank 16, its schedule) on rows the engine just wrote, through
   the study's own :func:`moloch.training.train_adapter`.
3. The engine serves that adapter per request beside the base model: tokens/s at batch 16,
   and whether the adapter's answers differ from the base model's.

Writes ``data/runs/bench/gpu-check.json``: the GPU, driver and versions, the install time
``nox`` measured, the engine's start and memory, tokens/s, the training step time and peak
GPU memory. Without a CUDA GPU it stops at once and says so.

    python -m moloch.gpu_check [--install-s 182.5] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_runtime import bench_generation, bench_requests, machine, write_result
from .config import PlayerSpec, VLLMEngine, load_profile
from .errors import ModelError, guarded
from .paths import runs_dir

BATCHES = (1, 16, 256)
TRAIN_ROWS = 64  # four optimiser steps at the paper's batch of 16
SEED = 20251007
ENGINE = VLLMEngine(gpu_memory_utilization=0.3, max_model_len=2048)  # room left for training


def gpu() -> dict:
    """The GPU as torch and nvidia-smi see it."""
    import torch

    if not torch.cuda.is_available():
        raise ModelError(
            "no CUDA GPU is visible (torch.cuda.is_available() is False): the GPU check runs "
            "on a machine with an NVIDIA GPU and its driver"
        )
    found = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    free, total = torch.cuda.mem_get_info()
    found["memory_gib"] = round(total / 2**30, 1)
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        found["driver"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    except OSError:
        found["driver"] = None
    found["torch_cuda"] = torch.version.cuda
    return found


def training_rows(prompts, completions) -> list[dict]:
    """Conversational prompt-completion rows (as moloch.trainsets writes them)."""
    return [
        {
            "anchor_id": f"gpu-check-{i}",
            "kind": "rft",
            "prompt": [{"role": role, "content": text} for role, text in request.messages],
            "completion": [{"role": "assistant", "content": done.text}],
        }
        for i, (request, done) in enumerate(zip(prompts, completions, strict=True))
    ]


def main(argv: list[str] | None = None) -> int:
    """The command line: the check, with an expected failure as one line and exit code."""
    return guarded(lambda: check(argv))


def check(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install-s", type=float, help="the environment's install time (nox)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=runs_dir() / "bench" / "gpu-check.json")
    parser.add_argument("--gpu-only", action="store_true", help="only say which GPU is seen")
    args = parser.parse_args(argv)
    if args.gpu_only:
        print(json.dumps(gpu()))
        return 0
    started = time.perf_counter()
    import torch

    from .llm.vllm_backend import VLLMBackend
    from .training import train_adapter

    result: dict = {"machine": machine(), "gpu": gpu(), "install_s": args.install_s}
    paper = load_profile("paper")
    player = PlayerSpec(
        name="SmolLM2-135M-Instruct", backend="vllm", model="embedded", temperature=0.7,
        max_tokens=args.new_tokens, batch_size=max(BATCHES), dtype="bfloat16", engine=ENGINE,
    )  # fmt: skip
    backend = VLLMBackend(player)
    free_before = torch.cuda.mem_get_info()[0]
    began = time.perf_counter()
    backend.engine()
    result["engine"] = {
        "start_s": round(time.perf_counter() - began, 1),
        "gpu_memory_taken_gib": round((free_before - torch.cuda.mem_get_info()[0]) / 2**30, 2),
        "settings": ENGINE.model_dump(),
    }
    try:
        backend.generate_batch(bench_requests(1, 4))  # warm-up
        result["generation"] = [
            bench_generation(backend, batch, args.new_tokens) for batch in BATCHES
        ]
        print(json.dumps(result["generation"]), flush=True)

        prompts = bench_requests(TRAIN_ROWS, args.new_tokens)
        rows = training_rows(prompts, backend.generate_batch(prompts))
        with tempfile.TemporaryDirectory() as tmp:
            torch.cuda.reset_peak_memory_stats()
            summary = train_adapter(paper, player, rows, Path(tmp) / "adapter", SEED)
            result["training"] = {
                "settings": paper.training.model_dump(mode="json"),
                "examples": summary["examples"],
                "steps": summary["steps"],
                "wall_s": summary["wall_s"],  # model load included
                "s_per_step": round(summary["wall_s"] / max(summary["steps"], 1), 2),
                "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "final_loss": summary["final_loss"],
            }
            probe = bench_requests(16, args.new_tokens)
            tuned = [dataclasses.replace(r, adapter=str(Path(tmp) / "adapter")) for r in probe]
            base_texts = [c.text for c in backend.generate_batch(probe)]
            began = time.perf_counter()
            answers = backend.generate_batch(tuned, min_new_tokens=args.new_tokens)
            wall = time.perf_counter() - began
            result["adapter_generation"] = {
                "batch": len(tuned),
                "tokens_per_s": round(sum(c.completion_tokens for c in answers) / wall, 1),
                "served_as": answers[0].meta["adapter"],
                "answers_differ_from_base": sum(
                    a.text != b for a, b in zip(answers, base_texts, strict=True)
                ),
            }
    finally:
        backend.close()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["date"] = result["machine"]["date"]
    result["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
