"""The built-in runtime against the fake-quant transformers reference (fp32 on the CPU).

With exact weights and fp32 activations the runtime computes the reference's function, so greedy
tokens must match token for token; logits are compared with a 1e-4 relative tolerance (fp32 op-order
rounding). The Triton path runs in the interpreter with fp16 activations (tolerance 2e-2 relative).
"""

from __future__ import annotations

import json

import pytest
import torch

from awqconv.config import QuantConfig
from awqconv.errors import InputError, UnsupportedArchitecture
from awqconv.model import QuantizedModel
from awqconv.quant.grid import IntGrid
from awqconv.reference import reference_model
from awqconv.runtime.generate import Generator, SamplingParams
from awqconv.runtime.lm import RuntimeLM
from awqconv.runtime.layer_ops import StepPaths
from awqconv.runtime.model import build_decoder
from awqconv.runtime.options import RuntimeOptions

PROMPTS = [[1, 5, 9, 33, 2, 7], [7, 8], [100, 3, 4, 5, 6, 7, 8, 9, 10]]


def _qm_for(arch: str, **cfg_kw) -> QuantizedModel:
    """A random 2-layer model of ``arch`` (transformers config), decoder linears IntGrid-packed (g32)."""
    import transformers

    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, **cfg_kw)
    torch.manual_seed(1)
    model = getattr(transformers, arch)(cfg).eval()
    grid = IntGrid(group_size=32)
    linears = {n: grid.pack(m.weight, m.bias) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    packed = {f"{n}.{p}" for n in linears for p in ("weight", "bias")}
    dense = {k: v.detach().half() for k, v in model.state_dict().items() if k not in packed}
    hf = json.loads(json.dumps(cfg.to_dict()))
    hf["architectures"] = [arch]
    return QuantizedModel(hf, QuantConfig(method="rtn", group_size=32), linears, dense)


def _greedy_ref(ref, prompt, n):
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch,kw", [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"tie_word_embeddings": True, "attention_bias": True}),
    ("Qwen2ForCausalLM", {}),
    ("MistralForCausalLM", {"sliding_window": 4}),
])
def test_batched_greedy_matches_reference(arch, kw):
    qm = _qm_for(arch, **kw)
    ref = reference_model(qm)
    gen = Generator(build_decoder(qm, "cpu"), max_batch=3, max_len=64)
    res = gen.generate(PROMPTS, SamplingParams(max_new_tokens=10))  # left-padded batch of 3
    with torch.no_grad():
        for p, got in zip(PROMPTS, res.tokens):
            assert got == _greedy_ref(ref, p, 10)


def test_prefill_logits_match_reference(tiny_qm):
    ref = reference_model(tiny_qm)
    dec = build_decoder(tiny_qm, "cpu")
    dec.allocate_cache(1, 32)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        got = dec(ids, torch.arange(ids.shape[1])[None], torch.tensor(0), ids.shape[1], last_only=False)
        want = ref(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def test_streaming_sampling_and_eos(tiny_qm):
    gen = Generator(build_decoder(tiny_qm, "cpu"), max_batch=2, max_len=48)
    seen: list[tuple[int, int]] = []
    p = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    a = gen.generate(PROMPTS[:2], p, stream=lambda r, t: seen.append((r, t)))
    b = gen.generate(PROMPTS[:2], p)
    assert a.tokens == b.tokens  # seeded sampling is reproducible
    assert [t for r, t in seen if r == 0] == a.tokens[0] and [t for r, t in seen if r == 1] == a.tokens[1]
    greedy = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=12)).tokens[0]
    eos = greedy[3]
    stopped = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=12, eos_token_ids=(eos,))).tokens[0]
    assert stopped == greedy[: greedy.index(eos) + 1]


def test_prefill_padded_to_more_slots_decodes_the_same(tiny_qm, monkeypatch):
    """GPU prefills of short prompts are left-padded to a graph's length (Generator.prefill_slots):
    extra left padding must not change a token; decoding then starts after the padded slots."""
    gen = Generator(build_decoder(tiny_qm, "cpu"), max_batch=2, max_len=48)
    p = SamplingParams(max_new_tokens=10)
    want = gen.generate(PROMPTS[:2], p).tokens
    monkeypatch.setattr(gen, "prefill_slots", lambda T, new: T + 13)
    assert gen.generate(PROMPTS[:2], p).tokens == want
    _, pos, slot = gen.prefill(PROMPTS[:2], 6 + 13)
    assert slot == 19 and pos.tolist() == [6, 2]  # positions count real tokens only


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7),
                                                     (2.0, 4, 0.8)])
