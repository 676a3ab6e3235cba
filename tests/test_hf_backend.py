"""TransformersBackend: the sampler as pure code, then the real embedded model (integration)."""

import copy
import dataclasses
import json

import pytest
import torch

from moloch.config import ModelSpec
from moloch.errors import ModelError
from moloch.llm.base import AnswerFormat, ChatRequest
from moloch.llm.hf import (
    PREFIX_MIN_TOKENS,
    TransformersBackend,
    _Forcer,
    _RowSampler,
    adapter_name,
    batch_order,
    request_seed,
)
from moloch.llm.parse import parse_thought, parse_vote, parse_yes_no


def _request(text: str, **kw) -> ChatRequest:
    kw = {"temperature": 0.7, "max_tokens": 8, "seed": 11, **kw}
    return ChatRequest.chat("You are a helpful assistant.", text, **kw)


# --- pure parts ------------------------------------------------------------------------


def test_request_seed_depends_on_seed_sample_and_messages_only():
    base = _request("hi")
    assert request_seed(base) == request_seed(_request("hi", temperature=0.1, max_tokens=99))
    assert request_seed(base) != request_seed(_request("hi", seed=12))
    assert request_seed(base) != request_seed(_request("hi", sample_index=1))
    assert request_seed(base) != request_seed(_request("hello"))


def test_adapter_name_is_stable_and_identifier_safe(tmp_path):
    assert adapter_name(tmp_path / "x") == adapter_name(str(tmp_path / "x"))
    assert adapter_name(tmp_path / "x") != adapter_name(tmp_path / "y")
    assert adapter_name(tmp_path / "a.b").isidentifier()


def _chosen(sampler, scores):
    out = sampler(None, scores)
    assert torch.isfinite(out).sum(dim=-1).tolist() == [1] * len(scores)
    return out.argmax(dim=-1).tolist()


def test_sampler_rows_are_independent_of_their_neighbours():
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    reqs = [_request(t) for t in ("a", "b", "c")]
    together = [_chosen(s, scores) for s in [_RowSampler(reqs)] * 20]
    alone = [_chosen(s, scores[1:2]) for s in [_RowSampler(reqs[1:2])] * 20]
    assert [row[1] for row in together] == [row[0] for row in alone]
    assert len({row[1] for row in together}) > 1  # it does sample


def test_sampler_greedy_and_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    greedy, nucleus = _request("g", temperature=0.0), _request("n", temperature=1.0, top_p=0.7)
    sampler = _RowSampler([greedy, nucleus])
    picks = [_chosen(sampler, scores) for _ in range(200)]
    assert {p[0] for p in picks} == {0}
    assert {p[1] for p in picks} == {0, 1}  # 0.5 + 0.3 reaches top_p: tokens 2 and 3 are cut


def test_sampler_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    sampler = _RowSampler([_request("d", temperature=1.0)])
    counts = torch.bincount(
        torch.tensor([_chosen(sampler, probs.log()[None])[0] for _ in range(3000)]), minlength=3
    )
    assert torch.allclose(counts / 3000, probs, atol=0.035)


def test_batch_order_keeps_each_family_together_shortest_first():
    voter = [list(range(100)) + [i] * n for i, n in ((7, 5), (3, 9), (5, 1))]  # 100 shared
    other = [[900 + i] * n for i, n in ((0, 30), (1, 10))]  # no family: after, by length
    judge = [list(range(500, 540)) + [i] * n for i, n in ((1, 3), (2, 2))]  # 40 of 43 shared
    rows = [other[0], voter[0], judge[0], voter[1], other[1], voter[2], judge[1]]
    order = batch_order(rows)
    assert sorted(order) == list(range(len(rows)))
    assert [rows[i] for i in order] == [voter[2], voter[0], voter[1], judge[1], judge[0]] + [
        other[1],
        other[0],
    ]
    assert batch_order([]) == [] and batch_order([[1, 2]]) == [0]


# --- the real embedded model ---------------------------------------------------------

SPEC = ModelSpec(
    backend="transformers", model="embedded", temperature=0.7, max_tokens=8, batch_size=4
)
REQUESTS = [
    _request("Say hi."),
    _request("Name a fruit and describe it in one long sentence, please."),
    _request("What is 2+2?", temperature=0.0),
]


@pytest.fixture(scope="module")
def backend():
    return TransformersBackend(SPEC)


