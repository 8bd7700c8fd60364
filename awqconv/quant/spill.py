"""Calibration activations that may not fit in memory: held in RAM up to a budget, on disk past it.

The hidden states entering a decoder layer are ``n_blocks x seq x hidden`` fp32 values (128 x 512
tokens of a 4096-wide model: 1.07 GB; 8192 wide: 2.1 GB), and the layer loop holds two such sets
at once (this layer's inputs, the next layer's). A :class:`ChunkStore` keeps one set, chunk by
chunk: in host memory while the shared :class:`ActivationBudget` allows, else in a safetensors file
of the spill directory, read back when iterated. fp32 is stored as is, so a spilled run computes
the same bits as one held in memory. On a GPU the chunks live on the host and each one moves to the
device only while it is used: peak GPU memory is one layer plus one chunk, not every activation.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .capture import Chunk

_ids = itertools.count()


def available_memory() -> int:
    """Bytes of host memory available now (MemAvailable), or 8 GiB when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def default_budget() -> int:
    """Half of the memory available at start: the other half is the layer, its outputs and the
    quantized results that grow as layers finish."""
    return available_memory() // 2


@dataclass
class ActivationBudget:
    """Bytes of activations all stores together may hold in RAM; the rest goes to ``spill_dir``."""

    max_bytes: int
    spill_dir: Path | None = None
    used: int = 0
    spilled: int = 0  # bytes ever written to disk (reported)
    peak: int = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.max_bytes:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def give(self, n: int) -> None:
        self.used -= n

    def spill_path(self) -> Path:
        if self.spill_dir is None:
            raise MemoryError("calibration activations exceed the memory budget and no spill directory is set")
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        return self.spill_dir / f"chunk-{os.getpid()}-{next(_ids)}.safetensors"


@dataclass
class ChunkStore:
    """The chunks entering one layer (see the module docstring). Iterating yields :class:`Chunk`
    objects whose hidden states are on ``device``."""

    device: torch.device
    budget: ActivationBudget | None = None
    _hidden: list[Tensor | Path] = field(default_factory=list)
    _kwargs: list[dict[str, Any]] = field(default_factory=list)
    _held: int = 0

    @classmethod
    def of(cls, chunks: list[Chunk], device: torch.device, budget: ActivationBudget | None) -> ChunkStore:
        store = cls(device, budget)
        for c in chunks:
            store.append(c.hidden, c.kwargs)
        return store

    def append(self, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        if self.budget is None:  # no budget: kept where it is (the compute device), as before spilling existed
            self._hidden.append(hidden)
        else:
            n = hidden.numel() * hidden.element_size()
            if self.budget.take(n):
                self._held += n
                self._hidden.append(hidden.to("cpu", copy=hidden.device.type != "cpu"))
            else:
                from safetensors.torch import save_file

                path = self.budget.spill_path()
                save_file({"hidden": hidden.detach().contiguous().cpu()}, str(path))
                self.budget.spilled += n
                self._hidden.append(path)
        self._kwargs.append(kwargs)

    def __len__(self) -> int:
        return len(self._hidden)

    def hidden(self, i: int) -> Tensor:
        h = self._hidden[i]
        if isinstance(h, Path):
            from safetensors.torch import load_file

            h = load_file(str(h))["hidden"]
        return h.to(self.device, non_blocking=False)

    def __iter__(self) -> Iterator[Chunk]:
        for i in range(len(self)):
            yield Chunk(self.hidden(i), self._kwargs[i])

    def head(self, n: int) -> _Head:
        """The first ``n`` chunks, iterable like the store."""
        return _Head(self, min(n, len(self)))

    @property
    def spilled(self) -> int:
        return sum(isinstance(h, Path) for h in self._hidden)

    def release(self) -> None:
        """Free the RAM and the spill files this store holds."""
        if self.budget is not None:
            self.budget.give(self._held)
        self._held = 0
        for h in self._hidden:
            if isinstance(h, Path):
                h.unlink(missing_ok=True)
        self._hidden.clear()


@dataclass
class _Head:
    store: ChunkStore
    n: int

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Chunk]:
        return itertools.islice(iter(self.store), self.n)