def test_sampling_draws_the_filtered_distribution(temperature, top_k, top_p):
    """Each filter gives the distribution it names: softmax(logits / T), the top_k most probable
    kept, then the smallest most-probable set whose mass reaches top_p (the token crossing it
    kept), renormalised. 40 000 draws: empirical frequencies within 0.015 of it, nothing drawn
    outside it."""
    from awqconv.runtime.generate import _sample

    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, -1.0, 0.9, 0.0])
    want = (logits / temperature).softmax(-1)
    order = want.argsort(descending=True)
    keep = torch.zeros(8, dtype=torch.bool)
    keep[order[: top_k or 8]] = True
    want = torch.where(keep, want, 0.0) / want[keep].sum()
    mass = 0.0
    for i in order.tolist():  # nucleus over the top-k-renormalised probabilities
        if mass >= top_p:
            want[i] = 0.0
        mass += want[i].item()
    want /= want.sum()
    n = 40000
    gen = torch.Generator().manual_seed(0)
    draws = _sample(logits.expand(n, 8), SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), gen)
    freq = torch.bincount(draws, minlength=8).float() / n
    assert (freq[want == 0] == 0).all()
    assert (freq - want).abs().max().item() < 0.015, (freq, want)


def test_top_k_keeps_every_token_tied_with_the_kth():
    """top-k keeps all tokens whose logit equals the k-th largest (transformers' rule), also when the
    vocabulary is larger than what the fast path looks at (k + 8 candidates)."""
    from awqconv.runtime.generate import _sample

    logits = torch.full((20,), -1.0)
    logits[0], logits[1:5] = 3.0, 2.0  # k = 2: the k-th largest is 2.0, held by tokens 1-4
    n = 20000
    draws = _sample(logits.expand(n, 20), SamplingParams(temperature=1.0, top_k=2), torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=20).float() / n
    want = torch.zeros(20)
    want[:5] = torch.tensor([3.0, 2.0, 2.0, 2.0, 2.0]).softmax(-1)
    assert (freq[5:] == 0).all() and (freq - want).abs().max().item() < 0.015, freq[:5]


def test_runtime_lm_perplexity_equals_reference(tiny_qm):
    from awqconv.evaluate import perplexity_of_ids

    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(0))
    want = perplexity_of_ids(reference_model(tiny_qm), ids, 32, progress=False)
    got = perplexity_of_ids(RuntimeLM(build_decoder(tiny_qm, "cpu")), ids, 32, progress=False)
    assert abs(got - want) / want < 1e-5


def _gpu_paths(dec, **options) -> None:
    """Put ``dec`` (built on the CPU) on its GPU code paths, resolved from ``RuntimeOptions(**options)``
    (x16 off unless given), so that the interpreter runs them."""
    dec.paths = StepPaths.resolve(RuntimeOptions(**{"x16": False, **options}), True, dec.dtype)


