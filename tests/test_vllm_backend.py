"""VLLMBackend: pure helpers everywhere; the engine only where vLLM and a GPU exist."""

import importlib.util

import pytest
from pydantic import ValidationError

from moloch.config import ModelSpec, VLLMEngine
from moloch.errors import ModelError
from moloch.llm.base import ChatRequest
from moloch.llm.hf import request_seed
from moloch.llm.vllm_backend import LoraRegistry, VLLMBackend, sampling_kwargs

SPEC = ModelSpec(backend="vllm", model="embedded", temperature=0.7, max_tokens=8)


def _request(**kw) -> ChatRequest:
    return ChatRequest.chat("sys", "hello", **{"temperature": 0.7, "max_tokens": 8, **kw})


def test_sampling_kwargs_map_the_request_over_the_model_defaults():
    qwen3 = {"top_k": 20, "top_p": 0.95}  # Qwen3-8B's generation_config.json
    request = _request(top_p=0.9, max_tokens=33, seed=5, sample_index=2)
    kwargs = sampling_kwargs(request, qwen3, min_tokens=4)
    assert kwargs == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,  # the request's own value wins
        "top_k": 20,  # the model's, where the request leaves it unset
        "max_tokens": 33,
        "min_tokens": 4,
        "seed": request_seed(request),
    }
    unset = sampling_kwargs(_request(), {"top_k": None, "top_p": 1.0})
    assert unset["top_k"] == -1 and unset["top_p"] == 1.0  # no cut, in vLLM's terms
    assert sampling_kwargs(_request(sample_index=1), qwen3)["seed"] != unset["seed"]
    assert sampling_kwargs(_request(temperature=0.0), qwen3)["temperature"] == 0.0


def test_engine_settings_are_validated_and_belong_to_vllm_only():
    spec = ModelSpec(**{**SPEC.model_dump(), "engine": {"gpu_memory_utilization": 0.25}})
    assert spec.engine == VLLMEngine(gpu_memory_utilization=0.25)
    whole = {"enable_chunked_prefill": False, "max_model_len": 2048}
    VLLMEngine(**whole, max_num_batched_tokens=2048)  # a whole prompt fits in one step
    for bad in ({"gpu_memory_utilization": 1.5}, {"max_num_seqs": 0}, {"tensor_parallel": 2},
                whole, {**whole, "max_num_batched_tokens": 1024}):  # fmt: skip
        with pytest.raises(ValidationError):
            VLLMEngine(**bad)
    with pytest.raises(ValidationError, match="engine: settings of a vLLM engine"):
        ModelSpec(backend="transformers", model="embedded", temperature=0.7, max_tokens=8,
                  engine=VLLMEngine())  # fmt: skip
    settings = VLLMBackend(spec).identity()
    assert settings == VLLMBackend(SPEC).identity()  # where it fits, not what it says


def _adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_lora_ids_are_stable_distinct_and_positive(tmp_path):
    one, two = _adapter(tmp_path / "rft"), _adapter(tmp_path / "tfb")
    registry = LoraRegistry()
    name, lora_id, path = registry.lookup(one)
    assert registry.lookup(str(one)) == (name, lora_id, path)
    assert LoraRegistry().lookup(one) == (name, lora_id, path)  # same in a new process
    assert registry.lookup(two)[1] != lora_id and lora_id >= 1 and path == str(one.resolve())


def test_lora_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="adapter_config.json"):
        LoraRegistry().lookup(tmp_path / "nothing")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_without_vllm_the_error_says_what_to_install():
    with pytest.raises(ModelError, match=r"pip install '\.\[gpu\]'"):
        VLLMBackend(SPEC).generate([_request()])


@pytest.mark.gpu
def test_engine_answers_and_repeats_itself():
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    backend = VLLMBackend(SPEC, gpu_memory_utilization=0.3)
    requests = [_request(), _request(sample_index=1), _request(temperature=0.0)]
    first = backend.generate(requests)
    again = backend.generate(requests[::-1])[::-1]
    assert [c.text for c in first] == [c.text for c in again]
    assert all(c.completion_tokens > 0 and c.prompt_tokens > 0 for c in first)
