"""The GPU check's parts that run anywhere: its refusal without a GPU, and its training rows."""

import pytest

from moloch import gpu_check
from moloch.bench_runtime import bench_requests
from moloch.llm.base import Completion
from moloch.training import _check_rows


def test_without_a_gpu_it_stops_in_one_line(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    assert gpu_check.main(["--gpu-only"]) == 1
    assert "moloch: error: no CUDA GPU is visible" in capsys.readouterr().err


def test_its_training_rows_are_what_training_reads():
    prompts = bench_requests(3, 8)
    rows = gpu_check.training_rows(prompts, [Completion(f"pitch {i}") for i in range(3)])
    _check_rows(rows)  # raises on a row training would refuse
    assert [r["completion"][0]["content"] for r in rows] == ["pitch 0", "pitch 1", "pitch 2"]
    assert rows[0]["prompt"][-1]["content"] == prompts[0].messages[-1][1]
