"""Local generation with Hugging Face transformers (the CPU path of the smoke profile).

``TransformersBackend(spec)`` loads ``spec.model`` once ("embedded" is the
SmolLM2 checkpoint of :mod:`moloch.llm.embedded`), applies the model's chat
template and answers requests in batches of ``spec.batch_size``. Players'
LoRA adapters (peft) are loaded on top on demand, one per adapter folder.

Reproducibility. A sampler (``_RowSampler``) draws each row's next token from
that row's own ``torch.Generator``, seeded from the request (seed, sample
index, messages), with one uniform draw per step and inverse-CDF sampling. So
a request's random stream does not depend on which other requests share its
batch, nor on their order. What can still differ between
batch compositions is floating-point rounding of the logits (other shapes,
other padding), which flips a token only when a draw lands within rounding
error of a boundary between two tokens: rare, not impossible. On one machine
and one batch composition results are exactly repeatable. Temperature 0 is
greedy.

Decoding. The backend runs its own loop over the model's forward pass (not
``generate``): one preallocated KV cache per batch, positions and the attention
mask given explicitly, the logits of the last position only. Requests whose
prompts begin with the same tokens (a voter's ballots share the system message,
preamble, persona and instructions: about 400 of 475 tokens; a judge's probes of
one anchor share all but the message) have that prefix computed once, at batch
1, and kept as one tensor that every row of the batch attends to without copying it
(``PrefixStore``, kept across batches within a memory bound; ``moloch.llm.attention``).
Each row reads exactly the tokens it would read alone, so the answers are those
of computing every prompt whole, up to the floating-point rounding that batch
shapes change anyway (compared token for token in the tests and over 504 requests
in ``bench_runtime``). The call client orders misses by their messages so that
such requests meet in a batch.

Speed on CPU (figures in ``bench_runtime``, with the machine's limits):
decoding one row is bound by reading the weights (540 MB in float32) once per step;
from about 8 rows on 2 cores, by arithmetic, as prefill is. On CPU the linear layers run on
weights prepacked once for oneDNN (``_prepack_linears``: 1.5x faster decoding, and
each row's result is the same at every batch size), and a Llama model's decoding
steps skip transformers' modules (``llama_step``: the model's logits bit for bit, with the
projections that read one input fused into one product). float32 is the default on CPU
because it keeps answers independent of the batch (checked in tests); the
profile's ``dtype: bfloat16`` is faster where the CPU has native bf16, but its
rounding makes answers depend on the batch composition. The dtype and the
device come from the profile (``dtype``, ``device``) and are part of
``identity()``, since they change the answers. Torch uses every core this
process may run on; on a machine shared with other busy processes, fewer
threads are faster (``MOLOCH_TORCH_THREADS`` sets them; speed only).
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Sequence
from pathlib import Path

from ..config import ModelSpec
from ..errors import ModelError
from ..seeds import sampling_seed
from .adapters import adapter_name
from .attention import ATTENTION, SharedPrefix, register
from .base import AnswerFormat, ChatRequest, Completion
from .embedded import check_source, resolve_model, weights_identity
from .llama_step import can_decode, decode_step, fuse_projections, packed_product
from .sampling import GENERATE_DEFAULTS, model_defaults, resolve

ENV_THREADS = "MOLOCH_TORCH_THREADS"
# Requests whose prompts begin alike (a voter's ballots share the system message, preamble,
# persona and instructions: 400 of their ~475 tokens) have that prefix computed once.
PREFIX_MIN_TOKENS = 32
PREFIX_STORE_BYTES = 256 * 2**20  # states kept across batches (SmolLM2: 46 KB a token)


def request_seed(request: ChatRequest) -> int:
    """The seed of one request's random stream (:func:`moloch.seeds.sampling_seed`)."""
    return sampling_seed(request.seed, request.sample_index, request.messages)


def _choose_threads() -> int:
    for env in (ENV_THREADS, "OMP_NUM_THREADS"):
        value = os.environ.get(env)
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise ModelError(f"{env}={value!r} is not a whole number of threads") from None
    # Every core this process may use. (Sizing by the load average undercounts:
    # the load includes this run's own previous stage, and halved the speed.)
    return len(os.sched_getaffinity(0))


DTYPES = ("float32", "bfloat16", "float16")