@pytest.mark.integration
def test_same_request_same_answer_whatever_the_batch(backend):
    first = backend.generate(REQUESTS)
    assert [c.text for c in backend.generate(REQUESTS)] == [c.text for c in first]
    reordered = backend.generate([REQUESTS[2], REQUESTS[0]])
    alone = backend.generate([REQUESTS[1]])
    assert [c.text for c in reordered + alone] == [first[2].text, first[0].text, first[1].text]
    for c in first:
        assert c.text.strip() and c.prompt_tokens > 10
        assert 0 < c.completion_tokens <= 8 and c.finish_reason in ("stop", "length")
    other_sample = backend.generate([_request("Say hi.", sample_index=1, max_tokens=24)])
    longer_same = backend.generate([_request("Say hi.", max_tokens=24)])
    assert other_sample[0].text != longer_same[0].text
    assert backend.identity()["weights_sha256"] and backend.identity()["dtype"] == "float32"


@pytest.mark.integration
def test_a_loaded_cpu_backend_serves_the_next_unit_of_its_spec_alone(monkeypatch):
    from moloch.llm import hf, make_backend

    monkeypatch.setattr(hf, "_WARM", type(hf._WARM)())
    first = make_backend(SPEC)
    assert make_backend(SPEC) is not first  # nothing kept before it is loaded
    first.generate(REQUESTS[:1])
    assert make_backend(SPEC) is first
    assert make_backend(SPEC.model_copy(update={"batch_size": 2})) is not first
    overridden = TransformersBackend(SPEC.model_copy(update={"batch_size": 3}), dtype="float32")
    overridden.load()  # a benchmark's backend (its own dtype) is not the spec's
    assert make_backend(SPEC.model_copy(update={"batch_size": 3})) is not overridden
    others = [make_backend(SPEC.model_copy(update={"batch_size": n})) for n in (5, 6)]
    for other in others:
        other.load()
    assert make_backend(SPEC) is not first  # two kept: the least recently used went
    assert [make_backend(o.spec) for o in others] == others
    assert hf.release_warm_backends() == 2  # what training calls first
    assert all(make_backend(o.spec) is not o for o in others)


@pytest.mark.integration
def test_min_new_tokens_forces_length(backend):
    [c] = backend.generate_batch([_request("Say hi.", max_tokens=12)], min_new_tokens=12)
    assert c.completion_tokens == 12 and c.finish_reason == "length"


