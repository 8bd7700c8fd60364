"""How fast can one kernel read a linear's INT4 bytes at all? The floor under the M = 1 GEMV.

For each Llama-2-7B linear shape, under the protocol of gpu_kernels.py (CUDA-graph replays over
>= 400 MB of distinct weights, median), time three things over the same packed words:
  stream  - a flat read of the words as 16-byte vectors, 8 KB per program (the best case);
            stream_pdl the same launched with PDL, words read before the wait (overlapping the
            kernel before, as a dependent kernel may); two other shapes: stream_loop (16
            programs/SM striding, two blocks in flight) and stream_big (32 KB per program, 8 warps),
  words   - the GEMV's grid, tile and chunking over the words only (no scales, zeros, activations),
  tiles   - the GEMV's own access pattern (default grid, tile and chunking) with no arithmetic,
  gemv    - the real fp16x2 GEMV (default config: split-K partials summed by a second, merge
            kernel); gemv_ticket the same with the merge in each tile's last program (a fence and
            a ticket per program; the default before run BJ); gemv_partials without any merge.
If ``tiles`` ~ ``gemv``, the GEMV is bound by how it reads; if ``stream`` ~ ``tiles``, by the read
volume and the per-kernel cost of this protocol. Usage: python benchmarks/gpu_read_floor.py
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from awqconv.kernels.launch import pdl_launch, pdl_start, pdl_wait  # noqa: E402
from awqconv.kernels.ops import _n_sm, default_config, w4_matmul  # noqa: E402
from awqconv.kernels.triton_w4 import _gemv_f16x2_load_wsz, gemv_f16x2_slice  # noqa: E402
from gpu_kernels import SHAPES, G, distinct_kernel_weights, time_graph  # noqa: E402

DEV = torch.device("cuda")


@triton.jit
def stream_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(w_ptr + r, mask=r < n, other=0, eviction_policy="evict_first")
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(v, axis=0))


@triton.jit
def stream_pdl_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """The flat read as a dependent kernel can do it under programmatic dependent launch: the next
    kernel may be scheduled at once, the words (constants) are read before waiting for the kernel
    before, only the store after: the least any chain of dependent one-row kernels pays."""
    pdl_start(USE_PDL)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.xor_sum(tl.load(w_ptr + r, mask=r < n, other=0, eviction_policy="evict_first"), axis=0)
    pdl_wait(USE_PDL)
    tl.store(out_ptr + tl.program_id(0), v)


@triton.jit
def stream_loop_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """A flat read by a resident grid: each program strides over BLOCK-word blocks, two in flight."""
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    r = tl.arange(0, BLOCK)
    step = tl.num_programs(0) * BLOCK
    for b in range(tl.program_id(0) * BLOCK, n, 2 * step):
        v0 = tl.load(w_ptr + b + r, mask=b + r < n, other=0, eviction_policy="evict_first")
        v1 = tl.load(w_ptr + b + step + r, mask=b + step + r < n, other=0, eviction_policy="evict_first")
        acc ^= v0 ^ v1
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


@triton.jit
def words_kernel(qw_ptr, out_ptr, N, K, K_SPLIT, BLOCK_N: tl.constexpr, KC: tl.constexpr):
    """The GEMV's word loads alone (same grid, tile and chunking; no scales, zeros or activations)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, KC // 8)
    acc = tl.zeros((KC // 8, BLOCK_N), dtype=tl.int32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    w_ptrs = qw_ptr + rw[:, None] * N + rn[None, :]
    for k0 in range(k_lo, k_hi, KC):
        acc ^= tl.load(w_ptrs + (k0 // 8) * N, mask=(rn < N)[None, :], other=0, eviction_policy="evict_first")
    tl.store(out_ptr + pid_k * tl.num_programs(0) + pid_n, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


@triton.jit
def tiles_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, G, K_SPLIT,
                 BLOCK_N: tl.constexpr, KC: tl.constexpr):
    """The GEMV's loads (words, scales, zeros, one chunk ahead) without its arithmetic."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, KC // 8)
    mn = rn < N
    acc = tl.zeros((KC // 8, BLOCK_N), dtype=tl.int32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    w_ptrs = qw_ptr + rw[:, None] * N + rn[None, :]
    last = k_hi - KC
    w, s, z = _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, k_lo, rw, rn, mn, N, G)
    for k0 in range(k_lo, k_hi, KC):  # the next chunk's loads are issued first, as in the GEMV
        nw, ns, nz = _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, tl.minimum(k0 + KC, last), rw, rn, mn, N, G)
        acc ^= w ^ s.to(tl.int16, bitcast=True).to(tl.int32) ^ z
        w, s, z = nw, ns, nz
    tl.store(out_ptr + pid_k * tl.num_programs(0) + pid_n, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


@triton.jit
def gemv_partials_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, ws_ptr, N, K, G, K_SPLIT,
                         BLOCK_N: tl.constexpr, KC: tl.constexpr, USE_PDL: tl.constexpr = False):
    """The GEMV (default grid, tile, loop, PDL) without its split-K merge: each program stores its
    fp32 partial sums and exits (no ticket, no last-program sum): what the merge costs."""
    pdl_start(USE_PDL)
    acc, _, pid_k, rn = gemv_f16x2_slice(x_ptr, qw_ptr, s_ptr, z_ptr, N, K, G, K_SPLIT, BLOCK_N, KC, 1, True, USE_PDL,
                                         False)
    tl.store(ws_ptr + pid_k * N + rn, acc, mask=rn < N)


def main() -> None:
    out = {"device": torch.cuda.get_device_name(0), "rows": []}
    for name, (K, N) in SHAPES.items():
        kws = distinct_kernel_weights(K, N)
        R = len(kws)
        x = torch.randn(1, K, dtype=torch.float16, device=DEV)
        cfg = default_config(1, kws[0], DEV)
        n_words = kws[0].qw.numel()
        sink = torch.empty(1 << 20, dtype=torch.int32, device=DEV)
        block = 2048  # 8 KB of words per program

        def stream():
            for kw in kws:
                stream_kernel[(triton.cdiv(n_words, block),)](kw.qw, sink, n_words, BLOCK=block, num_warps=4)

        n_chunks = K // cfg.kc
        n_t = triton.cdiv(N, cfg.block_n)
        split = max(1, min(n_chunks, triton.cdiv(-cfg.split_k * _n_sm(DEV), n_t)))
        k_split = triton.cdiv(n_chunks, split) * cfg.kc
        split = triton.cdiv(K, k_split)

        def stream_pdl():
            for kw in kws:
                stream_pdl_kernel[(triton.cdiv(n_words, block),)](kw.qw, sink, n_words, BLOCK=block, num_warps=4,
                                                                  **pdl_launch(DEV))

        def stream_loop():
            for kw in kws:
                stream_loop_kernel[(16 * _n_sm(DEV),)](kw.qw, sink, n_words, BLOCK=512, num_warps=4)

        def stream_big():
            for kw in kws:
                stream_kernel[(triton.cdiv(n_words, 8192),)](kw.qw, sink, n_words, BLOCK=8192, num_warps=8)

        def words():
            for kw in kws:
                words_kernel[(n_t, 1, split)](kw.qw, sink, N, K, k_split, BLOCK_N=cfg.block_n, KC=cfg.kc,
                                              num_warps=cfg.num_warps)

        def tiles():
            for kw in kws:
                tiles_kernel[(n_t, 1, split)](kw.qw, kw.scales, kw.zeros, sink, N, K, G, k_split,
                                              BLOCK_N=cfg.block_n, KC=cfg.kc, num_warps=cfg.num_warps)

        def gemv():
            for kw in kws:
                w4_matmul(x, kw)

        def gemv_ticket():
            for kw in kws:
                w4_matmul(x, kw, replace(cfg, park=False))

        part = torch.empty(split * N, dtype=torch.float32, device=DEV)

        def gemv_partials():
            for kw in kws:
                gemv_partials_kernel[(n_t, 1, split)](x, kw.qw, kw.scales, kw.zeros, part, N, K, G, k_split,
                                                      BLOCK_N=cfg.block_n, KC=cfg.kc, num_warps=cfg.num_warps,
                                                      **pdl_launch(DEV))

        merges_equal = bool(torch.equal(w4_matmul(x, kws[-1]), w4_matmul(x, kws[-1], replace(cfg, park=False))))

        nbytes = n_words * 4 + kws[0].scales.numel() * 2 + kws[0].zeros.numel()
        row = {"shape": name, "MB": round(nbytes / 1e6, 1)}
        for label, fn, b in [("stream", stream, n_words * 4), ("stream_pdl", stream_pdl, n_words * 4),
                             ("stream_loop", stream_loop, n_words * 4),
                             ("stream_big", stream_big, n_words * 4), ("words", words, n_words * 4),
                             ("tiles", tiles, nbytes), ("gemv", gemv, nbytes),
                             ("gemv_ticket", gemv_ticket, nbytes), ("gemv_partials", gemv_partials, nbytes)]:
            us = time_graph(fn, R)[0]
            row[label + "_us"] = round(us, 2)
            row[label + "_TBps"] = round(b / (us * 1e-6) / 1e12, 2)
        row["merges_equal"] = merges_equal
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del kws
        torch.cuda.empty_cache()
    tot = {k: round(sum(r[k] for r in out["rows"]), 1)
           for k in ("stream_us", "stream_pdl_us", "stream_loop_us", "stream_big_us", "words_us", "tiles_us", "gemv_us",
                     "gemv_ticket_us", "gemv_partials_us")}
    print("one layer (sum of four shapes), us:", tot)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_read_floor.json"), "w") as f:
        json.dump({**out, "layer": tot}, f, indent=1)


if __name__ == "__main__":
    main()