def _dtype_named(name: str, where: str):
    import torch

    if name not in DTYPES:
        raise ModelError(f"{where}: dtype {name!r} is not one of {', '.join(DTYPES)} (or auto)")
    return getattr(torch, name)


def _choose_dtype(wanted: str, device: str):
    """The profile's dtype; ``auto``: bfloat16 on CUDA, float32 elsewhere."""
    import torch

    if wanted != "auto":
        return _dtype_named(wanted, "profile")
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _choose_device(wanted: str) -> str:
    """The profile's device; ``auto``: CUDA when there is one."""
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise ModelError("the profile asks for device: cuda, and no CUDA GPU is visible")
    if wanted != "auto":
        return wanted
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Forcer:
    """Drives one row through an AnswerFormat, one token per generation step.

    The opening is forced, then the model writes freely (at least a few tokens)
    until it stops or its budget runs out, then the closing must be one of the options: wherever the
    options' tokens differ, the model's own probabilities choose among them.
    """

    MIN_THOUGHT = 8  # tokens written before the model may stop: a thought is never empty

    def __init__(self, fmt: AnswerFormat, tokenizer, eos: int, max_tokens: int, vocab: int):
        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False).input_ids

        self.opening = encode(fmt.opening)
        self.options = [encode(option) for option in fmt.options]
        self.budget = max_tokens - len(self.opening) - max(map(len, self.options)) - 1
        if self.budget < 0:
            raise ModelError(
                f"max_tokens={max_tokens} is too small for the forced answer format "
                f"{fmt.options[0]!r}: raise max_tokens for this role in the profile"
            )
        self.eos = eos
        self.not_eos = [t for t in range(vocab) if t != eos]
        self.step = 0
        self.closing: list[int] | None = None
        self.done = False

    def next(self, proposed: int, pick) -> int:
        step, self.step = self.step, self.step + 1
        if self.done:
            return self.eos
        if step < len(self.opening):
            return self.opening[step]
        if self.closing is None:
            written = step - len(self.opening)
            if written < min(self.MIN_THOUGHT, self.budget) and proposed == self.eos:
                return pick(self.not_eos)
            if proposed != self.eos and written < self.budget:
                return proposed
            self.closing = []
        k = len(self.closing)
        allowed = sorted({o[k] for o in self.options if o[:k] == self.closing and len(o) > k})
        token = allowed[0] if len(allowed) == 1 else pick(allowed)
        self.closing.append(token)
        self.done = self.closing in self.options
        return token