@pytest.mark.integration
def test_lora_adapter_loads_and_is_used(backend, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from moloch.llm.embedded import embedded_checkpoint

    def save_adapter(folder, init):
        model = AutoModelForCausalLM.from_pretrained(embedded_checkpoint())
        config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"])
        config.init_lora_weights = init
        peft.get_peft_model(model, config).save_pretrained(folder)
        return str(folder)

    untrained = save_adapter(tmp_path / "untrained", True)  # B = 0: a no-op until trained
    random = save_adapter(tmp_path / "random", False)  # random B: must change answers
    base = backend.generate(REQUESTS[:2])
    with_untrained = backend.generate(
        [_request(r.messages[1][1], adapter=untrained) for r in REQUESTS[:2]]
    )
    with_random = backend.generate(
        [_request(r.messages[1][1], adapter=random) for r in REQUESTS[:2]]
    )
    assert [c.text for c in with_untrained] == [c.text for c in base]
    assert [c.text for c in with_random] != [c.text for c in base]
    assert with_random[0].meta["adapter"] == adapter_name(random)
    # the base model is still served unchanged once adapters are loaded
    assert [c.text for c in backend.generate(REQUESTS[:2])] == [c.text for c in base]


class _CharTokenizer:
    """One token per character: enough to drive the forcer without a model."""

    def __call__(self, text, add_special_tokens=False):
        class Encoded:
            input_ids = [ord(c) for c in text]

        return Encoded()


def _drive(forcer, proposals, pick=lambda ids: ids[-1]):
    out = []
    for proposed in proposals:
        token = forcer.next(proposed, pick)
        if token == forcer.eos:
            break
        out.append(token)
    return "".join(map(chr, out))


def test_forcer_opens_lets_the_model_write_then_closes_with_an_option():
    fmt = AnswerFormat.tagged("vote", ("A", "B"))
    forcer = _Forcer(fmt, _CharTokenizer(), eos=0, max_tokens=60, vocab=128)
    opening = [ord("-")] * len("<think>")  # proposals made while the opening is forced
    writes = [ord("x")] * 9 + [0] + [ord("?")] * 40
    text = _drive(forcer, opening + writes, pick=lambda ids: ord("B"))
    assert text == "<think>xxxxxxxxx </think>\n<vote>B</vote>"
    assert parse_vote(text).value == "B" and parse_thought(text).value == "xxxxxxxxx"


def test_forcer_keeps_the_model_writing_a_few_tokens():
    fmt = AnswerFormat.tagged("vote", ("A", "B"))
    forcer = _Forcer(fmt, _CharTokenizer(), eos=0, max_tokens=40, vocab=128)
    opening = [ord("-")] * len("<think>")
    picks = iter([ord("z")] * _Forcer.MIN_THOUGHT + [ord("A")])
    text = _drive(forcer, opening + [0] * 40, pick=lambda ids: next(picks))
    assert text == "<think>" + "z" * _Forcer.MIN_THOUGHT + " </think>\n<vote>A</vote>"


def test_forcer_closes_when_the_budget_runs_out():
    fmt = AnswerFormat.tagged("unsafe", ("Yes", "No"))
    forcer = _Forcer(fmt, _CharTokenizer(), eos=0, max_tokens=60, vocab=128)
    text = _drive(forcer, [ord("y")] * 100, pick=lambda ids: ord("N"))
    assert len(text) <= 60 and text.endswith(" </think>\n<unsafe>No</unsafe>")
    assert parse_yes_no(text, "unsafe").value == 0


def test_forcer_refuses_a_budget_too_small():
    with pytest.raises(ModelError, match="max_tokens=10 is too small"):
        _Forcer(
            AnswerFormat.tagged("vote", ("A", "B")),
            _CharTokenizer(),
            eos=0,
            max_tokens=10,
            vocab=128,
        )


@pytest.mark.integration
def test_forced_answer_always_parses_and_is_batch_invariant(backend):
    fmt = AnswerFormat.tagged("vote", ("A", "B"))
    requests = [
        _request(f"Choose.\n## A\noption {i}\n\n## B\nanother", max_tokens=24, answer_format=fmt)
        for i in range(4)
    ]
    alone = [backend.generate([r])[0].text for r in requests]
    together = [c.text for c in backend.generate(requests[::-1])][::-1]
    assert alone == together
    assert all(parse_vote(t).ok and parse_thought(t).ok for t in alone)


def test_sampling_defaults_come_from_the_model_generation_config(tmp_path):
    from moloch.llm.embedded import embedded_checkpoint
    from moloch.llm.sampling import model_defaults

    def config(folder, **values):
        folder.mkdir()
        (folder / "generation_config.json").write_text(json.dumps(values))
        return folder

    qwen3 = config(tmp_path / "qwen3", top_k=20, top_p=0.95, temperature=0.6)
    llama = config(tmp_path / "llama", top_p=0.9, temperature=0.6)
    assert model_defaults(qwen3) == {"top_k": 20, "top_p": 0.95}
    assert model_defaults(llama) == {"top_k": 50, "top_p": 0.9}  # transformers' top_k default
    assert model_defaults(tmp_path) == {"top_k": 50, "top_p": 1.0}  # no generation config
    try:
        embedded = embedded_checkpoint()
    except ModelError as err:
        pytest.skip(f"embedded model unavailable: {err}")
    assert model_defaults(embedded) == {"top_k": 50, "top_p": 1.0}  # SmolLM2's sets neither
    odd = config(tmp_path / "odd", repetition_penalty=1.1)
    with pytest.raises(ModelError, match="repetition_penalty"):
        model_defaults(odd)


def test_sampler_applies_top_k_then_nucleus_like_transformers():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    picks = set()
    for seed in range(400):
        request = _request("k", temperature=1.0, seed=seed)
        sampler = _RowSampler([request], defaults={"top_k": 2, "top_p": 1.0})
        picks.add(_chosen(sampler, probs.log())[0])
    assert picks == {0, 1}  # only the two most likely tokens
    nucleus = set()
    for seed in range(400):  # top-2 renormalised is 4/7, 3/7: top_p 0.5 keeps the first only
        request = _request("k", temperature=1.0, seed=seed, top_p=0.5)
        nucleus.add(
            _chosen(_RowSampler([request], defaults={"top_k": 2, "top_p": 1.0}), probs.log())[0]
        )
    assert nucleus == {0}
    free = {
        _chosen(_RowSampler([_request("f", temperature=1.0, seed=s, top_k=0)]), probs.log())[0]
        for s in range(400)
    }
    assert free == {0, 1, 2, 3}  # top_k 0: no cut


def _families_of_requests(n_voters=3, per_voter=4):
    """Requests as ballots are: a long opening per voter, then a short part of their own."""
    persona = "You are {name}, a {age}-year-old {job} who reads every word twice. " * 4
    jobs = [("Ada", 41, "chemist"), ("Bo", 23, "baker"), ("Cy", 67, "sailor")][:n_voters]
    fmt = AnswerFormat.tagged("vote", ("A", "B"))
    return [
        _request(
            persona.format(name=name, age=age, job=job) + f"\n## A\noption {i}\n## B\nplan {i}",
            max_tokens=24,
            seed=i,
            answer_format=fmt if i % 2 else None,
        )
        for name, age, job in jobs
        for i in range(per_voter)
    ]


@pytest.mark.integration
def test_shared_prefixes_are_computed_once_and_change_no_answer(tmp_path):
    """The same requests with and without prefix reuse: the same tokens (float32), with a
    random LoRA adapter too; the store computes each voter's opening once."""
    requests = _families_of_requests()
    whole = TransformersBackend(SPEC, share_prefixes=False)
    shared = TransformersBackend(SPEC)
    expected = [c.text for c in whole.generate(requests)]
    assert [c.text for c in shared.generate(requests)] == expected
    store = shared.prefixes
    assert store.computed >= 3 * PREFIX_MIN_TOKENS and store.reused >= 3 * store.computed
    assert [c.text for c in shared.generate(requests[::-1])][::-1] == expected
    # a prompt on its own reuses what an earlier batch computed
    computed = store.computed
    assert shared.generate(requests[1:2])[0].text == expected[1]
    assert store.computed == computed
    assert whole.prefixes.computed == 0

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from moloch.llm.embedded import embedded_checkpoint

    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"])
    config.init_lora_weights = False  # random B: the prefix states differ from the base's
    model = AutoModelForCausalLM.from_pretrained(embedded_checkpoint())
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "lora")
    adapted = [dataclasses.replace(r, adapter=str(tmp_path / "lora")) for r in requests]
    texts = [c.text for c in shared.generate(adapted)]
    assert texts == [c.text for c in whole.generate(adapted)] and texts != expected
    assert [c.text for c in shared.generate(requests)] == expected


