"""Per-layer checkpoints of a quantization run, so a killed run continues from its last finished layer.

A work directory beside the output holds, as layers finish:

- ``layer-00007.safetensors``: layer 7's results (packed linears, dense tensors, prescaled weights,
  search decisions), with what is not a tensor in the file's metadata;
- ``inputs-00008/``: the float hidden states entering layer 8, a file per chunk (AWQ only: the next
  layer is calibrated on them; renamed into place before the state that names them);
- ``state.json``: the run's fingerprint and how many layers are done, replaced by rename, so it is
  the commit point: a file written after the last state is never trusted.

Every file is written under a temporary name and renamed, so a kill at any instant leaves either the
previous state or the new one. Results are the exact tensors the run would hold in memory, so a
resumed run writes the same bytes as an uninterrupted one. The directory is removed once the run's
outputs are in place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import UsageError
from ..model import ScaleRecord, SearchResults
from ..packed import PackedLinear

STATE = "state.json"
FORMAT = "awqconv-layer-checkpoints/1"


@dataclass
class LayerResult:
    """What one finished layer adds to the run's output."""

    linears: dict[str, PackedLinear | None]  # None: left in the checkpoint file (load)
    dense: dict[str, Tensor]
    prescaled: dict[str, Tensor | None] | None
    scales: list[ScaleRecord]
    clips: dict[str, Tensor]
    importance: dict[str, tuple[Tensor, int]] | None = None  # linear -> (sum of x^2 per channel, tokens)


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".part")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LayerCheckpoints:
    """The work directory of one run (see the module docstring)."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any]):
        self.dir = Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / STATE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def done(self) -> int:
        """Layers finished by a run with this fingerprint (0 when none)."""
        st = self.state()
        return int(st["layers_done"]) if st and st.get("fingerprint") == self.fingerprint else 0

    def differences(self) -> list[str]:
        """The fingerprint fields where the checkpoints on disk differ from this run."""
        st = self.state()
        if st is None:
            return []
        old = st.get("fingerprint", {})
        return sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))

    def start(self) -> None:
        """Begin a fresh run: whatever the directory held is discarded."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self._commit(0)

    def _commit(self, layers_done: int) -> None:
        body = {"format": FORMAT, "fingerprint": self.fingerprint, "layers_done": layers_done}
        _fsync_write(self.dir / STATE, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def retire(self, to: Path, owner: object) -> None:
        """The run is finished: move the directory out of ``--resume``'s way to ``to`` (a name the
        next run's clean-up removes if this process dies), where ``StoredLinears`` still read it,
        and remove it once ``owner`` is garbage (or at exit)."""
        import weakref

        (self.dir / STATE).unlink(missing_ok=True)
        os.replace(self.dir, to)
        self.dir = Path(to)
        weakref.finalize(owner, shutil.rmtree, str(to), True)

    # ------------------------------------------------------------------ layers
    def save(self, i: int, result: LayerResult, next_inputs: list[Tensor] | None) -> None:
        """Record layer ``i`` as finished (and the hidden states entering layer ``i + 1``)."""
        tensors: dict[str, Tensor] = {}
        linears: dict[str, list[int]] = {}
        for name, p in result.linears.items():
            tensors[f"q/{name}/qweight"], tensors[f"q/{name}/scales"], tensors[f"q/{name}/zeros"] = (
                p.qweight, p.scales, p.zeros)
            if p.bias is not None:
                tensors[f"q/{name}/bias"] = p.bias
            linears[name] = [p.in_features, p.group_size, p.bits]
        tensors.update({f"d/{k}": v for k, v in result.dense.items()})
        tensors.update({f"p/{k}": v for k, v in (result.prescaled or {}).items()})
        tensors.update({f"c/{k}": v for k, v in result.clips.items()})
        imp = None if result.importance is None else {k: c for k, (_, c) in result.importance.items()}
        tensors.update({f"i/{k}": v for k, (v, _) in (result.importance or {}).items()})
        scales = []
        for j, r in enumerate(result.scales):
            tensors[f"s/{j}"] = r.scales
            scales.append([r.prev_op, list(r.layers), r.alpha, r.loss_before, r.loss_after])
        # safetensors sorts its keys: the metadata keeps each dict's order, so a resumed run
        # lists tensors (and writes its artifacts) in the order an uninterrupted one does
        meta = {"linears": json.dumps(linears), "scales": json.dumps(scales),
                "dense": json.dumps(list(result.dense)), "clips": json.dumps(list(result.clips)),
                "importance": json.dumps(imp),
                "prescaled": json.dumps(None if result.prescaled is None else list(result.prescaled))}
        _save(tensors, self.dir / f"layer-{i:05d}.safetensors", meta)
        if next_inputs is not None:  # chunk by chunk: a spilled store is never all in memory at once
            final = self.dir / f"inputs-{i + 1:05d}"
            part = final.with_name(final.name + ".part")
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir()
            for j, h in enumerate(next_inputs):
                _save({"hidden": h}, part / f"chunk{j:04d}.safetensors", {})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(part, final)
        self._commit(i + 1)
        shutil.rmtree(self.dir / f"inputs-{i:05d}", ignore_errors=True)

    def load(self, i: int) -> LayerResult:
        """Layer ``i``'s results, its packed linears and prescaled weights left in the file (their
        names map to None): ``StoredLinears`` reads them when a format needs them."""
        from safetensors import safe_open

        with safe_open(str(self.dir / f"layer-{i:05d}.safetensors"), framework="pt") as f:
            meta = f.metadata()
            specs = json.loads(meta["linears"])
            pre_names = json.loads(meta["prescaled"])
            linears = dict.fromkeys(specs)
            pre = None if pre_names is None else dict.fromkeys(pre_names)
            dense = {k: f.get_tensor(f"d/{k}") for k in json.loads(meta["dense"])}
            clips = {k: f.get_tensor(f"c/{k}") for k in json.loads(meta["clips"])}
            scales = [ScaleRecord(prev, tuple(layers), f.get_tensor(f"s/{j}"), alpha, lb, la)
                      for j, (prev, layers, alpha, lb, la) in enumerate(json.loads(meta["scales"]))]
            imp = json.loads(meta.get("importance", "null"))
            importance = None if imp is None else {k: (f.get_tensor(f"i/{k}"), c) for k, c in imp.items()}
        return LayerResult(linears, dense, pre, scales, clips, importance)

    def inputs(self, i: int) -> list[Path]:
        """The files of the hidden states entering layer ``i``, one per chunk, in order."""
        files = sorted((self.dir / f"inputs-{i:05d}").glob("chunk*.safetensors"))
        if not files:
            raise UsageError(f"--resume: {self.dir} lacks the inputs of layer {i}; delete it to start over")
        return files


def _packed(f: Any, name: str, spec: list[int]) -> PackedLinear:
    """Linear ``name`` from an open layer file (``spec``: in_features, group size, bits)."""
    n_in, g, bits = spec
    bias = f.get_tensor(f"q/{name}/bias") if f"q/{name}/bias" in f.keys() else None
    return PackedLinear(f.get_tensor(f"q/{name}/qweight"), f.get_tensor(f"q/{name}/scales"),
                        f.get_tensor(f"q/{name}/zeros"), n_in, g, bits, bias)


class StoredLinears(Mapping[str, PackedLinear]):
    """The packed linears of finished layers, read from their checkpoint files on each access, so a
    run's results need not all be in memory while the formats are written (each writer holds what it
    converts, not a second copy of every layer). ``materialize()`` loads them all before the
    checkpoints are removed."""

    def __init__(self, ck: LayerCheckpoints, where: dict[str, int], part: str = "q"):
        self.ck, self.where, self.part = ck, where, part

    def __getitem__(self, name: str) -> Any:
        from safetensors import safe_open

        i = self.where[name]  # KeyError for names that are not here, as a dict
        with safe_open(str(self.ck.dir / f"layer-{i:05d}.safetensors"), framework="pt") as f:
            if self.part == "p":
                return f.get_tensor(f"p/{name}")
            return _packed(f, name, json.loads(f.metadata()["linears"])[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def materialize(self) -> dict[str, Any]:
        return {k: self[k] for k in self.where}


def resume_checkpoints(directory: Path, fingerprint: dict[str, Any], resume: bool) -> tuple[LayerCheckpoints, int]:
    """The run's checkpoints and the layer to start from. Without ``resume``, checkpoints of the
    same run are an error (continuing them needs ``--resume``); those of another run are stale and
    replaced. With ``resume``, the same run continues and another run's checkpoints are an error."""
    ck = LayerCheckpoints(directory, fingerprint)
    st = ck.state()
    if st is not None:
        done, diff = ck.done(), ck.differences()
        if resume and diff:
            raise UsageError(
                f"--resume: the interrupted run in {directory} used different settings ({', '.join(diff)}); "
                f"rerun with the same arguments, or delete {directory} to start over")
        if resume:
            return ck, done
        if not diff and st.get("layers_done", 0) > 0:
            raise UsageError(
                f"an interrupted run of this model left {st['layers_done']} finished layers in {directory}; "
                "add --resume to continue it, or delete that directory to start over")
    ck.start()
    return ck, 0


def merge(result: LayerResult, linears: dict, dense: dict, prescaled: dict | None, search: SearchResults) -> None:
    linears.update(result.linears)
    dense.update(result.dense)
    if prescaled is not None and result.prescaled is not None:
        prescaled.update(result.prescaled)
    search.scales.extend(result.scales)
    search.clips.update(result.clips)