class _RowSampler:
    """Logits processor: picks each row's token with that row's own generator.

    Returns scores that are -inf everywhere but the chosen token, so greedy
    decoding in ``generate`` keeps exactly that choice. Processors that run
    before it (e.g. min_new_tokens) are respected.
    """

    def __init__(
        self,
        requests: Sequence[ChatRequest],
        forcers: Sequence[_Forcer | None] = (),
        defaults: dict | None = None,
    ):
        """``defaults``: the model's top_k/top_p for requests that leave them unset."""
        import torch

        chosen = [resolve(r, defaults or GENERATE_DEFAULTS) for r in requests]
        self.temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float64)
        self.top_k = torch.tensor([k or 0 for k, _ in chosen], dtype=torch.long)  # 0: no cut
        self.top_p = torch.tensor([p for _, p in chosen], dtype=torch.float64)
        self.generators = [torch.Generator().manual_seed(request_seed(r)) for r in requests]
        self.forcers = list(forcers) or [None] * len(requests)

    def __call__(self, input_ids, scores):
        """transformers' logits-processor interface: ``scores`` that keep only ``choose``'s
        token of each row."""
        import torch

        chosen = self.choose(scores)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.to(scores.device)[:, None], 0.0)
        return out

    def choose(self, scores):
        """The next token of each row of ``scores`` [rows, vocab] (a tensor on the CPU)."""
        import torch

        logits = scores.detach().to("cpu", torch.float32)
        sampled = (self.temperature > 0).nonzero().flatten()
        if len(sampled) == len(logits):
            chosen = self._sample(logits, slice(None))
        else:
            chosen = logits.argmax(dim=-1)
            if len(sampled):
                chosen[sampled] = self._sample(logits[sampled], sampled)
        for i, forcer in enumerate(self.forcers):
            if forcer is not None:
                chosen[i] = forcer.next(int(chosen[i]), lambda ids, i=i: self._pick(i, logits, ids))
        return chosen

    def _pick(self, row: int, logits, allowed: list[int]) -> int:
        """One of ``allowed`` tokens, drawn from the row's own distribution over them."""
        import torch

        restricted = logits[row, allowed]
        temperature = float(self.temperature[row])
        if temperature <= 0:
            return allowed[int(restricted.argmax())]
        probs = torch.softmax(restricted / temperature, dim=-1)
        u = torch.rand((), generator=self.generators[row]).item()
        index = int(torch.searchsorted(probs.cumsum(0), torch.tensor([u * float(probs.sum())])))
        return allowed[min(index, len(allowed) - 1)]

    def _sample(self, logits, rows):
        import torch

        rows = range(len(self.generators))[rows] if isinstance(rows, slice) else rows.tolist()
        # One uniform per sampled row per step, always, keeps each stream in step.
        u = torch.tensor([torch.rand((), generator=self.generators[i]).item() for i in rows])
        temperature = self.temperature[rows].to(torch.float32)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        return self._inverse_cdf(probs, u.to(torch.float64), self.top_p[rows], self.top_k[rows])

    @staticmethod
    def _inverse_cdf(probs, u, top_p, top_k=None):
        """Token whose cumulative-probability interval holds ``u``, after the top-k cut and
        then the nucleus cut of the renormalised rest (the order of transformers' warpers)."""
        import torch

        def pick(p, draws):
            cdf = p.cumsum(dim=-1, dtype=torch.float64)
            idx = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)
            return idx.clamp(max=p.shape[-1] - 1)

        vocab = probs.shape[-1]
        top_k = torch.zeros(len(probs), dtype=torch.long) if top_k is None else top_k
        keep = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        full = (top_p >= 1.0) & (keep == vocab)
        if full.all():  # plain sampling: mass in token-id order, no sort needed
            return pick(probs, u).flatten()
        chosen = torch.empty(len(probs), dtype=torch.long)
        if full.any():
            chosen[full] = pick(probs[full], u[full]).flatten()
        cut = ~full
        k = keep[cut]
        sorted_p, order = probs[cut].topk(int(k.max()), dim=-1)  # descending
        ranks = torch.arange(sorted_p.shape[-1])
        sorted_p = sorted_p.masked_fill(ranks[None, :] >= k[:, None], 0.0)
        sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
        before = sorted_p.cumsum(dim=-1, dtype=torch.float64) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= top_p[cut, None], 0.0)
        chosen[cut] = order.gather(1, pick(sorted_p, u[cut])).flatten()
        return chosen


def _rows(indices: list[int], device):
    """Rows of a batch as attention selects them: a slice where they are consecutive (a
    view, no copy), else a tensor of indices."""
    import torch

    if indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return torch.tensor(indices, device=device)


def _additive(seen, dtype):
    """An attention mask as the attention kernels add it: 0 where a query may look, the
    dtype's lowest value elsewhere (2x faster on CPU than a boolean mask, measured)."""
    import torch

    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(
        ~seen, torch.finfo(dtype).min
    )


