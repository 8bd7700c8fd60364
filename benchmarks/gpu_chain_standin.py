"""What one kernel boundary costs a decode step, and whether completion counters beat PDL's wait.

Every decode-step kernel (launch.py) is launched with programmatic dependent launch and calls
``griddepcontrol.wait`` before reading its predecessor's output: the wait returns only once the
whole previous grid has exited and its memory is flushed. Run BQ put ~1.8 us in the chain on each
small kernel. This script times a stand-in of the decode step's kernel chain (no arithmetic, the
real byte volumes of a Llama-2-7B layer at 2048 context, distinct weights per layer) with four ways
for a kernel to wait for the one before:
  plain  - no PDL: each kernel starts when the previous one has finished;
  pdl    - PDL, constants read before ``griddepcontrol.wait`` (what the runtime does now);
  flag   - PDL-scheduled, but no ``griddepcontrol.wait``: every program of the previous kernel adds
           one to a completion counter (release, after its stores) and each program here spins on
           it (acquire) until all have;
  fine   - the same with one counter per group of programs: each program waits only for the
           programs of the kernel before that share its group (as a merge program needs only its
           columns' split-K programs), so a slow program no longer holds up the whole next kernel.
The chain per layer: GEMV(qkv) -> merge(96 programs) -> attention(1024 programs x 32 KB) -> finish(32)
-> GEMV(o) -> merge -> GEMV(gate_up) -> merge -> GEMV(down) -> merge; GEMVs read the shape's words
over one wave of 16 programs per SM (2 KB chunks, the first before the wait). Counters are zeroed
once per step. Also a chain of small kernels only (the per-boundary latency with nothing else).
Then, with PDL, the layer with one structural change at a time (``--variants``): GEMVs reading more
of their slice before the wait, the attention reading before it, kernels left out. ``no_finish`` is
the runtime's own structure (its attention merges its slices in the last program of each head).
The stand-in kernels hold few registers, so unlike the real ones, two of them fit on an SM at once:
a gain from reading before the wait here is an upper bound for kernels that fill the register file.
Usage: python benchmarks/gpu_chain_standin.py [--layers 32] [--modes plain,pdl,flag,fine] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpu_kernels import run_info, time_graph

from awqconv.kernels.launch import gdc_launch_dependents, gdc_wait

MODES = {"plain": 0, "pdl": 1, "flag": 2, "fine": 3}
CHUNK = tl.constexpr(512)  # int32 words per load of a GEMV stand-in program (2 KB, as the real GEMV's chunk)


@triton.jit
def _spin(cnt_ptr, target):
    """Wait until the counter at ``cnt_ptr`` reaches ``target`` (acquire: the counted programs'
    stores are visible to this program's later loads; those loads bypass L1)."""
    c = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    while c < target:
        c = tl.atomic_add(cnt_ptr, 0, sem="acquire")


@triton.jit
def link_kernel(w_ptr, in_ptr, out_ptr, cnt_in_ptr, cnt_out_ptr, n_in, P_IN, G_IN, G_OUT,
                W_CHUNKS: tl.constexpr, EARLY: tl.constexpr, IN_PER: tl.constexpr, MODE: tl.constexpr,
                HOLD: tl.constexpr = False, EARLY_P2: tl.constexpr = 1):
    """One kernel of the chain: W_CHUNKS chunks of constant words (EARLY of them before the wait),
    IN_PER values of the previous kernel's output after it, one value stored. ``HOLD``: the early
    chunks stay in registers until after the wait (as a real GEMV's words must: it needs x to use
    them); otherwise they are folded at once (what a copy into shared memory would cost: nothing)."""
    pid = tl.program_id(0)
    if MODE > 0:
        gdc_launch_dependents()
    acc = tl.zeros((CHUNK,), dtype=tl.int32)
    wp = w_ptr + pid * (W_CHUNKS * CHUNK) + tl.arange(0, CHUNK)
    if HOLD:
        rc = tl.arange(0, EARLY_P2)
        early = tl.load(wp[None, :] + rc[:, None] * CHUNK, mask=(rc < EARLY)[:, None], other=0,
                        eviction_policy="evict_first")
    else:
        for c in tl.static_range(EARLY):
            acc ^= tl.load(wp + c * CHUNK, eviction_policy="evict_first")
    if MODE == 1:
        gdc_wait()
    elif MODE == 2:
        _spin(cnt_in_ptr, P_IN)
    elif MODE == 3:
        g = pid % G_IN  # producers p with p % G_IN == g: P_IN // G_IN, one more for the first P_IN % G_IN
        _spin(cnt_in_ptr + g, P_IN // G_IN + (g < P_IN % G_IN).to(tl.int32))
    r = tl.arange(0, IN_PER)
    v = tl.load(in_ptr + (pid * IN_PER + r) % n_in, cache_modifier=".cg")
    if HOLD:  # used only with the input: the registers stay live across the wait
        acc ^= tl.xor_sum(early ^ tl.max(v, axis=0).to(tl.int32), axis=0)
    for c in tl.static_range(EARLY, W_CHUNKS):
        acc ^= tl.load(wp + c * CHUNK, eviction_policy="evict_first")
    tl.store(out_ptr + pid, tl.sum(v, axis=0) + tl.xor_sum(acc, axis=0).to(tl.float32) * 0.0)
    if MODE >= 2:
        tl.debug_barrier()  # every thread's store is issued before the release below
        if MODE == 2:
            tl.atomic_add(cnt_out_ptr, 1, sem="release")
        else:
            tl.atomic_add(cnt_out_ptr + pid % G_OUT, 1, sem="release")


def layer_links(n_sm: int) -> list[dict]:
    """One decode layer's kernels: programs, chunks of words per program, chunks read before the
    wait, values read from the kernel before."""
    wave = 16 * n_sm

    def gemv(name, k, n):
        words = k * n // 8 + k * n // 128 * 3 // 4  # the words plus fp16 scales and uint8 zeros (group 128)
        chunks = triton.cdiv(triton.cdiv(words, wave), CHUNK.value)
        return {"name": name, "p": wave, "w": chunks, "early": 1, "per": 64}

    def small(name, p, per):
        return {"name": name, "p": p, "w": 0, "early": 0, "per": per}

    return [gemv("qkv", 4096, 12288), small("rope_merge", 96, 256),
            {"name": "attention", "p": 1024, "w": 8192 // CHUNK.value, "early": 0, "per": 128},
            small("attn_finish", 32, 128),
            gemv("o", 4096, 4096), small("residual_merge", 16, 256),
            gemv("gate_up", 4096, 22016), small("silu_merge", 86, 256),
            gemv("down", 11008, 4096), small("residual_merge", 16, 256)]


def variant(links: list[dict], name: str) -> list[dict]:
    """The layer with one structural change (``name``; see main's help)."""
    out = []
    for d in links:
        d = dict(d)
        gemv = d["w"] and d["name"] != "attention"
        if name == "pre_all" and gemv:
            d["early"] = d["w"]  # the whole slice before the wait, folded at once (shared-memory-like)
        elif name.startswith("pre_reg") and gemv:
            d["early"], d["hold"] = min(d["w"], int(name[7:])), True
        elif name == "attn_early" and d["name"] == "attention":
            d["early"] = d["w"]
        elif ((name == "no_merge" and not d["w"] and d["name"] != "attn_finish")
              or (name == "no_finish" and d["name"] == "attn_finish")):
            continue
        out.append(d)
    return out


def build_chain(links: list[dict], layers: int, mode: int, dev) -> tuple:
    """Buffers and a closure launching ``layers`` copies of ``links`` (distinct words per layer)."""
    total = sum(d["p"] * d["w"] * CHUNK.value for d in links)
    words = torch.randint(-2**31, 2**31 - 1, (layers * total + CHUNK.value,), dtype=torch.int32, device=dev)
    n_k = layers * len(links)
    outs = [torch.empty(links[i % len(links)]["p"], device=dev) for i in range(n_k)]
    g_max = max(d["p"] for d in links)
    cnt = torch.zeros(n_k + 1, g_max, dtype=torch.int32, device=dev)
    seed = torch.arange(4096, device=dev, dtype=torch.float32).sin()
    pdl = {"launch_pdl": True} if mode > 0 else {}

    def step():
        cnt.zero_()
        cnt[0].fill_(1 << 20)  # the first kernel's predecessor: already done
        off, prev, p_prev = 0, seed, 1
        for i in range(n_k):
            d = links[i % len(links)]
            p, w = d["p"], d["w"]
            g_in = min(p_prev, p)
            g_out = min(p, links[(i + 1) % len(links)]["p"])
            link_kernel[(p,)](words[off:], prev, outs[i], cnt[i], cnt[i + 1], prev.numel(), p_prev if i else 1,
                              g_in if i else 1, g_out, W_CHUNKS=w, EARLY=d["early"], IN_PER=d["per"], MODE=mode,
                              HOLD=d.get("hold", False), EARLY_P2=triton.next_power_of_2(max(1, d["early"])),
                              num_warps=2 if w and p > 1024 else 4 if w else 1, **pdl)
            off += p * w * CHUNK.value
            prev, p_prev = outs[i], p

    return step, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--modes", default="plain,pdl,flag,fine")
    ap.add_argument("--variants", default="pre_all,pre_reg2,pre_reg4,attn_early,no_merge,no_finish",
                    help="layer chains with one change, PDL: pre_all (every GEMV's whole slice read before the "
                         "wait, folded at once), pre_regN (N chunks before the wait, held in registers), "
                         "attn_early (the attention's reads before the wait), no_merge / no_finish (those "
                         "kernels left out)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    refs: dict = {}
    dev = torch.device("cuda")
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    res = run_info(layers=a.layers, n_sm=n_sm, results={})
    base = layer_links(n_sm)
    runs = [("small", [{"name": "small", "p": 64, "w": 0, "early": 0, "per": 256}] * 10, m) for m in a.modes.split(",")]
    runs += [("layer", base, m) for m in a.modes.split(",")]
    runs += [(v, variant(base, v), "pdl") for v in a.variants.split(",") if v]
    for cname, links, mname in runs:
        step, outs = build_chain(links, a.layers, MODES[mname], dev)
        us = time_graph(step, 1)[0]  # us per replay of the whole step (median)
        step()
        torch.cuda.synchronize()
        got = torch.cat([o.flatten() for o in outs])
        key = (cname if cname == "small" else "layer", len(links))
        same = bool(torch.equal(got, refs[key])) if key in refs else None  # a race would show here
        refs.setdefault(key, got)
        per = us / (a.layers * len(links))
        res["results"][f"{cname}/{mname}"] = {"us_step": us, "us_per_kernel": per, "kernels_per_layer": len(links),
                                              "same_as_first": same}
        print(f"{cname:10s} {mname:6s} {us:9.1f} us/step  {us / a.layers:6.2f} us/layer  {per:6.2f} us/kernel"
              f"  same={same}", flush=True)
        del step, outs
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "gpu_chain_standin.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
