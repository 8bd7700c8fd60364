"""GPU correctness of the runtime, run on a CUDA machine with the compiled kernels:

    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu

Tiny random Llama / Qwen2-style models decode with awqconv's runtime (Triton INT4 linears, CUDA
graphs) and must agree with the fake-quant transformers reference on the GPU, for a batch of two
prompts and for one prompt alone (the one-row decode kernels); the transposed tile's inline-asm
dequantisation and the one-row fp16x2 GEMV's inline PTX are checked bit for bit (the CPU tests can
only run their plain-Triton emulation); streaming with an EOS and seeded GPU sampling are checked.
Without CUDA (CI) every test here is skipped by tests/conftest.py with the reason.
"""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels.config import KernelConfig
from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.ops import plan_matmul, w4_matmul
from awqconv.packed import PackedLinear
from awqconv.reference import reference_model
from awqconv.runtime.generate import Generator, SamplingParams
from awqconv.runtime.model import build_decoder

pytestmark = pytest.mark.gpu

# runtime vs reference logits, relative to max |reference logit| (as awqconv verify uses)
REL_TOL = {torch.float16: 3e-2, torch.bfloat16: 6e-2}
PROMPTS = [[1, 5, 9, 33, 2, 7, 7], [100, 3, 4]]
NEW = 40
# head_dim 64: one-row steps take the fused QKV + RoPE kernel (fp16, and bf16 through x / 16)
CASES = [dict(group_size=32), dict(group_size=64, attention_bias=True), dict(group_size=32, scale_dtype=torch.bfloat16),
         dict(group_size=32, head_dim=64), dict(group_size=32, head_dim=64, scale_dtype=torch.bfloat16)]


def _random_packed(g: torch.Generator, n: int, k: int, group: int, dt: torch.dtype) -> PackedLinear:
    return PackedLinear(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
                        (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).to(dt),
                        torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=g), k, group)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_tile_t_asm_dequantisation_is_exact(dt) -> None:
    """One-hot rows of x pick rows of W: the asm's (q - z) * s is rounded once, one product per output."""
    g = torch.Generator().manual_seed(0)
    n, k, group = 200, 1024, 128
    p = _random_packed(g, n, k, group, dt)
    kw = KernelWeight.from_packed(p).to("cuda")
    w = p.dequantize(dt).t().cuda()
    for k0 in range(0, k, 16 * 7):
        ks = torch.arange(k0, k0 + 16 * 7, 7).clamp(max=k - 1).cuda()
        x = torch.zeros(16, k, dtype=dt, device="cuda")
        x[torch.arange(16), ks] = 1
        for cfg in (KernelConfig("tile_t", 16, 64, 64, -8, 4, 1, prefetch=1),
                    KernelConfig("tile_t", 16, 128, 128, 3, 8, 1, prefetch=0)):
            assert torch.equal(w4_matmul(x, kw, cfg), w[ks]), (k0, cfg)


# largest |x| ~ 4.5 amp: bf16 1e5 is past fp16's range; fp16 2e3 keeps outputs (~1e5 |x| s) in fp16
@pytest.mark.parametrize(("dt", "amps"), [(torch.float16, (1.0, 1e-3, 2e3)), (torch.bfloat16, (1.0, 1e-3, 1e5))])
@pytest.mark.parametrize(("n", "k", "group"), [(200, 1024, 128), (4096, 4096, 128), (96, 11008, 64)])
def test_one_row_gemv_ptx_matches_its_emulation_bit_for_bit(dt, amps, n, k, group) -> None:
    g = torch.Generator().manual_seed(1)
    kw = KernelWeight.from_packed(_random_packed(g, n, k, group, dt)).to("cuda")
    cfg = KernelConfig("gemv_f16x2", 1, 64, 64, -16, 2, 2)
    for amp in amps:
        x = (torch.randn(1, k, generator=g) * amp).to(dt).cuda()
        y = w4_matmul(x, kw, cfg)
        emul = plan_matmul(x, kw, cfg)
        assert emul.meta["USE_ASM"]
        emul.meta["USE_ASM"] = False  # the same launch with the plain-Triton emulation
        assert torch.isfinite(y).all() and torch.equal(y, emul()), amp


