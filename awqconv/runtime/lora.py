"""LoRA on the INT4 model: a frozen INT4 linear that plain ``peft`` wraps like any ``nn.Linear``.

``Int4TrainLinear`` subclasses ``nn.Linear`` (``weight`` is None) so PEFT's default dispatcher and
``target_modules="all-linear"`` pick it up; it holds the weight in the kernel layout
(``qweight`` int32 [K/8, N], ``scales``/``zeros`` [K/G, N], awqconv/kernels/layout.py) as buffers.
Forward = ``int4_matmul`` (Triton on CUDA, dequantize + matmul elsewhere); backward returns only the
input gradient, through the dequantized weight, so the base costs ~0.5 byte/parameter, not 2.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, ShapeError
from ..kernels.layout import KernelWeight, supports
from ..model import QuantizedModel
from ..packed import PackedLinear

log = logging.getLogger(__name__)

_TRITON_DTYPES = (torch.float16, torch.bfloat16)


def _triton_ops() -> Any | None:
    try:
        from ..kernels import ops
    except ImportError:  # no triton installed
        return None
    return ops


def int4_dequantize(kw: KernelWeight, dtype: torch.dtype) -> Tensor:
    """Dense ``W [K, N]`` in ``dtype``: the Triton dequant kernel on CUDA, the torch reference elsewhere."""
    if kw.qw.is_cuda and dtype in _TRITON_DTYPES and (ops := _triton_ops()) is not None:
        return ops.dequantize(kw, dtype)
    return kw.dequantize_ref(dtype)


def int4_matmul(x: Tensor, kw: KernelWeight) -> Tensor:
    """``x [M, K] @ W [K, N]`` (no bias): the one place the INT4 kernel is called."""
    if kw.bias is not None:
        raise ShapeError("int4_matmul takes a bias-free KernelWeight; the layer adds its bias")
    if x.is_cuda and x.dtype in _TRITON_DTYPES and (ops := _triton_ops()) is not None:
        return ops.w4_matmul(x, kw)
    return x @ int4_dequantize(kw, x.dtype)


class _Int4LinearFn(torch.autograd.Function):
    """y = x W; dL/dx = dL/dy W^T with W dequantized on the fly; no gradient for the frozen INT4 weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: Int4TrainLinear) -> Tensor:
        ctx.layer = layer
        return int4_matmul(x, layer.kernel_weight())

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        w = int4_dequantize(ctx.layer.kernel_weight(), grad_y.dtype)  # [K, N]
        return grad_y @ w.t(), None


class Int4TrainLinear(nn.Linear):
    """A frozen INT4 linear (``nn.Linear`` subclass, ``weight = None``) for LoRA training."""

    def __init__(self, kw: KernelWeight, dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        if len(kw.splits) != 1:
            raise ShapeError("Int4TrainLinear holds one linear; unfuse the kernel weight first")
        self.in_features = kw.in_features
        self.out_features = kw.out_features
        self.group_size = kw.group_size
        self.register_parameter("weight", None)
        # non-persistent: the base lives in the QuantizedModel, never in a transformers state dict
        self.register_buffer("qweight", kw.qw, persistent=False)
        self.register_buffer("scales", kw.scales, persistent=False)
        self.register_buffer("zeros", kw.zeros, persistent=False)
        bias = kw.bias if kw.bias is None or dtype is None else kw.bias.to(dtype)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_packed(cls, p: PackedLinear, dtype: torch.dtype | None = None) -> Int4TrainLinear:
        return cls(KernelWeight.from_packed(p), dtype)

    def kernel_weight(self) -> KernelWeight:
        return KernelWeight(self.qweight, self.scales, self.zeros, None,
                            self.in_features, self.group_size, (self.out_features,))

    def to_packed(self) -> PackedLinear:
        """The canonical integers, bit for bit (the bias back in the scales' dtype)."""
        kw = self.kernel_weight()
        kw.bias = None if self.bias is None else self.bias.to(self.scales.dtype)
        return kw.to_packed()[0]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _Int4LinearFn.apply(x2, self)
        else:
            y = int4_matmul(x2, self.kernel_weight())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory) while buffers (RoPE tables) stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def int4_model_for_training(
    qm: QuantizedModel, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """A transformers causal LM whose quantized linears are :class:`Int4TrainLinear` (frozen INT4).

    Dense tensors (embeddings, norms, lm_head) are cast to ``dtype``; the linears compute in the
    activation dtype from the exact integers. Wrap it with ``peft.get_peft_model`` as usual.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = {k: v for k, v in qm.hf_config.items() if k != "quantization_config"}
    model_type = hf.pop("model_type", None)
    if model_type is None:
        raise InputError("the model's config has no model_type; cannot build a transformers model for it")
    config = AutoConfig.for_model(model_type, **hf)
    config.dtype = dtype
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, p in qm.linears.items():
        why = supports(p)
        if why:
            raise ShapeError(f"{name}: cannot train on the INT4 layer ({why}); use the peft format instead")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(getattr(parent, child, None), nn.Linear):
            raise InputError(f"{name} is not a linear layer of {type(model).__name__}; wrong config?")
        setattr(parent, child, Int4TrainLinear.from_packed(p.to(device), dtype))

    dense = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
             for k, v in qm.dense.items()}
    result = model.load_state_dict(dense, strict=False, assign=True)
    if result.unexpected_keys:
        raise InputError(f"dense tensors {result.unexpected_keys[:3]} have no place in {type(model).__name__}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise InputError(f"the QuantizedModel lacks tensors {on_meta[:3]}; cannot build the model")
    model.to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()
