"""``chat``: an interactive streaming chat over the built-in runtime.

The tokenizer and its chat template come from the artifact's assets (``qm.assets``). Each turn
re-encodes the whole conversation with the template (add_generation_prompt) and streams the reply
through ``output_fn`` as text deltas (the default writes them to stdout without newlines and flushes,
so a reply grows on one line); oldest turns are dropped when the conversation outgrows the cache.
``input_fn`` returning None (or EOF), "/exit" or "/quit" ends the session; "/reset" clears it. The
default ``input_fn`` reads stdin as bytes so a line that is not UTF-8 is reported and skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import InputError, UsageError
from .generate import Generator, SamplingParams
from ..formats import read_artifact
from .model import build_decoder


def _eos_ids(tok, qm) -> tuple[int, ...]:
    import json

    ids = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gc = qm.assets.get("generation_config.json")
    if gc:
        e = json.loads(gc).get("eos_token_id")
        ids.update([e] if isinstance(e, int) else (e or []))
    return tuple(sorted(ids))


def write_stream(text: str) -> None:
    """Default ``output_fn``: a delta goes out as is (no newline) and shows at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def read_line(prompt: str) -> str | None:
    """Default ``input_fn``: one line of stdin without its line ending, or None at EOF.

    stdin is read as bytes because a text stream raises (or silently mangles) on bytes that are not
    UTF-8; such a line is reported on stderr and skipped, and the next one is read."""
    stdin = sys.stdin
    if stdin is None or stdin.closed:  # started with stdin closed (``<&-``): a normal end
        return None
    interactive = stdin.isatty()
    binary = getattr(stdin, "buffer", None)
    while True:
        if interactive:
            sys.stdout.write(prompt)
            sys.stdout.flush()
        try:
            raw = binary.readline() if binary is not None else stdin.readline()
        except (OSError, ValueError):  # a closed or hung-up stdin ends the session like EOF
            raw = b""
        if not raw:
            if interactive:  # Ctrl-D leaves the cursor after the prompt: end that line
                sys.stdout.write("\n")
                sys.stdout.flush()
            return None
        if isinstance(raw, str):
            return raw.rstrip("\r\n")
        try:
            return raw.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError as e:
            sys.stderr.write(f"warning: that line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                             f"{e.start}); it was skipped\n")
            sys.stderr.flush()


def chat(path: str | Path, device: str | torch.device | None = None, max_new_tokens: int = 256,
         input_fn: Callable[[str], str | None] = read_line, output_fn: Callable[[str], None] = write_stream,
         system_prompt: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
         max_len: int = 2048, seed: int = 0) -> list[dict[str, str]]:
    """Run the chat loop; returns the conversation (list of ``{"role", "content"}``)."""
    from ..reference import load_tokenizer_from_assets

    device = resolve_device(device)  # a bad --device fails before the model loads
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: give at least 1")
    qm, _ = read_artifact(path)
    tok = load_tokenizer_from_assets(qm)
    if not getattr(tok, "chat_template", None):
        raise InputError(f"{path}: the tokenizer has no chat template; chat needs an instruct model's template")
    limit = min(max_len, int(qm.hf_config.get("max_position_embeddings", max_len)))
    if max_new_tokens >= limit:  # refuse now, not after the user has typed the first message
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no room for a message in the "
                         f"{limit}-token context of this model; use at most {limit - 1}")
    gen = Generator(build_decoder(qm, device), max_batch=1, max_len=limit)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            eos_token_ids=_eos_ids(tok, qm), seed=seed)
    base = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[dict[str, str]] = []
    while True:
        try:
            user = input_fn("> ")
        except EOFError:
            user = None
        if user is None or user.strip() in ("/exit", "/quit"):
            return base + history
        if user.strip() == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": user})
        while True:
            ids = tok.apply_chat_template(base + history, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            if len(ids) + max_new_tokens <= limit or len(history) <= 1:
                break
            history = history[2:]  # drop the oldest exchange
        if len(ids) + max_new_tokens > limit:
            raise InputError(f"the message is {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                             f"it exceeds the {limit}-token cache")
        new: list[int] = []
        shown = ""

        def stream(_row: int, t: int) -> None:
            nonlocal shown
            if t in params.eos_token_ids:
                return
            new.append(t)
            text = tok.decode(new, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait out partial UTF-8
                output_fn(text[len(shown):])
                shown = text

        gen.generate([list(ids)], params, stream=stream)
        reply = tok.decode(new, skip_special_tokens=True)
        if len(reply) > len(shown):
            output_fn(reply[len(shown):])
        output_fn("\n")
        history.append({"role": "assistant", "content": reply})
