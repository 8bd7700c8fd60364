"""Routed activations of fused MoE experts (transformers 5 ``*Experts`` modules).

Fused experts keep every expert in one 3-D parameter, so no hook sees an expert's own input.
We run the MoE block once with a hook on its ``experts`` module to learn which tokens each
expert receives, and rebuild the inputs of each expert's gate/up (the routed tokens) and down
projection (``act(gate x) * up x``) from the current weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def routed_inputs(moe_block: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """``{"experts.{e}.gate_proj": x_e, "experts.{e}.down_proj": h_e, ...}`` (relative to the block)."""
    experts = getattr(moe_block, "experts", None)
    if not is_fused_experts(experts):
        return {}
    seen: dict[str, Tensor] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["hidden"], seen["index"] = experts_call(args, kwargs)

    h = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        moe_block(x if x.dim() == 3 else x[None])  # MoE blocks expect [batch, seq, hidden]
    finally:
        h.remove()
    return expert_inputs(experts, seen["hidden"], seen["index"])


def is_fused_experts(module: nn.Module | None) -> bool:
    return module is not None and isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)


def experts_call(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """``(hidden [tokens, hidden], top_k_index [tokens, k])`` from a call of a fused experts module."""
    hidden = args[0] if args else kwargs["hidden_states"]
    idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hidden.detach(), idx.detach()


@torch.no_grad()
def expert_inputs(experts: nn.Module, hidden: Tensor, index: Tensor) -> dict[str, Tensor]:
    """Each expert's inputs from what the fused ``experts`` module receives: ``hidden`` [tokens,
    hidden] and ``index`` [tokens, top_k]; keys as in :func:`routed_inputs`; unrouted experts absent."""
    gate_up, inter = experts.gate_up_proj, experts.gate_up_proj.shape[1] // 2
    out: dict[str, Tensor] = {}
    for e in range(gate_up.shape[0]):
        rows = (index == e).any(-1)
        if not bool(rows.any()):
            continue
        xe = hidden[rows].to(gate_up.dtype)
        gate = xe @ gate_up[e, :inter].T
        up = xe @ gate_up[e, inter:].T
        out[f"experts.{e}.gate_proj"] = xe
        out[f"experts.{e}.up_proj"] = xe
        out[f"experts.{e}.down_proj"] = experts.act_fn(gate) * up
    return out