def _packs_weights(device: str, dtype) -> bool:
    """Whether the linear layers run on weights prepacked for oneDNN: on CPU, in float32 or
    bfloat16, where torch has oneDNN (every x86 and Arm build)."""
    import torch

    return (
        device == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _prepack_linears(model) -> int:
    """Give every ``nn.Linear`` of ``model`` a copy of its weight in oneDNN's blocked layout,
    and compute with it; returns how many. Why: at decoding batch sizes (1 to 64 rows) the
    default CPU matrix product re-lays the weight out at every call, and the weights do not
    stay in cache between steps, so it reads them at a fraction of the memory bandwidth;
    prepacked, a batch-16 step of the embedded model takes 131 ms instead of 189 (2 cores,
    AVX-512; ``bench_runtime``). Each row's result is the same at every batch size
    (``llama_step.packed_product`` computes at least 4 rows; checked in tests). The
    dense weight stays the layer's parameter and is never changed (peft and
    ``_merge_adapter`` read it); ``base`` keeps the packed base weight, and
    ``packed`` is what the layer computes with: the base, or the base with a LoRA adapter
    merged in (``_merge_adapter``)."""
    import torch

    class PackedLinear(torch.nn.Linear):
        def forward(self, x):
            return packed_product(x, self.packed, self.bias)

    count = 0
    for module in list(model.modules()):
        if type(module) is torch.nn.Linear:
            module.base = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
            module.packed = module.base
            module.__class__ = PackedLinear
            count += 1
    return count


# Adapter settings under which a LoRA layer adds exactly scale * B @ A to its weight, with
# scale = lora_alpha / r: anything else (DoRA, rsLoRA, biases, per-module ranks, extra
# trained modules) is served by peft itself.
PLAIN_LORA = {
    "peft_type": "LORA", "use_dora": False, "use_rslora": False, "bias": "none",
    "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
    "alpha_pattern": {}, "trainable_token_indices": None, "layer_replication": None,
    "target_parameters": None, "alora_invocation_tokens": None, "use_qalora": False,
}  # fmt: skip


def _merge_adapter(model, folder: Path) -> bool:
    """Compute ``model``'s prepacked linear layers with the LoRA adapter in ``folder`` merged
    in (W + lora_alpha / r * B @ A, packed afresh from the unchanged base weight W); False,
    changing nothing, where the adapter is not plain LoRA over linear layers (``PLAIN_LORA``).
    Why: through peft, every one of the 210 adapted layers costs two more small products
    and Python per decoding step (an adapter unit of the smoke run took 5-15 s longer than
    a base one); merged, a step costs what a base step does."""
    import json

    import torch
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    if any(config.get(k, v) != v for k, v in PLAIN_LORA.items()) or not weights.is_file():
        return False
    tensors = load_file(weights)
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "base")}
    pairs: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        name, dot, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if not dot or part not in ("A.weight", "B.weight") or name not in layers:
            return False
        pairs[name][part[0]] = tensor
    if any(len(pair) != 2 for pair in pairs.values()):
        return False
    scale = config["lora_alpha"] / config["r"]
    dense = {}  # layer -> its merged weight, for the fused products (llama_step)
    for name, module in layers.items():
        if name in pairs:
            a, b = pairs[name]["A"], pairs[name]["B"]
            merged = module.weight.detach() + scale * (b.to(module.weight) @ a.to(module.weight))
            module.packed = torch.ops.mkldnn._reorder_linear_weight(merged)
            dense[module] = merged
        else:
            module.packed = module.base
    fuse_projections(model, dense)
    return True


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _near(a: Sequence[int], b: Sequence[int]) -> bool:
    """Two prompts of one family: they share at least half of the shorter one."""
    return _common(a, b) * 2 >= min(len(a), len(b))


