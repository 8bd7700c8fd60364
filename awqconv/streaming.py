"""A safetensors checkpoint read one decoder layer at a time, never whole.

transformers builds the model with every parameter on the meta device (buffers such as RoPE
frequencies stay real: they are computed, not stored); the embeddings, final norm and head are
read from the shards at once, and each decoder layer only when the quantizer reaches it
(``load_layer``), straight from the memory-mapped shards. The quantizer moves each finished layer
back to the meta device, so host memory holds one layer of weights at a time.

A checkpoint streams when every parameter transformers' model class holds is stored under the same
name (true of the dense families); otherwise, e.g. transformers 5's stacked MoE experts built from
per-expert tensors, :func:`open_streamed` says why and the caller loads the model whole.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import read_json
from .errors import InputError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the meta device as it is registered
    (its storage, allocated but never touched, is released at once); buffers stay where they are."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def shard_index(directory: Path) -> dict[str, Path]:
    """Tensor name -> the shard holding it (from the index, else from each shard's header)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        return {k: directory / f for k, f in read_json(index).get("weight_map", {}).items()}
    found: dict[str, Path] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            found.update({k: shard for k in f.keys()})
    return found


class StreamedCheckpoint:
    """The model (decoder layers on meta) and a loader for one layer at a time."""

    def __init__(self, model: nn.Module, index: dict[str, Path], layers_path: str, tied: bool):
        self.model = model
        self.index = index
        self.layers_path = layers_path
        self.tied = tied

    def _load(self, module: nn.Module, prefix: str, names: list[str]) -> None:
        """Read ``names`` (relative to ``prefix``) from the shards into ``module``'s parameters,
        cast to each parameter's dtype (as ``from_pretrained`` does)."""
        from safetensors import safe_open

        wanted = dict(module.named_parameters())
        by_file: dict[Path, list[str]] = defaultdict(list)
        for n in names:
            by_file[self.index[prefix + n]].append(n)
        state: dict[str, torch.Tensor] = {}
        for shard, ns in by_file.items():
            with safe_open(str(shard), framework="pt") as f:
                for n in ns:
                    t = f.get_tensor(prefix + n)
                    p = wanted[n]
                    if tuple(t.shape) != tuple(p.shape):
                        raise InputError(f"{shard.name}: {prefix + n} has shape {tuple(t.shape)}, the config "
                                         f"implies {tuple(p.shape)}; the checkpoint and config.json disagree")
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise InputError(f"weight {prefix + n} holds NaN/inf values; the checkpoint is broken, "
                                         "re-download or re-export it")
                    state[n] = t.to(p.dtype)
        module.load_state_dict(state, strict=False, assign=True)

    def load_rest(self) -> None:
        """Everything outside the decoder layers: embeddings, final norm, head."""
        names = [n for n, _ in self.model.named_parameters() if not n.startswith(self.layers_path + ".")]
        if self.tied:
            names = [n for n in names if n != "lm_head.weight"]
        self._load(self.model, "", names)
        if self.tied:  # lm_head shares the embedding's (now loaded) parameter again
            self.model.tie_weights()

    def load_layer(self, i: int) -> None:
        layer = self.model.get_submodule(self.layers_path)[i]
        self._load(layer, f"{self.layers_path}.{i}.", [n for n, _ in layer.named_parameters()])


def open_streamed(path: Path, hf_config: dict[str, Any], layers_path: str,
                  trust_remote_code: bool = False) -> StreamedCheckpoint | None:
    """The checkpoint at ``path`` ready to stream, or None (with the reason logged) when its
    tensors do not map one to one onto transformers' parameters or it is not safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .sources import safetensors_metadata, weight_format

    if weight_format(path) != "safetensors":
        log.info("%s holds pickled weights; loading the model whole", path)
        return None
    for shard in sorted(path.glob("*.safetensors")):
        safetensors_metadata(shard)  # a truncated or corrupt shard fails here, naming the file
    index = shard_index(path)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), torch.float32)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    # tied: the head is the embedding (named_parameters lists the shared parameter once, as the embedding)
    tied = bool(hf_config.get("tie_word_embeddings", False))
    missing = [n for n, _ in model.named_parameters() if n not in index and not (tied and n == "lm_head.weight")]
    if missing:
        log.info("%s: %d parameters are stored under other names (e.g. %s); loading the model whole",
                 path, len(missing), missing[0])
        return None
    src = StreamedCheckpoint(model, index, layers_path, tied)
    src.load_rest()
    return src