@pytest.fixture(scope="module", params=range(len(CASES)), ids=lambda i: ",".join(f"{k}={v}" for k, v in CASES[i].items()))
def case(request, make_tiny_llama_qm):
    qm = make_tiny_llama_qm(**CASES[request.param])
    return qm, reference_model(qm, dtype=torch.float32).cuda(), build_decoder(qm, "cuda")


def _greedy(dec, prompts: list[list[int]], batch: int) -> list[list[int]]:
    return Generator(dec, max_batch=batch, max_len=256).generate(prompts, SamplingParams(max_new_tokens=NEW)).tokens


def test_logits_match_the_reference(case) -> None:
    qm, ref, dec = case
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    dec.allocate_cache(2, 256)
    with torch.no_grad():
        ours = dec(ids, torch.arange(ids.shape[1], device="cuda")[None], torch.tensor(0, device="cuda"),
                   ids.shape[1], last_only=False).float()
        want = ref(ids).logits.float()
    assert ((ours - want).abs().max() / want.abs().max()).item() <= REL_TOL[qm.dtype]


def test_greedy_tokens_match_the_reference(case) -> None:
    """A batch of two, then one row alone (one-row kernels): identical tokens, or a first divergence
    where the reference itself ranks our token second within the logit tolerance (a near-tie)."""
    qm, ref, dec = case
    for prompts, batch in ((PROMPTS, 2), (PROMPTS[:1], 1)):
        for p, ours in zip(prompts, _greedy(dec, prompts, batch)):
            want = ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW, min_new_tokens=NEW,
                                do_sample=False)[0, len(p):].tolist()
            i = next((j for j, (a, b) in enumerate(zip(ours, want)) if a != b), None)
            if i is None:
                continue
            with torch.no_grad():
                lg = ref(torch.tensor([p + want[:i]], device="cuda")).logits[0, -1].float()
            margin = (lg[want[i]] - lg[ours[i]]) / lg.abs().max()
            assert margin <= REL_TOL[qm.dtype], (batch, p, i, float(margin))


def test_streamed_decoding_with_eos_returns_the_same_tokens(case) -> None:
    _, _, dec = case
    one = _greedy(dec, PROMPTS[:1], 1)[0]
    eos = one[20]
    seen: list[int] = []
    st = Generator(dec, max_batch=1, max_len=256).generate(
        PROMPTS[:1], SamplingParams(max_new_tokens=NEW, eos_token_ids=(eos,)), stream=lambda r, t: seen.append(t))
    want = one[: one.index(eos) + 1]
    assert st.tokens[0] == want and seen == want


def test_seeded_gpu_sampling(case) -> None:
    """A seed repeats its draws, the stream carries them, another seed differs, and a nucleus of one
    token (top-p 1e-6) decodes greedily."""
    _, _, dec = case
    greedy = _greedy(dec, PROMPTS[:1], 1)[0]
    gen = Generator(dec, max_batch=1, max_len=256)
    sp = SamplingParams(max_new_tokens=NEW, temperature=0.8, top_p=0.9, seed=7)
    seen: list[int] = []
    s1 = gen.generate(PROMPTS[:1], sp, stream=lambda r, t: seen.append(t)).tokens[0]
    assert gen.generate(PROMPTS[:1], sp).tokens[0] == s1 and seen == s1
    other = SamplingParams(max_new_tokens=NEW, temperature=0.8, top_p=0.9, seed=8)
    assert gen.generate(PROMPTS[:1], other).tokens[0] != s1
    narrow = SamplingParams(max_new_tokens=NEW, temperature=0.8, top_p=1e-6, seed=7)
    got = gen.generate(PROMPTS[:1], narrow).tokens[0]
    i = next((j for j, (a, b) in enumerate(zip(got, greedy)) if a != b), None)
    if i is not None:  # only a tie of the runtime's own top two logits may keep both in the nucleus:
        # re-scored here by a prefill, they may differ by one step of the logits' dtype (a bf16
        # step is up to 2^-7 of the value)
        logits, _, _ = gen.prefill([PROMPTS[0] + greedy[:i]])
        top2 = logits[0].float().topk(2)
        assert {got[i], greedy[i]} == set(top2.indices.tolist()), i
        assert (top2.values[0] - top2.values[1]) <= top2.values[0].abs() * 2.0 ** -7, (i, top2.values.tolist())
