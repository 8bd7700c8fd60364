"""The GPU code path of every registry family, run by the Triton interpreter on the CPU: INT4 weights
in the kernel layout, fp16 activations (bf16 with X16 rows for some), the decode step through the
fused one-row chain (decode_chain.py) with the decode prologue, pending norms and the Triton
lm_head GEMV, MoE layers through the grouped expert kernels (kernels/moe.py).

A prefill (the unfused path) then one decode step; the step's logits against the fp32 transformers
reference at that position: relative max |dlogit| within 1e-2 (fp16) or 4e-2 (bf16: the reference
itself run in bf16 deviates up to 1.9e-2 on the Gemma 3 model here) and the same argmax. The
configs are test_families.VARIANTS: windows shorter than the prompt, soft-caps, partial rotary.
"""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels import moe as moe_kernels
from awqconv.kernels.experts import ExpertLinear
from awqconv.reference import reference_model
from awqconv.runtime.layer_ops import StepPaths
from awqconv.runtime.model import build_decoder
from awqconv.runtime.options import RuntimeOptions
from tests.runtime.family_models import family_qm
from tests.runtime.test_families import PROMPTS, VARIANTS
from tests.tiny_models import TINY_ARCHS

TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _gpu_decoder(qm, dtype, x16=False):
    dec = build_decoder(qm, "cpu", dtype=dtype, mode="triton")
    dec.paths = StepPaths.resolve(RuntimeOptions(x16=x16), True, dtype)  # the GPU paths, in the interpreter
    return dec


def _record(monkeypatch, mod, name, seen):
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, **k: seen.append(name) or real(*a, **k))


@pytest.mark.parametrize("arch,dtype", [(a, torch.float16) for a in sorted(TINY_ARCHS)] + [
    (a, torch.bfloat16) for a in ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Qwen3MoeForCausalLM")])
def test_decode_step_on_the_gpu_path(arch, dtype, monkeypatch):
    qm = family_qm(arch, scale_dtype=dtype, **VARIANTS.get(arch, {}))
    ids = torch.tensor([PROMPTS[2]])
    T = ids.shape[1]
    with torch.no_grad():
        want = reference_model(qm)(ids).logits[0, -1]
    dec = _gpu_decoder(qm, dtype, x16=dtype == torch.bfloat16)
    assert dec.layers[0].qkv.kw is not None
    seen: list[str] = []
    _record(monkeypatch, moe_kernels, "moe_experts", seen)
    _record(monkeypatch, ExpertLinear, "expert", seen)
    dec.allocate_cache(1, 16)
    with torch.no_grad():
        dec(ids[:, :-1], torch.arange(T - 1)[None], torch.tensor(0), T - 1)
        seen.clear()
        got = dec(ids[:, -1:], torch.tensor([[T - 1]]), torch.tensor(T - 1), T)[0, -1].float()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < TOL[dtype], rel
    assert got.argmax() == want.argmax()
    sparse = sum(dec.spec.moe.sparse) if dec.spec.moe else 0
    assert seen == ["moe_experts"] * sparse  # each MoE layer: one grouped call, no per-expert loop


def test_moe_batched_decode_on_the_gpu_path():
    """Two rows decoding together (T = 1, B = 2: the general layer path a batched decode graph
    captures): 4 (token, expert) pairs per layer through the grouped kernels; each row's step
    logits against the reference run on that row's prompt alone."""
    qm = family_qm("Qwen3MoeForCausalLM")
    dec = _gpu_decoder(qm, torch.float16)
    ref = reference_model(qm)
    from awqconv.runtime.generate import Generator

    gen = Generator(dec, max_batch=2, max_len=16)
    prompts = [PROMPTS[0], PROMPTS[2][:8]]
    _, pos, slot = gen.prefill(prompts)
    nxt = [3, 4]
    logits, _ = gen.step(torch.tensor(nxt), pos, slot)
    with torch.no_grad():
        for row, (p, t) in enumerate(zip(prompts, nxt)):
            want = ref(torch.tensor([p + [t]])).logits[0, -1]
            got = logits[row].float()
            assert ((got - want).abs().max() / want.abs().max()).item() < TOL[torch.float16]
            assert got.argmax() == want.argmax()
