"""The runtime benchmark's parts on tiny inputs (the full run is ``nox -s bench``)."""

import json
import time

import pytest

from moloch.bench_runtime import (
    bench_compete,
    bench_generation,
    compare_answers,
    limits,
    write_result,
)
from moloch.config import load_profile
from moloch.errors import ModelError
from moloch.llm.base import Completion


def test_compare_answers_counts_answers_that_differ_and_their_tokens():
    row = compare_answers([(1, 2), (3, 4, 5)], [(1, 2), (3, 9, 5)])
    assert row == {
        "requests": 2,
        "answers_differing": 1,
        "tokens_compared": 5,
        "first_token_flips_per_1000_tokens": 200.0,
    }


class _Paced:
    """A backend whose decoding runs take the given seconds in turn (prefill: none)."""

    dtype = "float32"

    def __init__(self, seconds):
        self.seconds = list(seconds)

    def generate_batch(self, requests, min_new_tokens=None):
        if min_new_tokens:  # a timed decoding run, not the 1-token prefill
            time.sleep(self.seconds.pop(0))
        n = requests[0].max_tokens
        return [Completion(text="x", prompt_tokens=10, completion_tokens=n) for _ in requests]


def test_a_generation_figure_is_the_median_of_its_runs_with_every_run_beside_it():
    row = bench_generation(_Paced([0.05, 0.4, 0.1]), batch=2, new_tokens=5, repeats=3)
    runs = row["decode_tokens_per_s_runs"]
    assert len(runs) == 3 and runs[1] < runs[2] < runs[0]  # slowest second, fastest first
    assert row["decode_tokens_per_s"] == runs[2] and row["repeats"] == 3
    assert row["completion_tokens"] == 10 and row["all_generated"]


def test_limits_take_the_slower_of_reading_the_weights_and_the_arithmetic():
    row = limits(params=1_000_000, weight_bytes=4_000_000)
    assert row["memory_read_gb_per_s"] > 0 and row["matmul_gflop_per_s"] > 0
    decode = row["decode_tokens_per_s"]
    # figures are rounded to 0.1: where a step reads weights at every batch, 16 x is exact
    assert decode["1"] <= decode["8"] <= decode["16"] <= 16 * (decode["1"] + 0.05)
    assert decode["16"] <= row["prefill_tokens_per_s"]
    # a prompt token skips the output layer: fewer weights to pass, a higher prefill limit
    fewer = limits(params=1_000_000, weight_bytes=4_000_000, prompt_params=500_000)
    assert fewer["prefill_tokens_per_s"] > 1.5 * row["prefill_tokens_per_s"]


def test_the_engines_section_and_the_runtime_figures_keep_each_other(tmp_path, capsys):
    out = tmp_path / "runtime.json"
    write_result(out, {"generation": [1]})
    write_result(out, {"runs": [2]}, section="engines")  # moloch.bench_engines, .nox/vllm
    both = json.loads(out.read_text())
    assert both["generation"] == [1] and both["engines"]["runs"] == [2]
    write_result(out, {"generation": [3]})  # bench_runtime again: the engines stay
    again = json.loads(out.read_text())
    assert again["generation"] == [3] and again["engines"]["runs"] == [2]
    write_result(out, {"compete_unit": 4})  # a figure this run did not make is not kept
    assert "generation" not in json.loads(out.read_text())


@pytest.mark.parametrize("earlier", [b"\xff\xfe", b"[1, 2]", b"{not json"])
def test_a_runtime_file_that_is_not_a_json_object_is_written_anew(tmp_path, capsys, earlier):
    out = tmp_path / "runtime.json"
    out.write_bytes(earlier)
    write_result(out, {"runs": [1]}, section="engines")
    assert json.loads(out.read_text())["engines"]["runs"] == [1]
    assert "written anew" in capsys.readouterr().out


@pytest.mark.integration
def test_a_compete_unit_runs_as_before_and_as_now_with_the_same_answers():
    spec = load_profile("smoke").audience
    row = bench_compete(spec, n_duels=1)
    assert row["ballots"] == spec.voters  # one duel before every voter
    for name in ("plain_generate", "backend_16", "backend"):
        run = row[name]
        assert run["completion_tokens"] > 0 and run["wall_s"] > 0
        assert run["answers_vs_plain_generate"]["requests"] == spec.voters
    assert row["plain_generate"]["prefix_tokens_computed"] == 0  # generate shares nothing
    assert row["backend"]["prompt_tokens_shared"] > 0
    assert row["plain_generate"]["answers_vs_plain_generate"]["answers_differing"] == 0


def test_the_engines_compete_unit_fits_a_servers_forced_answer(mirror_env):
    from moloch.bench_engines import served_ballots
    from moloch.bench_runtime import compete_ballots
    from moloch.llm.openai_backend import answer_regex

    ballots, smoke = served_ballots(), compete_ballots()
    with pytest.raises(ModelError, match="cannot hold a forced answer"):
        answer_regex(smoke[0])  # the smoke audience's budget, through a server
    assert [b.messages for b in ballots] == [b.messages for b in smoke]  # the same ballots
    for ballot in ballots:
        answer_regex(ballot)