def _families(rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Rows (indices) in runs that share a prefix: families (see ``_near``) first, then the
    other rows grouped by a shorter common start of at least ``PREFIX_MIN_TOKENS``."""
    ranked = sorted(range(len(rows)), key=lambda i: rows[i])
    runs: list[list[int]] = []
    for i in ranked:
        if runs and _near(rows[runs[-1][-1]], rows[i]):
            runs[-1].append(i)
        else:
            runs.append([i])
    loose: list[list[int]] = []
    for i in (run[0] for run in runs if len(run) == 1):  # still in rank order
        if loose and _common(rows[loose[-1][-1]], rows[i]) >= PREFIX_MIN_TOKENS:
            loose[-1].append(i)
        else:
            loose.append([i])
    return [run for run in runs if len(run) > 1] + loose


def batch_order(rows: Sequence[Sequence[int]]) -> list[int]:
    """The order to batch prompts in: each family of prompts that share most of their tokens
    (a voter's ballots, a judge's three probes of one anchor) side by side, shortest first
    within it; then every other prompt, shortest first (less padding). Only the order
    changes: each prompt, and its own random stream, stays as it is."""
    family = {i: n for n, run in enumerate(_families(rows)) for i in run}
    sizes = Counter(family.values())
    alone = len(rows)  # every prompt without a family sorts after the families
    return sorted(
        range(len(rows)),
        key=lambda i: (family[i] if sizes[family[i]] > 1 else alone, len(rows[i]), rows[i]),
    )


class PrefixStore:
    """Key and value states of prompt prefixes that several requests share, computed once.

    ``share(model, weights, rows)`` finds, for each row of a batch, the longest prefix it
    shares with its neighbours (at least ``PREFIX_MIN_TOKENS``, always leaving a row one token
    of its own) and returns its states at batch 1: taken from the store, or computed from the
    longest stored prefix of it and kept. States depend on the weights (``weights`` names the
    adapter and its files), so they are part of the key. The least recently used prefixes go
    once the store holds more than ``max_bytes``. ``computed`` and ``reused`` count tokens.
    """

    def __init__(self, max_bytes: int = PREFIX_STORE_BYTES):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, list] = OrderedDict()
        self.computed = self.reused = 0

    def share(self, model, weights, rows: Sequence[Sequence[int]]) -> list[tuple[int, list]]:
        out: list[tuple[int, list]] = [(0, [])] * len(rows)
        if self.max_bytes <= 0:  # reuse switched off: every row computes its whole prompt
            return out
        for run in _families(rows):
            first = rows[run[0]]
            n = min(len(rows[i]) - 1 for i in run)
            n = min([n, *(_common(first, rows[i]) for i in run)])
            if len(run) == 1:
                n, _ = self._longest(weights, first[:n])  # only what an earlier batch left
            if n >= PREFIX_MIN_TOKENS:
                states = self._states(model, weights, tuple(first[:n]))
                self.reused += n * len(run)
                for i in run:
                    out[i] = (n, states)
        return out

    def _longest(self, weights, tokens: Sequence[int]) -> tuple[int, list | None]:
        best: tuple[int, list | None] = (0, None)
        for (owner, prefix), states in self.entries.items():
            fits = owner == weights and best[0] < len(prefix) <= len(tokens)
            if fits and tuple(tokens[: len(prefix)]) == prefix:
                best = (len(prefix), states)
        return best

    def _states(self, model, weights, prefix: tuple[int, ...]) -> list:
        import torch
        from transformers import DynamicCache

        key = (weights, prefix)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        start, known = self._longest(weights, prefix)
        cache = DynamicCache(config=model.config)
        for layer, (k, v) in enumerate(known or []):
            cache.update(k, v, layer)  # copied: the stored states are never written to
        device = next(model.parameters()).device
        model(
            input_ids=torch.tensor([prefix[start:]], device=device), past_key_values=cache,
            position_ids=torch.arange(start, len(prefix), device=device)[None],
            use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        self.computed += len(prefix) - start
        states = [(layer.keys, layer.values) for layer in cache.layers]
        self.entries[key] = states
        while len(self.entries) > 1 and self.bytes() > self.max_bytes:
            self.entries.popitem(last=False)
        return states

    def bytes(self) -> int:
        return sum(
            k.numel() * k.element_size() + v.numel() * v.element_size()
            for states in self.entries.values()
            for k, v in states
        )


# Loaded CPU backends of this process, by spec, the most recently used last. Two: a stage
# calls at most two roles (episodes: players and voters), and each holds ~1.1 GB for the
# embedded model (dense and prepacked weights) plus its prefix store.
_WARM: OrderedDict[str, TransformersBackend] = OrderedDict()
WARM_BACKENDS = 2


def warm_backend(spec: ModelSpec) -> TransformersBackend:
    """The backend of ``spec``: the one this process loaded already on CPU, else a new one.
    A warm kernel (moloch.kernels) runs many units of a run, each asking for its roles'
    models; loading one (weights, prepacking) takes seconds. A backend's answers do not
    depend on what it answered before (each request has its own seed; a shared prefix's
    states are the same whenever computed), so keeping it changes no answer. On a GPU, each
    unit loads its own, so that its memory goes with the unit."""
    key = spec.model_dump_json()
    if key in _WARM:
        _WARM.move_to_end(key)
        return _WARM[key]
    return TransformersBackend(spec)


def release_warm_backends() -> int:
    """Let go of every backend kept for the next unit (their weights, prefix states and
    packed copies: about 1.1 GB each for the embedded model); returns how many. Training
    calls it: its activations need that memory more than the next unit needs a warm model
    (reloading one takes a few seconds)."""
    import gc

    count = len(_WARM)
    _WARM.clear()
    gc.collect()
    return count


def _keep_warm(backend: TransformersBackend) -> None:
    """Keep a just-loaded backend for the next unit; the least recently used goes."""
    _WARM[backend.spec.model_dump_json()] = backend
    while len(_WARM) > WARM_BACKENDS:
        _WARM.popitem(last=False)


class TransformersBackend:
    """Backend over a local transformers model; see the module docstring."""

    name = "transformers"

    def __init__(
        self,
        spec: ModelSpec,
        device: str | None = None,
        dtype: str | None = None,
        share_prefixes: bool = True,
        pack_weights: bool = True,
    ):
        """``device`` and ``dtype`` (e.g. "cpu", "float32") override the spec's (benchmarks);
        ``share_prefixes=False`` computes every prompt whole (the equivalence test);
        ``pack_weights=False`` keeps torch's default CPU matrix product (comparisons)."""
        self._pack = pack_weights
        # only a backend as its spec says is kept for the next unit (warm_backend)
        self._as_specified = (device, dtype, share_prefixes, pack_weights) == (
            None,
            None,
            True,
            True,
        )
        self.spec = spec
        self._device = device
        self._model = None  # loaded on first use
        self._tokenizer = None
        self._dtype = _dtype_named(dtype, "TransformersBackend") if dtype else None
        self._adapters: dict[str, tuple[str, tuple]] = {}  # path -> (name, folder signature)
        self._merged: tuple[str, tuple] | None = None  # the adapter merged in: path, signature
        self.threads: int | None = None
        self.sampling_defaults: dict | None = None  # the model's top_k/top_p, once loaded
        self.prefixes = PrefixStore(PREFIX_STORE_BYTES if share_prefixes else 0)

    # --- identity and loading -----------------------------------------------------

    def check(self) -> None:
        """Preflight: the weights can be found (no model is loaded)."""
        check_source(self.spec.model, self.spec.revision)

    def identity(self) -> dict:
        weights = weights_identity(self.name, self.spec.model, self.spec.revision)
        dtype = str(self.dtype).removeprefix("torch.")
        # the attention kernel rounds in its own way too (moloch.llm.attention)
        identity = {**weights, "dtype": dtype, "device": self.device, "attention": ATTENTION}
        if self.pack_weights:  # another kernel rounds otherwise: part of what decides answers
            identity["linear"] = "onednn-prepacked"
            identity["lora"] = "merged"  # plain LoRA adapters: into the weights (rounds so)
        return identity

    @property
    def pack_weights(self) -> bool:
        """Whether linear layers run on prepacked weights (``_prepack_linears``)."""
        return self._pack and _packs_weights(self.device, self.dtype)

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = _choose_device(self.spec.device)
        return self._device

    @property
    def dtype(self):
        if self._dtype is None:
            self._dtype = _choose_dtype(self.spec.dtype, self.device)
        return self._dtype

    def load(self):
        """Load tokenizer and model (once); returns the model."""
        if self._model is not None:
            return self._model
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if self.device == "cpu":
            self.threads = _choose_threads()
            torch.set_num_threads(self.threads)
            # With a mask, transformers copies each key and value head once per query head
            # before attention, unless told that the kernel groups them itself (it does on
            # CPU): 1.1 GB copied per decoding step at batch 16, 500-token prompts.
            os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        source = resolve_model(self.spec.model)
        revision = None if isinstance(source, Path) else self.spec.revision
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(
                source, revision=revision, dtype=self.dtype, attn_implementation=register()
            )
        except OSError as err:
            raise ModelError(
                f"could not load model {self.spec.model!r} ({source}) for the transformers "
                f"backend: {err}. Check the model id and revision, or that it is downloaded."
            ) from err
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id
        self._eos = {eos} if isinstance(eos, int) else set(eos or [tokenizer.eos_token_id])
        # Sampling happens in _RowSampler, with the model's own defaults where a request
        # leaves top_k/top_p unset; generate() itself must only decode greedily.
        self.sampling_defaults = model_defaults(source, revision)
        model.generation_config = GenerationConfig(
            bos_token_id=model.generation_config.bos_token_id,
            eos_token_id=sorted(self._eos),
            pad_token_id=tokenizer.pad_token_id,
        )
        model = model.to(self.device).eval()
        if self.pack_weights:
            _prepack_linears(model)
            fuse_projections(model)
        self._tokenizer, self._model = tokenizer, model
        if self.device == "cpu" and self._as_specified:
            _keep_warm(self)
        return self._model

    def _use_adapter(self, path: str | None):
        """The model to call for ``path`` (None: the base) and a context to enter."""
        import contextlib

        from peft import PeftModel

        model = self.load()
        if path is None:
            if self._merged is not None:
                self._unmerge()
            if isinstance(model, PeftModel):
                return model, model.disable_adapter()
            return model, contextlib.nullcontext()
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise ModelError(
                f"LoRA adapter {folder} has no adapter_config.json: train it first or fix the path"
            )
        signature = tuple(
            (p.name, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.iterdir())
            if p.is_file()
        )
        name = adapter_name(folder)
        if self.pack_weights and not isinstance(model, PeftModel):
            if self._merged == (str(folder), signature):
                return model, contextlib.nullcontext()
            if _merge_adapter(model, folder):
                self._merged = (str(folder), signature)
                self._adapters[str(folder)] = (name, signature)
                return model, contextlib.nullcontext()
        if self._merged is not None:  # peft serves this one: from the base weights
            self._unmerge()
        known = self._adapters.get(str(folder))
        if isinstance(model, PeftModel) and known and known[1] != signature:
            model.delete_adapter(name)  # retrained in place: load the new weights
            known = None
        if known is None:
            if isinstance(model, PeftModel):
                model.load_adapter(str(folder), adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
                self._model = model.eval()
            self._adapters[str(folder)] = (name, signature)
        model.set_adapter(name)
        return model, contextlib.nullcontext()

    def _unmerge(self) -> None:
        """Back to the base weights after a merged adapter (``_merge_adapter``)."""
        for module in self._model.modules():
            if hasattr(module, "base"):
                module.packed = module.base
        fuse_projections(self._model)
        self._merged = None

    # --- generation -------------------------------------------------------------

    def _prompt(self, request: ChatRequest) -> str:
        """The chat-templated prompt text (what ``meta["prompt"]`` records)."""
        extra = {}
        if request.enable_thinking is not None:
            extra["enable_thinking"] = request.enable_thinking
        return self._tokenizer.apply_chat_template(
            request.as_openai_messages(), tokenize=False, add_generation_prompt=True, **extra
        )

    def generate(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """Answer every request, in order (batched by adapter and max_tokens)."""
        return self.generate_batch(requests)

    def generate_batch(
        self, requests: Sequence[ChatRequest], min_new_tokens: int | None = None
    ) -> list[Completion]:
        """As ``generate``; ``min_new_tokens`` forbids stopping earlier (benchmarks)."""
        if any(r.max_tokens is None for r in requests):
            raise ModelError("the transformers backend needs max_tokens on every request")
        self.load()
        prompts = [self._prompt(r) for r in requests]
        tokens = [
            self._tokenizer(p, add_special_tokens=r.add_special_tokens).input_ids
            for p, r in zip(prompts, requests, strict=True)
        ]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.adapter, r.max_tokens)].append(i)
        results: list[Completion | None] = [None] * len(requests)
        for (adapter, max_tokens), members in groups.items():
            members = [members[j] for j in batch_order([tokens[i] for i in members])]
            size = self.spec.batch_size
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                done = self._run_batch(
                    [requests[i] for i in chunk],
                    [prompts[i] for i in chunk],
                    [tokens[i] for i in chunk],
                    adapter,
                    max_tokens,
                    min_new_tokens,
                )
                for i, completion in zip(chunk, done, strict=True):
                    results[i] = completion
        return results  # type: ignore[return-value]

    def _run_batch(self, requests, prompts, rows, adapter, max_tokens, min_new_tokens):
        import torch

        tok = self._tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else min(self._eos)
        forcers = [
            _Forcer(r.answer_format, tok, eos, max_tokens, vocab=len(tok))
            if r.answer_format
            else None
            for r in requests
        ]
        sampler = _RowSampler(requests, forcers, self.sampling_defaults)
        model, context = self._use_adapter(adapter)
        weights = (adapter, self._adapters[str(adapter)][1] if adapter else None)
        with torch.inference_mode(), context:
            new = self._decode(model, weights, rows, sampler, max_tokens, min_new_tokens or 0)
        meta = {"adapter": adapter_name(adapter) if adapter else None}
        return [
            self.completion(row, len(prompt_ids), {**meta, "prompt": prompt})
            for row, prompt_ids, prompt in zip(new, rows, prompts, strict=True)
        ]

    def completion(self, written: Sequence[int], prompt_tokens: int, meta=None) -> Completion:
        """The answer of one row from the tokens it wrote (cut at its first end token)."""
        stop = next((j for j, t in enumerate(written) if t in self._eos), None)
        kept = list(written if stop is None else written[:stop])
        return Completion(
            text=self._tokenizer.decode(kept, skip_special_tokens=True),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(kept) + (stop is not None),
            finish_reason="length" if stop is None else "stop",
            meta=meta or {},
        )

    def _decode(self, model, weights, rows, sampler, max_tokens, min_new_tokens):
        """The new tokens of each row (up to its first end-of-sequence token).

        One preallocated KV cache for the batch. A row's cache holds the rest of its prompt
        after its shared prefix, left-padded, then what it writes; the prefix's states (from
        ``self.prefixes``) stay one tensor that every row of its group attends to
        (:mod:`moloch.llm.attention`). Positions and the attention mask are given explicitly,
        so a row reads exactly the tokens it would read alone; padding is never attended to.
        """
        import torch
        from transformers import StaticCache

        device = self.device
        shared = self.prefixes.share(model, weights, rows)  # per row: (length, states)
        rest = max(len(row) - n for row, (n, _) in zip(rows, shared, strict=True))
        size, batch = rest + max_tokens, len(rows)
        cache = StaticCache(config=model.config, max_cache_len=size)
        members: dict[int, tuple[list[int], list]] = {}
        for r, (n, states) in enumerate(shared):
            if n:
                members.setdefault(id(states), ([], states))[0].append(r)
        groups = [(_rows(r, device), states) for r, states in members.values()]

        visible = torch.zeros(batch, size, dtype=torch.bool, device=device)
        ids = torch.full((batch, rest), self._tokenizer.pad_token_id, dtype=torch.long)
        positions = torch.zeros((batch, rest), dtype=torch.long)
        for r, (row, (n, _)) in enumerate(zip(rows, shared, strict=True)):
            tail = row[n:]
            ids[r, rest - len(tail) :] = torch.tensor(tail)
            positions[r, rest - len(tail) :] = torch.arange(n, len(row))
            visible[r, rest - len(tail) : rest] = True
        query = torch.arange(rest, device=device)
        causal = torch.arange(size, device=device)[None, :] <= query[:, None]
        seen = visible[:, None, :] & causal[None]
        seen[:, query, query] = True  # a pad slot sees itself: no empty row
        out = model(
            input_ids=ids.to(device), attention_mask=_additive(seen[:, None], model.dtype),
            past_key_values=cache, position_ids=positions.to(device), use_cache=True,
            logits_to_keep=1, shared_prefix=SharedPrefix(groups, filled=rest),
        )  # fmt: skip
        visible = _additive(visible[:, None, None, :], model.dtype)  # decode steps add to it

        logits = out.logits[:, -1]
        written_out = can_decode(model)  # the step without transformers' modules

        stops = torch.tensor(sorted(self._eos), device=device)
        written: list[list[int]] = [[] for _ in rows]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        position = positions[:, -1:].to(device)
        for step in range(max_tokens):
            scores = logits.float()
            if step < min_new_tokens:
                scores[:, stops] = float("-inf")
            chosen = sampler.choose(scores).to(device)
            for r, (token, finished) in enumerate(zip(chosen.tolist(), done.tolist(), strict=True)):
                if not finished:
                    written[r].append(token)
            done |= torch.isin(chosen, stops)
            if bool(done.all()) or step == max_tokens - 1:
                break
            slot = rest + step
            visible[..., slot] = 0.0
            position = position + 1
            prefix = SharedPrefix(groups, filled=slot + 1)
            if written_out:
                ids = chosen[:, None]
                logits = decode_step(model, ids, position, cache, slot, visible, prefix)
            else:
                logits = model(
                    input_ids=chosen[:, None], attention_mask=visible, past_key_values=cache,
                    position_ids=position, use_cache=True, shared_prefix=prefix,
                ).logits[:, -1]  # fmt: skip
        return written