@pytest.mark.integration
def test_a_plain_lora_adapter_is_merged_into_the_packed_weights_as_peft_would_add_it(tmp_path):
    """Merged (the CPU path) against peft's own LoRA layers: the same logits up to rounding;
    the base weights come back unchanged; an adapter that is not plain LoRA goes to peft."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from moloch.llm.embedded import embedded_checkpoint
    from moloch.llm.hf import _merge_adapter

    backend = TransformersBackend(SPEC)
    if not backend.pack_weights:
        pytest.skip("no prepacked weights on this machine: adapters go through peft")
    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"])
    config.init_lora_weights = False  # random B
    reference = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(embedded_checkpoint()), config
    ).eval()
    reference.save_pretrained(tmp_path / "lora")
    ids = torch.tensor([[1, 504, 3457, 314, 260, 1345, 30, 216, 1130, 2378]])
    model = backend.load()
    with torch.inference_mode():
        base = model(input_ids=ids).logits
        merged_model, _ = backend._use_adapter(str(tmp_path / "lora"))
        assert merged_model is model  # no peft wrapper
        merged = model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
        # float32 rounding of W + BA against W and BA apart, over 30 layers: ~4e-4 of logits ~10
        torch.testing.assert_close(merged, expected, rtol=1e-3, atol=2e-3)
        effect = (expected - base).abs().max()
        assert effect > 0.1 and (merged - expected).abs().max() < effect / 100
        backend._use_adapter(None)
        assert torch.equal(model(input_ids=ids).logits, base)

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_checkpoint()), config
                        ).save_pretrained(tmp_path / "rslora")  # fmt: skip
    assert not _merge_adapter(model, tmp_path / "rslora")


@pytest.mark.integration
def test_the_written_out_decoding_step_gives_the_models_own_logits_bit_for_bit(
    monkeypatch, tmp_path
):
    """Every decoding step of ``llama_step.decode_step`` against the model's forward on the same
    cache: equal logits, in batches of 4 and 1, with shared prefixes, and with a merged LoRA
    adapter (whose fused products must carry the merged weights)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from moloch.llm import hf
    from moloch.llm.embedded import embedded_checkpoint

    backend = TransformersBackend(SPEC)
    if not hf.can_decode(backend.load()):
        pytest.skip("no prepacked weights on this machine: decoding goes through the model")
    step, compared = hf.decode_step, []

    def checked(model, ids, positions, cache, slot, mask, prefix):
        kept = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        for layer in cache.layers:
            layer.cumulative_length.fill_(slot)  # where the model's forward writes
        expected = model(
            input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=positions,
            use_cache=True, shared_prefix=prefix,
        ).logits[:, -1]  # fmt: skip
        for layer, (keys, values) in zip(cache.layers, kept, strict=True):
            layer.keys.copy_(keys)
            layer.values.copy_(values)
        got = step(model, ids, positions, cache, slot, mask, prefix)
        compared.append(torch.equal(got, expected))
        return got

    monkeypatch.setattr(hf, "decode_step", checked)
    requests = _families_of_requests()
    backend.generate(requests)
    backend.generate(requests[5:6])
    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "up_proj"])
    config.init_lora_weights = False  # random B: the adapter changes the answers
    model = AutoModelForCausalLM.from_pretrained(embedded_checkpoint())
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "lora")
    adapted = [dataclasses.replace(r, adapter=str(tmp_path / "lora")) for r in requests[:4]]
    steps = len(compared)
    backend.generate(adapted)
    assert backend._merged is not None and len(compared) > steps
    assert len(compared) > 30 and all(compared)


