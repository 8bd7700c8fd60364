"""GPU correctness of the runtime on every registry family (compiled kernels, CUDA graphs):

    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/gpu/test_families_gpu.py

Small random models of each family (tests/runtime/family_models.py, with the configs of
tests/runtime/test_families.py that make windows, soft-caps, partial rotary and local/global RoPE
act) decode with the runtime and must agree with the fake-quant transformers reference in fp32 on the
GPU: logits within the tolerance ``awqconv verify`` uses, greedy tokens of a batch of two and of one
prompt alone identical or diverging only at a reference near-tie. The grouped MoE GEMV's inline PTX
must give its plain-Triton emulation's bits (the CPU tests run only the emulation). Without CUDA
every test here is skipped by tests/conftest.py with the reason.
"""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels import moe
from awqconv.kernels.experts import ExpertLinear
from awqconv.reference import reference_model
from awqconv.runtime.generate import Generator, SamplingParams
from awqconv.runtime.model import build_decoder
from tests.runtime.family_models import family_qm
from tests.runtime.test_families import VARIANTS
from tests.tiny_models import TINY_ARCHS

pytestmark = pytest.mark.gpu

REL_TOL = {torch.float16: 3e-2, torch.bfloat16: 6e-2}  # as awqconv verify
PROMPTS = [[1, 5, 9, 33, 2, 7, 7, 11, 12, 13], [100, 3, 4]]
NEW = 24


@pytest.fixture(scope="module", params=[(a, d) for a in sorted(TINY_ARCHS) for d in (torch.float16, torch.bfloat16)],
                ids=lambda p: f"{p[0]}-{str(p[1])[6:]}")
def case(request):
    arch, dt = request.param
    qm = family_qm(arch, scale_dtype=dt, **VARIANTS.get(arch, {}))
    return qm, reference_model(qm, dtype=torch.float32).cuda(), build_decoder(qm, "cuda")


def test_logits_match_the_reference(case) -> None:
    qm, ref, dec = case
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    dec.allocate_cache(2, 64)
    with torch.no_grad():
        ours = dec(ids, torch.arange(ids.shape[1], device="cuda")[None], torch.tensor(0, device="cuda"),
                   ids.shape[1], last_only=False).float()
        want = ref(ids).logits.float()
    assert ((ours - want).abs().max() / want.abs().max()).item() <= REL_TOL[qm.dtype]


def test_greedy_tokens_match_the_reference(case) -> None:
    qm, ref, dec = case
    for prompts, batch in ((PROMPTS, 2), (PROMPTS[:1], 1)):
        got = Generator(dec, max_batch=batch, max_len=64).generate(prompts, SamplingParams(max_new_tokens=NEW)).tokens
        for p, ours in zip(prompts, got):
            want = ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW, min_new_tokens=NEW,
                                do_sample=False)[0, len(p):].tolist()
            i = next((j for j, (a, b) in enumerate(zip(ours, want)) if a != b), None)
            if i is None:
                continue
            with torch.no_grad():
                lg = ref(torch.tensor([p + want[:i]], device="cuda")).logits[0, -1].float()
            margin = (lg[want[i]] - lg[ours[i]]) / lg.abs().max()
            assert margin <= REL_TOL[qm.dtype], (batch, p, i, float(margin))


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_grouped_moe_gemv_ptx_matches_its_emulation(dt, monkeypatch) -> None:
    from tests.conftest import random_packed

    E, H, inter, g = 8, 1024, 512, 128
    gu = [[random_packed(inter, H, g, dtype=dt, seed=3 * e), random_packed(inter, H, g, dtype=dt, seed=3 * e + 1)]
          for e in range(E)]
    dn = [[random_packed(H, inter, g, dtype=dt, seed=3 * e + 2)] for e in range(E)]
    gate_up = ExpertLinear.from_packed(gu, device="cuda", dtype=dt, mode="triton")
    down = ExpertLinear.from_packed(dn, device="cuda", dtype=dt, mode="triton")
    h = torch.randn(3, H, device="cuda").to(dt)
    ids, w = moe.moe_route(torch.randn(3, E, device="cuda").to(dt), 2, True)
    y = moe.moe_experts(h, ids, w, gate_up, down)
    monkeypatch.setattr(moe, "PTX", False)  # the same launches with the plain-Triton emulation
    assert torch.isfinite(y).all() and torch.equal(y, moe.moe_experts(h, ids, w, gate_up, down))
