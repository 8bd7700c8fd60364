"""The split reduction scratch shared by the Triton kernels: fp32 partials and int32 tickets per device.

A kernel that splits a reduction across programs (split-K GEMVs, split-KV decode attention) parks
fp32 partials here and either counts finished programs with a ticket per output tile (the last one
sums, stores, and sets its ticket back to zero, so the tickets are all zero between kernels) or
leaves the sum to a merge kernel launched after it. One buffer serves every kernel on a stream
(each waits for the previous kernel before writing, PDL included).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Workspace:
    def __init__(self) -> None:
        self.ws: dict[torch.device, Tensor] = {}
        self.cnt: dict[torch.device, Tensor] = {}

    def get(self, device: torch.device, n_ws: int, n_cnt: int) -> tuple[Tensor, Tensor]:
        """fp32 scratch of at least ``n_ws`` elements and ``n_cnt`` zeroed tickets on ``device``."""
        ws, cnt = self.ws.get(device), self.cnt.get(device)
        if ws is None or ws.numel() < n_ws:
            ws = self.ws[device] = torch.empty(max(n_ws, 1 << 16), dtype=torch.float32, device=device)
        if cnt is None or cnt.numel() < n_cnt:
            cnt = self.cnt[device] = torch.zeros(max(n_cnt, 4096), dtype=torch.int32, device=device)
        return ws, cnt


WORKSPACE = Workspace()