def test_prepacked_linears_match_dense_and_give_each_row_one_result_at_any_batch():
    from moloch.llm.hf import _packs_weights, _prepack_linears

    if not _packs_weights("cpu", torch.float32):
        pytest.skip("this torch has no oneDNN")
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576, bias=False))
    packed = copy.deepcopy(dense)
    assert _prepack_linears(packed) == 2
    x = torch.randn(48, 1, 576)
    with torch.inference_mode():
        full = packed(x)
        torch.testing.assert_close(full, dense(x), rtol=1e-4, atol=1e-4)
        for rows in (1, 2, 3, 7, 16, 33):  # a row's bits, whatever else is in the batch
            assert torch.equal(packed(x[:rows]), full[:rows])


def test_shared_prefix_attention_is_softmax_over_the_prefix_then_the_own_tokens():
    """Rows that hold a prefix once (and rows with none) against plain attention over each
    row's prefix and own tokens written out in full; and a row's result does not depend on
    which other rows share its batch or its prefix."""
    from types import SimpleNamespace

    from moloch.llm import attention

    torch.manual_seed(0)
    batch, heads, kv_heads, dim, slots, filled = 5, 6, 2, 64, 12, 9  # dim: the model's
    module = SimpleNamespace(layer_idx=1)
    prefixes = [torch.randn(2, 1, kv_heads, n, dim) for n in (40, 33)]  # (keys, values) each
    states = [[None, (p[0], p[1])] for p in prefixes]  # per layer; layer 1 is used
    groups = [(torch.tensor([0, 2, 3]), states[0]), (torch.tensor([4]), states[1])]  # row 1: none
    key, value = torch.randn(batch, kv_heads, slots, dim), torch.randn(batch, kv_heads, slots, dim)
    for q_len in (1, 3):
        query = torch.randn(batch, heads, q_len, dim)
        seen = torch.rand(batch, 1, q_len, slots) < 0.7
        seen[..., 0] = True  # every query sees at least one of its own tokens
        mask = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)
        out, _ = attention.shared_prefix_attention(
            module, query, key, value, mask, scaling=0.3,
            shared_prefix=attention.SharedPrefix(groups, filled=filled),
        )  # fmt: skip
        assert out.shape == (batch, q_len, heads, dim)
        prefix_of = {0: 0, 2: 0, 3: 0, 4: 1}
        for r in range(batch):
            k, v, m = key[r, :, :filled], value[r, :, :filled], mask[r, :, :, :filled]
            if r in prefix_of:
                pk, pv = prefixes[prefix_of[r]][:, 0]
                k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
                m = torch.cat([torch.zeros(1, q_len, pk.shape[1]), m], -1)
            group = heads // kv_heads
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
            expected = torch.softmax(query[r] @ k.transpose(-1, -2) * 0.3 + m, -1) @ v
            torch.testing.assert_close(out[r], expected.transpose(0, 1), rtol=1e-5, atol=1e-5)
        # rows 2 and 3 alone, with their prefix: the same bits
        alone, _ = attention.shared_prefix_attention(
            module, query[2:4], key[2:4], value[2:4], mask[2:4], scaling=0.3,
            shared_prefix=attention.SharedPrefix([(torch.tensor([0, 1]), states[0])], filled),
        )  # fmt: skip
        assert torch.equal(alone, out[2:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_written_out_norm_is_the_models_own_in_either_dtype(dtype):
    """``llama_step._norm`` against ``LlamaRMSNorm``: the same bits, in float32 and in
    bfloat16 (where the module computes in float32 and converts back)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from moloch.llm.llama_step import _norm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(576).to(dtype)
    x = torch.randn(16, 1, 576).to(dtype)
    assert torch.equal(_norm(norm, x), norm(x))
