"""Batched prefill + greedy/sampled decoding with streaming over a Decoder's static KV cache.

Prompts are left-padded into one [B, T] prefill; decode steps then write slot T, T+1, ... for all
rows. On a GPU the decode step (embedding to logits) is captured once per batch size in a CUDA graph
and replayed with static token/position/slot buffers; prefills of up to PREFILL_GRAPH_MAX tokens
(launch-bound when run op by op) are left-padded to a multiple of PREFILL_STEP and replayed from one
graph per such length; on the CPU everything runs eagerly over the filled part of the cache only.
``stream(row, token)`` is called as tokens are produced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InputError
from .model import Decoder

log = logging.getLogger(__name__)

PREFILL_GRAPH_MAX = 512  # longer prompts prefill op by op (their kernels outlast the launches)
PREFILL_STEP = 64  # graphed prefills are left-padded to a multiple of this: one graph per length


def padded_prefill_len(T: int) -> int:
    """``T`` rounded up to PREFILL_STEP: the cache slots a graphed prefill of ``T``-token prompts takes."""
    return -(-T // PREFILL_STEP) * PREFILL_STEP


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    seed: int = 0


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (stopped at and including EOS)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    timings: dict = field(default_factory=dict)


def _sample(logits: Tensor, p: SamplingParams, gen: torch.Generator | None) -> Tensor:
    """``logits [B, V]`` -> token ids [B] (greedy when temperature == 0)."""
    if p.temperature <= 0:
        if logits.is_cuda:  # split over programs: torch's one-block argmax took ~12 us a step (H100)
            from ..kernels.argmax import greedy_argmax

            return greedy_argmax(logits)
        return logits.argmax(-1)
    if logits.is_cuda and p.top_k <= 0:  # one kernel, no sort (kernels/sample.py)
        from ..kernels.sample import nucleus_sample

        seeds = torch.randint(0, 2**31 - 1, (logits.shape[0],), device=logits.device, generator=gen)
        return nucleus_sample(logits, p.temperature, p.top_p, seeds)
    return _sample_torch(logits, p, gen)


def _sample_torch(logits: Tensor, p: SamplingParams, gen: torch.Generator | None) -> Tensor:
    """The torch path of ``_sample`` (temperature > 0): CPU, and top-k on any device."""
    logits = logits.float() / p.temperature
    V = logits.shape[-1]
    if p.top_k > 0:  # only the k most probable, sorted (plus up to 8 tied with the k-th: top-k keeps ties)
        k = min(p.top_k, V)
        vals, idx = torch.topk(logits, min(k + 8, V), dim=-1)
        probs = vals.masked_fill(vals < vals[:, k - 1 : k], float("-inf")).softmax(-1)
    elif p.top_p < 1.0:
        probs, idx = torch.sort(logits.softmax(-1), descending=True, dim=-1)
    else:
        return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)
    if p.top_p < 1.0:  # nucleus: the most probable tokens until their mass reaches top_p (the one crossing it kept)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > p.top_p, 0.0)
    # multinomial draws from the kept weights in sorted order (it normalises), then maps back
    return idx.gather(-1, torch.multinomial(probs, 1, generator=gen)).squeeze(-1)


class _TokenReader:
    """Brings one step's tokens to the host without waiting for work queued after them: on a GPU the
    copy goes to pinned memory and an event marks it, so later steps can be queued first."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buf = torch.empty(batch, dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def start(self, tok: Tensor) -> None:
        self.buf.copy_(tok, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()

    def tokens(self) -> list[int]:
        if self.cuda:
            self.event.synchronize()
        return self.buf.tolist()


class Generator:
    """Owns the cache size and the per-batch-size CUDA graphs of one Decoder."""

    def __init__(self, model: Decoder, max_batch: int = 1, max_len: int = 2048, cuda_graph: bool = True):
        self.model = model
        self.max_batch, self.max_len = max_batch, max_len
        model.allocate_cache(max_batch, max_len)
        self.use_graph = cuda_graph and model.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None

    # --- decode step -------------------------------------------------------------------------
    def kv_bucket(self, slot: int) -> int:
        """Cache length a step at ``slot`` attends over: a power of two >= slot + 1 (graphs per bucket)."""
        if not self.use_graph:
            return slot + 1
        b = 128
        while b < slot + 1:
            b *= 2
        return min(b, self.max_len)

    def _capture(self, run: Callable[[], Tensor]) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """``run`` warmed up twice on a side stream, then captured in this generator's graph pool."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(s)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool), torch.no_grad():
            out = run()
        return g, out

    def _graph_for(self, B: int, kv_len: int):
        key = (B, kv_len)
        if key in self._graphs:
            return self._graphs[key]
        dev = self.model.device
        tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        # capture on the last cache slot, which prefill never uses; restore the validity mask after
        slot = torch.full((), self.max_len - 1, dtype=torch.long, device=dev)
        saved = self.model.key_valid[:B].clone()
        g, logits = self._capture(lambda: self.model(tok, pos, slot, kv_len))
        self.model.key_valid[:B].copy_(saved)
        self._graphs[key] = (g, tok, pos, slot, logits)
        return self._graphs[key]

    def prefill_slots(self, T: int, new_tokens: int) -> int:
        """Cache slots a prefill of ``T``-token prompts takes: T rounded up to PREFILL_STEP where it runs
        from a CUDA graph (GPU, a model whose prefill graphs (``Decoder.graph_prefill``: no MoE),
        T <= PREFILL_GRAPH_MAX, and the padding still leaves room for ``new_tokens``), else T."""
        padded = padded_prefill_len(T)
        if (self.use_graph and self.model.graph_prefill and padded <= PREFILL_GRAPH_MAX
                and padded + new_tokens <= self.max_len):
            return padded
        return T

    def _graphed(self, slots: int) -> bool:
        """Whether a prefill into ``slots`` cache slots replays a graph (a ``prefill_slots`` length)."""
        return self.use_graph and self.model.graph_prefill and slots <= PREFILL_GRAPH_MAX and slots % PREFILL_STEP == 0

    def _prefill_graph_for(self, B: int, T: int):
        """The graph of a [B, T] prefill (tokens, positions and validity in static buffers)."""
        key = (B, -T)  # negative: apart from the decode graphs' (B, kv_len) keys
        if key in self._graphs:
            return self._graphs[key]
        dev = self.model.device
        tok = torch.zeros(B, T, dtype=torch.long, device=dev)
        pos = torch.zeros(B, T, dtype=torch.long, device=dev)
        valid = torch.ones(B, T, dtype=torch.bool, device=dev)
        slot = torch.zeros((), dtype=torch.long, device=dev)
        # warm-up and capture write cache slots 0..T-1 of these rows: the prefill rewrites them
        g, logits = self._capture(lambda: self.model(tok, pos, slot, T, valid))
        self._graphs[key] = (g, tok, pos, valid, logits, slot)  # every static input stays alive with the graph
        return self._graphs[key]

    def capture(self, B: int, first_slot: int, last_slot: int) -> None:
        """Capture the graphs a decode from ``first_slot`` to ``last_slot`` will replay."""
        if self.use_graph:
            for kv in sorted({self.kv_bucket(sl) for sl in range(first_slot, last_slot + 1)}):
                self._graph_for(B, kv)

    @torch.no_grad()
    def step(self, tok: Tensor, pos: Tensor, slot: int, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits [B, V] for one new token per row at cache ``slot``, and the next step's positions
        (``pos + 1``); ``history`` (a ``[B]`` view, optional) receives ``tok``."""
        B = tok.shape[0]
        kv_len = self.kv_bucket(slot)
        if self.use_graph:  # one staging launch, not five small ops queued between graph replays
            from ..kernels.decode_prologue import stage_step_inputs

            g, t_buf, p_buf, s_buf, logits = self._graph_for(B, kv_len)
            nxt = stage_step_inputs(tok, pos, slot, t_buf, p_buf, s_buf, history)
            g.replay()
            return logits[:, -1], nxt
        if history is not None:
            history.copy_(tok)
        slot_t = torch.tensor(slot, device=self.model.device)
        return self.model(tok.view(B, 1), pos.view(B, 1), slot_t, kv_len)[:, -1], pos + 1

    # --- prefill -----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: int | None = None) -> tuple[Tensor, Tensor, int]:
        """Left-padded prefill into ``slots`` cache slots (default: the longest prompt's length; a
        ``prefill_slots`` length runs from a CUDA graph). Returns (last logits [B, V], next
        positions [B], first free slot)."""
        B = len(prompts)
        if not 1 <= B <= self.max_batch:
            raise InputError(f"batch of {B} prompts; this generator holds 1..{self.max_batch}")
        T = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise InputError("empty prompt: give at least one token (a BOS token, say)")
        T = max(T, slots or 0)
        dev = self.model.device
        toks = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for i, p in enumerate(prompts):
            toks[i, T - len(p):] = torch.tensor(p)
            valid[i, T - len(p):] = True
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        self.model.key_valid[:B].zero_()
        if slots is not None and self._graphed(T):
            g, t_buf, p_buf, v_buf, logits, _ = self._prefill_graph_for(B, T)
            t_buf.copy_(toks)
            p_buf.copy_(pos)
            v_buf.copy_(valid)
            g.replay()
        else:
            logits = self.model(toks.to(dev), pos.to(dev), torch.tensor(0, device=dev), T, valid.to(dev))
        return logits[:, -1], pos[:, -1].to(dev) + 1, T

    # --- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 stream: Callable[[int, int], None] | None = None) -> GenerationResult:
        import time

        p = params or SamplingParams()
        B = len(prompts)
        T = max(len(x) for x in prompts)
        if T + p.max_new_tokens > self.max_len:
            raise InputError(f"prompt ({T}) + max_new_tokens ({p.max_new_tokens}) exceeds the cache "
                             f"({self.max_len}); raise max_len")
        gen = None
        if p.temperature > 0:
            gen = torch.Generator(device=self.model.device).manual_seed(p.seed)
        sync = torch.cuda.synchronize if self.model.device.type == "cuda" else (lambda: None)
        slots = self.prefill_slots(T, p.max_new_tokens)
        if self._graphed(slots):
            self._prefill_graph_for(B, slots)  # capture before timing
        self.capture(B, slots, slots + p.max_new_tokens - 2)
        sync()
        t0 = time.perf_counter()
        logits, pos, slot = self.prefill(prompts, slots)
        tok = _sample(logits, p, gen)
        sync()
        t1 = time.perf_counter()
        out = torch.empty(B, p.max_new_tokens, dtype=torch.long, device=self.model.device)
        done = torch.zeros(B, dtype=torch.bool)
        eos = set(p.eos_token_ids)
        need_host = stream is not None or bool(eos)
        reader = _TokenReader(B, self.model.device) if need_host else None
        n = 0
        for i in range(p.max_new_tokens):
            n = i + 1
            if reader is not None:
                reader.start(tok)
            last = i + 1 == p.max_new_tokens
            if last:
                out[:, i] = tok
            else:  # queue the next step before waiting for this token on the host: the GPU
                # keeps working while the host streams it and checks for EOS (on an EOS the queued
                # step is simply not used); the step also writes tok into out[:, i]
                logits, pos = self.step(tok, pos, slot + i, history=out[:, i])
                nxt = _sample(logits, p, gen)
            if reader is not None:
                for r, t in enumerate(reader.tokens()):
                    if not done[r]:
                        if stream is not None:
                            stream(r, t)
                        if t in eos:
                            done[r] = True
                if bool(done.all()):
                    break
            if last:
                break
            tok = nxt
        sync()
        t2 = time.perf_counter()
        rows = out[:, :n].tolist()
        if eos:
            rows = [r[: next((j + 1 for j, t in enumerate(r) if t in eos), len(r))] for r in rows]
        return GenerationResult(rows, prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=n - 1)
