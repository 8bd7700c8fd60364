"""Temperature / nucleus (top-p) sampling in one Triton kernel: no sort of the vocabulary.

One program per row. It finds the softmax normaliser, then draws a token by the Gumbel-max race
(argmax of logit / T + Gumbel noise, Philox keyed by the row's seed), restricted to candidates above
a pivot. Token j belongs to the nucleus iff the probability mass of the tokens strictly more probable
than j is below top_p (the token that crosses top_p is kept). An accepted draw is returned; a rejected
one raises the pivot to its logit, which drops only tokens outside the nucleus, and the race runs
again. Each race draws from the probabilities restricted to a superset of the nucleus, so the
accepted token follows them renormalised over the nucleus exactly; the first race is accepted with
probability >= top_p, and the most probable token is always accepted, so the loop ends.

Against the sort-based torch path (runtime/generate.py) this is 2 launches per step instead of ~10,
and a few passes over the logits instead of a full sort (docs/design.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _scaled(base, c, offs, V, inv_t):
    """One block of logits / T in fp32 (-inf past the end)."""
    i = c + offs
    return tl.load(base + i, mask=i < V, other=float("-inf")).to(tl.float32) * inv_t


@triton.jit
def _uniforms(seed, first, BLOCK: tl.constexpr):
    """BLOCK uniforms in [0, 1) from BLOCK / 4 Philox calls (four words each) at offsets first + i."""
    r0, r1, r2, r3 = tl.randint4x(seed, first + tl.arange(0, BLOCK // 4))
    u = tl.join(tl.join(tl.random.uint_to_uniform_float(r0), tl.random.uint_to_uniform_float(r1)),
                tl.join(tl.random.uint_to_uniform_float(r2), tl.random.uint_to_uniform_float(r3)))
    return tl.reshape(u, (BLOCK,))


@triton.jit
def nucleus_sample_kernel(logits_ptr, seed_ptr, out_ptr, V, stride, inv_t, top_p,
                          NUCLEUS: tl.constexpr, BLOCK: tl.constexpr, MAX_ROUNDS: tl.constexpr = 256):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    seed = tl.load(seed_ptr + row)
    offs = tl.arange(0, BLOCK)
    # the softmax's max and normaliser in one pass (the running sum rescaled when the max grows)
    sl = _scaled(base, 0, offs, V, inv_t)
    m = tl.max(sl, 0)
    z = tl.sum(tl.exp(sl - m), 0)
    for c in range(BLOCK, V, BLOCK):
        sl = _scaled(base, c, offs, V, inv_t)
        m_new = tl.maximum(m, tl.max(sl, 0))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(sl - m_new), 0)
        m = m_new
    pivot = float("-inf")  # candidates: logit / T > pivot
    tok = -1
    if not z > 0.0:  # NaN or all -inf logits: no distribution to draw from (and no loop that could end)
        tok = 0
    r = 0
    calls = tl.cdiv(V, BLOCK) * (BLOCK // 4)  # Philox calls per race
    while tok < 0:
        best = float("-inf")
        best_i = 0
        for c in range(0, V, BLOCK):
            sl = _scaled(base, c, offs, V, inv_t)
            u = _uniforms(seed, r * calls + c // 4, BLOCK)
            g = tl.where(sl > pivot, sl - tl.log(-tl.log(u)), float("-inf"))
            cm = tl.max(g, 0)
            ci = tl.argmax(g, 0)
            best_i = tl.where(cm > best, c + ci, best_i)
            best = tl.maximum(best, cm)
        if NUCLEUS:
            lj = tl.load(base + best_i).to(tl.float32) * inv_t
            above = 0.0  # the mass strictly more probable than the draw
            for c in range(0, V, BLOCK):
                sl = _scaled(base, c, offs, V, inv_t)
                above += tl.sum(tl.where(sl > lj, tl.exp(sl - m), 0.0), 0)
            if above < top_p * z:
                tok = best_i
            else:
                pivot = lj
        else:
            tok = best_i
        r += 1
        if r >= MAX_ROUNDS:  # each race rejects with probability <= 1 - top_p: never reached in practice
            tok = best_i
    tl.store(out_ptr + row, tok.to(tl.int64))


def nucleus_sample(logits: Tensor, temperature: float, top_p: float, seeds: Tensor,
                   block: int | None = None, num_warps: int | None = None) -> Tensor:
    """Token ids [B] drawn from softmax(logits [B, V] / temperature), restricted to the top-p
    nucleus when ``top_p < 1``; ``seeds`` int32/int64 [B] key each row's Philox stream. ``block``:
    logits per loop step (default V rounded up to a power of two, at most 16 384). Rows of NaN or
    all -inf logits return token 0."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        logits = logits.reshape(-1, logits.shape[-1]).contiguous()
    if temperature <= 0 or not 0 < top_p:
        raise ValueError(f"nucleus_sample needs temperature > 0 and top_p > 0, got {temperature}, {top_p}")
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    block = block or max(4, min(triton.next_power_of_2(V), 16384))
    num_warps = num_warps or max(1, min(32, block // 512))  # H100 sweep: 16384 x 32 warps
    nucleus_sample_kernel[(B,)](logits, seeds, out, V, logits.stride(0), 1.0 / temperature, float(top_p),
                                NUCLEUS=top_p < 1.0, BLOCK=block, num_warps=num_warps)
    return out


def nucleus_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The distribution ``nucleus_sample`` draws from, for one row ``logits [V]`` (a slow torch
    reference for tests and benchmarks): softmax(logits / T) on the most probable tokens until their
    mass reaches top_p (the one crossing it kept), renormalised; zero elsewhere."""
    p = (logits.float() / temperature).softmax(-1).cpu()
    want = torch.zeros_like(p)
    mass = 0.0
    for i in p.argsort(descending=True).tolist():
        if mass >= top_p:
            break
        want[i] = p[i]
        mass += p[i].item()
    return want / want.sum()