@pytest.mark.parametrize("gpu_elementwise", [False, True])
def test_triton_path_in_interpreter(tiny_qm, gpu_elementwise, monkeypatch):
    """The GPU code path (fused Triton INT4 linears, fp16 activations) on the CPU interpreter; with
    ``gpu_elementwise`` also the GPU's Triton RMSNorm / SiLU-mul kernels in place of the torch ones."""
    from awqconv.kernels import norm_act

    dec = build_decoder(tiny_qm, "cpu", dtype=torch.float16, mode="triton")
    assert dec.layers[0].qkv.kw is not None and dec.layers[0].qkv.kw.splits == (64, 32, 32)
    assert not dec.paths.triton  # a CPU decoder: torch elementwise steps
    calls = []
    real = norm_act.add_rms_norm
    monkeypatch.setattr(norm_act, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    if gpu_elementwise:
        _gpu_paths(dec)
        assert dec.paths.triton
    ref = reference_model(tiny_qm)
    dec.allocate_cache(1, 32)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        got = dec(ids, torch.arange(ids.shape[1])[None], torch.tensor(0), ids.shape[1], last_only=False).float()
        want = ref(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.8
    assert len(calls) == (2 * tiny_qm.hf_config["num_hidden_layers"] if gpu_elementwise else 0)


def test_fused_qkv_rope_decode_step_in_interpreter(make_tiny_llama_qm, monkeypatch):
    """A decode step through the fused one-row kernels (QKV + RoPE + cache write, gate/up + SiLU-mul;
    head_dim 64, fp16, the interpreter) after an unfused prefill: the step's logits match the HF
    reference at that position (tolerance as above) and both kernels really ran, once per layer."""
    from awqconv.kernels import gemv_fused

    calls = []
    for name in ("qkv_rope", "gate_up_silu"):
        real = getattr(gemv_fused, name)
        monkeypatch.setattr(gemv_fused, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    qm = make_tiny_llama_qm(head_dim=64)
    dec = build_decoder(qm, "cpu", dtype=torch.float16, mode="triton")
    dec.allocate_cache(1, 32)
    ids = torch.tensor([PROMPTS[2]])
    T = ids.shape[1]
    with torch.no_grad():
        want = reference_model(qm)(ids).logits[0, -1]
        dec(ids[:, :-1], torch.arange(T - 1)[None], torch.tensor(0), T - 1)
        assert not calls  # the prefill takes the unfused path
        got = dec(ids[:, -1:], torch.tensor([[T - 1]]), torch.tensor(T - 1), T)[0, -1].float()
    n_layers = qm.hf_config["num_hidden_layers"]
    assert sorted(calls) == ["gate_up_silu"] * n_layers + ["qkv_rope"] * n_layers
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    assert got.argmax() == want.argmax()


def _kind(x) -> str:
    """What a one-row consumer was handed: an X16, a PendingNorm (of an X16 row or not), or a tensor."""
    from awqconv.kernels.pending_norm import PendingNorm
    from awqconv.kernels.x16 import X16

    if isinstance(x, PendingNorm):
        return "pending x16" if x.x16 else "pending"
    return "x16" if isinstance(x, X16) else "tensor"


def _decode_step(qm, dtype, ids, seen: list, **options):
    """The last token of ``ids`` as a decode step after an unfused prefill, on the GPU code path
    (interpreter) with ``RuntimeOptions(**options)`` (x16 off unless given): its logits (``seen``
    emptied before the step)."""
    dec = build_decoder(qm, "cpu", dtype=dtype, mode="triton")
    _gpu_paths(dec, **options)
    T = ids.shape[1]
    dec.allocate_cache(1, 16)
    with torch.no_grad():
        dec(ids[:, :-1], torch.arange(T - 1)[None], torch.tensor(0), T - 1)
        seen.clear()
        return dec(ids[:, -1:], torch.tensor([[T - 1]]), torch.tensor(T - 1), T)[0, -1]


def _record(monkeypatch, targets) -> list:
    seen = []
    for mod, name in targets:
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda x, *a, real=real, name=name, **k:
                            seen.append((name, _kind(x))) or real(x, *a, **k))
    return seen


@pytest.mark.parametrize("pending", [False, True])
def test_bf16_decode_step_hands_x16_to_the_gemvs(make_tiny_llama_qm, monkeypatch, pending):
    """A bf16 decode step on the GPU code path (interpreter) with the GEMV inputs handed over as
    X16 (kernels/x16.py): logits equal bit for bit to the same step with bf16 inputs, and X16 rows
    really reach QKV + RoPE, gate/up + SiLU and the o and down GEMVs, once per layer each (with
    ``pending`` norms: as the pending norms' rows, the o and down GEMVs in their residual merge)."""
    from awqconv.kernels import gemv_fused, ops

    seen = _record(monkeypatch, [(gemv_fused, "qkv_rope"), (gemv_fused, "gate_up_silu"), (ops, "w4_matmul"),
                                 (gemv_fused, "residual_pending_norm")])
    qm = make_tiny_llama_qm(head_dim=64, scale_dtype=torch.bfloat16)
    ids = torch.tensor([PROMPTS[0]])
    n = qm.hf_config["num_hidden_layers"]
    logits = {}
    for x16 in (False, True):
        logits[x16] = _decode_step(qm, torch.bfloat16, ids, seen, x16=x16, pending_norm=pending)
    if pending:  # layer 0's QKV after the embedding's norm kernel, the last down before the final norm
        want = ([("qkv_rope", "x16")] + [("qkv_rope", "pending x16")] * (n - 1) + [("gate_up_silu", "pending x16")] * n
                + [("residual_pending_norm", "x16")] * (2 * n - 1) + [("w4_matmul", "x16")])
    else:
        want = [("gate_up_silu", "x16"), ("qkv_rope", "x16"), ("w4_matmul", "x16")] * n + [("w4_matmul", "x16")] * n
    assert sorted(seen) == sorted(want)
    assert logits[True].dtype == torch.bfloat16 and torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_step_leaves_rmsnorm_to_the_merge_kernels(make_tiny_llama_qm, monkeypatch, dtype):
    """With pending norms (kernels/pending_norm.py) a decode step runs no add + RMSNorm kernel
    inside or between layers (only the final norm's), and its logits match the same step with the
    norm kernels and the HF reference (relative max |dlogit| < 2e-2 as above; against the norm
    kernels' step < 5e-3 for fp16, 2e-2 for bf16: the rounding of w * s instead of the normed row)."""
    from awqconv.kernels import norm_act

    qm = make_tiny_llama_qm(head_dim=64, scale_dtype=dtype)
    ids = torch.tensor([PROMPTS[2]])
    want = reference_model(qm)(ids).logits[0, -1]
    norms = _record(monkeypatch, [(norm_act, "add_rms_norm")])
    logits = {}
    for pending in (False, True):
        logits[pending] = _decode_step(qm, dtype, ids, norms, pending_norm=pending).float()
        assert len(norms) == (1 if pending else 2 * qm.hf_config["num_hidden_layers"])
    got, base = logits[True], logits[False]
    assert not torch.equal(got, base)  # a different rounding: the pending path really ran
    assert ((got - base).abs().max() / base.abs().max()).item() < (5e-3 if dtype == torch.float16 else 2e-2)
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    assert got.argmax() == want.argmax() == base.argmax()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_step_prologue_kernel(make_tiny_llama_qm, monkeypatch, dtype):
    """A decode step on the GPU code path (interpreter) builds its mask, RoPE rows and embedding in
    one kernel (kernels/decode_prologue.py), which really runs once, and gives the same logits bit
    for bit as the same step with the torch construction."""
    from awqconv.kernels import decode_prologue as mod

    calls = []
    real = mod.decode_prologue
    monkeypatch.setattr(mod, "decode_prologue", lambda *a, **k: calls.append(1) or real(*a, **k))
    qm = make_tiny_llama_qm(head_dim=64, scale_dtype=dtype)
    ids = torch.tensor([PROMPTS[2]])  # a prefill of several tokens, then the step
    logits = {p: _decode_step(qm, dtype, ids, [], decode_prologue=p) for p in (False, True)}
    assert len(calls) == 1
    assert torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_step_head_gemv(make_tiny_llama_qm, monkeypatch, dtype):
    """A one-row decode step on the GPU code path (interpreter) computes its logits with the Triton
    lm_head GEMV (kernels/dense_gemv.py), which really runs (for the prefill's last row and the
    step: twice); they match the cuBLAS-path step
    (``F.linear``) to an output rounding (relative max |dlogit| < 1e-2) with the same argmax."""
    from awqconv.kernels import dense_gemv as mod

    calls = []
    real = mod.dense_gemv
    monkeypatch.setattr(mod, "dense_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    qm = make_tiny_llama_qm(head_dim=64, scale_dtype=dtype)
    ids = torch.tensor([PROMPTS[2]])
    logits = {h: _decode_step(qm, dtype, ids, [], head_gemv=h).float() for h in (False, True)}
    assert len(calls) == 2
    got, base = logits[True], logits[False]
    assert ((got - base).abs().max() / base.abs().max()).item() < 1e-2
    assert got.argmax() == base.argmax()


def test_clear_errors(tiny_qm):
    bad = QuantizedModel({**tiny_qm.hf_config, "architectures": ["GPT2LMHeadModel"]}, tiny_qm.quant_config,
                         tiny_qm.linears, tiny_qm.dense)
    with pytest.raises(UnsupportedArchitecture, match="supported"):
        build_decoder(bad, "cpu")
    gen = Generator(build_decoder(tiny_qm, "cpu"), max_batch=1, max_len=16)
    with pytest.raises(InputError, match="exceeds the cache"):
        gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20))
    with pytest.raises(InputError, match="1..1"):
        gen.generate([[1], [2]], SamplingParams(max_new_tokens=2))
