"""Perplexity with the AutoAWQ / llm-awq protocol: one tokenization, non-overlapping windows.

The text is tokenized once (with the tokenizer's special tokens, so a BOS leads when it adds one)
and cut into ``floor(n_tokens / seq_len)`` windows of ``seq_len`` tokens; the tail is dropped. Each
window is scored on its own (no context carried over), predicting tokens 2..seq_len. Perplexity is
``exp(total NLL / predicted tokens)``, the same number as AutoAWQ's mean of per-window mean losses.
Logits are upcast to fp32 before the log-softmax and the NLL is summed in float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import InputError

EVAL_TEXT = "eval_heldout.txt"  # held-out text shipped beside the calibration corpus, disjoint from it


def builtin_eval_text() -> str:
    """The shipped held-out evaluation text (see ``awqconv/data/corpus_manifest.json``)."""
    from importlib import resources

    return resources.files("awqconv").joinpath("data", EVAL_TEXT).read_text(encoding="utf-8")


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``text`` over non-overlapping ``seq_len`` windows (first ``max_windows``)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    return perplexity_of_ids(model, ids, seq_len, max_windows, batch_size, progress)


def perplexity_of_ids(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """:func:`perplexity` of an already tokenized 1-D id tensor."""
    if seq_len < 2 or batch_size < 1:
        raise InputError(f"seq_len={seq_len} must be at least 2 and batch_size={batch_size} at least 1")
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise InputError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}; give more text or a smaller seq_len"
        )
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    device = next(model.parameters()).device
    total_nll = 0.0  # float64 on the host
    bar = tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += float(nll.double())
            bar.update(batch.shape[0])
    bar.close()
    mean = total_nll / (n_windows * (seq_len - 1))
    if not math.isfinite(mean):
        raise InputError("perplexity is not finite: the model produced NaN/inf logits")
    return math.exp(mean)
