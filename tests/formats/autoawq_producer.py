"""Checkpoints made by AutoAWQ 0.2.9's own code, for the third-party reader tests.

AutoAWQ packs (``WQLinear_GEMM.from_linear``, given our chosen scales and zero points), writes the
config (``AwqConfig.to_transformers_dict``) and saves (``BaseAWQForCausalLM.save_quantized``:
``save_pretrained`` of the config, then ``huggingface_hub.save_torch_state_dict`` of the module tree,
dropping the tied ``lm_head``). Its calibration needs transformers 4.x, so the integers come from
plain round-to-nearest here; AutoAWQ's quantizer ends in exactly that ``from_linear`` call.

The module tree AutoAWQ saves is a stand-in (:class:`_Tree`) holding the float checkpoint's tensors
under their own names (Mixtral keeps transformers 4.x's ``block_sparse_moe.experts.N.w1``, as AutoAWQ
saved it) with AutoAWQ's GEMM modules in place of the quantized linears.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def import_autoawq() -> SimpleNamespace:
    """AutoAWQ's GEMM module, config and base model class, without awq/__init__.py (which needs
    transformers-4-only model code); skips when AutoAWQ is not installed."""
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("autoawq is not installed (pip install --no-deps autoawq==0.2.9)")
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {k: v for k, v in sys.modules.items() if k == "awq" or k.startswith("awq.")}
    pkg = types.ModuleType("awq")
    pkg.__path__ = [str(root)]
    sys.modules["awq"] = pkg
    try:
        return SimpleNamespace(gemm=importlib.import_module("awq.modules.linear.gemm"),
                               config=importlib.import_module("awq.models._config"),
                               base=importlib.import_module("awq.models.base"))
    except Exception as e:  # noqa: BLE001 - any import failure means we cannot judge with it
        pytest.skip(f"AutoAWQ cannot be imported here: {type(e).__name__}: {e}")
    finally:
        for k in [k for k in sys.modules if k == "awq" or k.startswith("awq.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def rtn(w: Tensor, g: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit round-to-nearest per (row, group): (q [out, in], z [out, in/g], fp16 s [out, in/g])."""
    out, n = w.shape
    wg = w.float().reshape(out, n // g, g)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=1e-4).half()
    z = torch.round(-lo / s.float()).clamp(0, 15)
    q = (torch.round(wg / s.float()[..., None]) + z[..., None]).clamp(0, 15)
    return q.reshape(out, n).to(torch.int32), z.to(torch.int32), s


def dequant(q: Tensor, z: Tensor, s: Tensor) -> Tensor:
    """(q - z) * s in fp32 (exact: 4-bit integers times fp16 scales)."""
    g = q.shape[1] // z.shape[1]
    return (q - z.repeat_interleave(g, 1)).float() * s.float().repeat_interleave(g, 1)


class _Tree(nn.Module):
    """What save_quantized reads of ``self.model``: a module tree, its config and save_pretrained."""

    def __init__(self, config, tied: bool) -> None:
        super().__init__()
        from transformers import GenerationConfig

        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)
        # transformers 4.x's list, as AutoAWQ passes it to shared_tensors_to_discard
        self._tied_weights_keys = ["lm_head.weight"] if tied else None

    def put(self, path: str, value: nn.Module | Tensor) -> None:
        *parents, leaf = path.split(".")
        node: nn.Module = self
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        if isinstance(value, nn.Module):
            node.add_module(leaf, value)
        elif isinstance(value, nn.Parameter):
            node.register_parameter(leaf, value)
        else:
            node.register_buffer(leaf, value)

    def save_pretrained(self, save_dir: str, state_dict=None, **_) -> None:  # the config part of it
        self.config.save_pretrained(save_dir)
        self.generation_config.save_pretrained(save_dir)


def make_checkpoint(awq: SimpleNamespace, src: Path, out: Path, *, group_size: int = 32, skip: tuple[str, ...] = (),
                    shard_size: str = "5GB", tie: bool = False) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Save an AutoAWQ GEMM checkpoint of the float model ``src`` into ``out``; returns what AutoAWQ
    was given per quantized linear, ``{module name: (q, z, s)}``. ``skip`` is AutoAWQ's
    modules_to_not_convert (substrings of the linear names kept in fp16); ``tie`` ties lm_head."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src)
    config.dtype = torch.float16
    config.tie_word_embeddings = tie
    tree = _Tree(config, tie)
    given: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for key, t in load_file(str(src / "model.safetensors")).items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and t.ndim == 2 and ".layers." in key and not any(m in name for m in skip):
            q, z, s = rtn(t, group_size)
            linear = nn.Linear(t.shape[1], t.shape[0], bias=False)
            with torch.no_grad():
                linear.weight.copy_(dequant(q, z, s))
            tree.put(name, awq.gemm.WQLinear_GEMM.from_linear(
                linear, 4, group_size, scales=s.t().contiguous(), zeros=z.t().float().contiguous()))
            given[name] = (q, z, s)
        elif not (tie and key == "lm_head.weight"):
            tree.put(key, nn.Parameter(t.half() if t.is_floating_point() else t, requires_grad=False))
    if tie:  # one tensor under both names, as a tied transformers model holds it
        tree.put("lm_head.weight", tree.get_parameter("model.embed_tokens.weight"))
    quant_config = awq.config.AwqConfig.from_dict({
        "zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "GEMM",
        "modules_to_not_convert": list(skip) or None,
    })
    out.mkdir(parents=True, exist_ok=True)
    me = SimpleNamespace(model=tree, quant_config=quant_config, processor=None)
    awq.base.BaseAWQForCausalLM.save_quantized(me, str(out), shard_size=shard_size)
    for name in TOKENIZER_FILES:  # AutoAWQ's examples save the tokenizer beside it
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return given
