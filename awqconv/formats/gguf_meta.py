"""GGUF tokenizer metadata (the architecture's is in ``gguf_arch.py``).

Built from the tokenizer files kept verbatim in ``QuantizedModel.assets`` and the HF ``config.json``;
keys follow llama.cpp's ``tokenizer.ggml.*`` names and types. Tokenizers: byte-level
BPE (``gpt2``, pre-tokenizer recognised from tokenizer.json's structure) and SentencePiece
(``llama``, scores from tokenizer.model when present, else from the tokenizer.json vocabulary).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFWriter, TokenType

from ..errors import FormatConstraintError

# pre-tokenizer fingerprints (see _pre_fingerprint) -> llama.cpp tokenizer.ggml.pre names
_GPT2_RE = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
_QWEN2_RE = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_LLAMA3_RE = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel+regex",): "gpt-2",
    (f"split:{_GPT2_RE}", "bytelevel"): "gpt-2",
    ("digits:individual", "bytelevel+regex"): "smollm",
    (f"split:{_QWEN2_RE}", "bytelevel"): "qwen2",
    (f"split:{_LLAMA3_RE}", "bytelevel"): "llama-bpe",
}
_SPECIAL_LOOKING = re.compile(r"^<\|.*\|>$|^<pad>$|^<unused\d+>$|^<(s|/s|unk)>$")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


# ---------------------------------------------------------------------------------------------
# tokenizer

@dataclass
class TokenizerMeta:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def _json_asset(assets: dict[str, bytes], name: str) -> Any:
    raw = assets.get(name)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatConstraintError(f"gguf: tokenizer asset {name} is not valid JSON ({e})") from None


def _pre_fingerprint(pre: dict[str, Any] | None) -> tuple[str, ...]:
    if pre is None:
        return ()
    items = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    out = []
    for p in items:
        t = p.get("type")
        if t == "ByteLevel":
            out.append("bytelevel+regex" if p.get("use_regex", True) else "bytelevel")
        elif t == "Digits":
            out.append("digits:individual" if p.get("individual_digits") else "digits")
        elif t == "Split":
            pat = p.get("pattern", {})
            out.append("split:" + (pat.get("Regex") or pat.get("String") or "?"))
        else:
            out.append(str(t))
    return tuple(out)


def _template_flags(post: dict[str, Any] | None) -> tuple[bool, bool]:
    """(adds a special token before, after) a single sequence, from the post-processor."""
    if not post:
        return False, False
    if post.get("type") == "Sequence":
        flags = [_template_flags(p) for p in post.get("processors", [])]
        return any(f[0] for f in flags), any(f[1] for f in flags)
    if post.get("type") != "TemplateProcessing":
        return False, False
    single = post.get("single") or []
    is_special = lambda item: "SpecialToken" in item
    return bool(single) and is_special(single[0]), bool(single) and is_special(single[-1])


def _token_content(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _merge_string(m: Any) -> str:
    if isinstance(m, str):
        return m
    a, b = m
    # llama.cpp separates the two halves by one space; spaces inside them use the shifted code point
    return f"{a.replace(' ', chr(288))} {b.replace(' ', chr(288))}"


def tokenizer_meta(assets: dict[str, bytes], hf_config: dict[str, Any]) -> TokenizerMeta:
    """Build llama.cpp tokenizer metadata from the HF tokenizer files; raise if unsupported."""
    tj = _json_asset(assets, "tokenizer.json")
    tc = _json_asset(assets, "tokenizer_config.json") or {}
    if tj is None:
        raise FormatConstraintError(
            "gguf: the model has no tokenizer.json among its files; GGUF needs the full vocabulary "
            "(re-run from a model directory that has a fast tokenizer)"
        )
    model = tj.get("model", {})
    mtype = model.get("type")
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    n_vocab = int(hf_config["vocab_size"])
    if mtype == "BPE":
        id_to_tok = {int(i): t for t, i in model["vocab"].items()}
    elif mtype == "Unigram":
        id_to_tok = {i: piece for i, (piece, _) in enumerate(model["vocab"])}
    else:
        raise FormatConstraintError(
            f"gguf: tokenizer model type {mtype!r} is not supported; awqconv writes BPE and "
            "SentencePiece (Unigram/BPE with byte fallback) vocabularies"
        )
    for i, a in added.items():
        id_to_tok[i] = a["content"]
    top = max(id_to_tok) + 1 if id_to_tok else 0
    if top > n_vocab:
        raise FormatConstraintError(
            f"gguf: the tokenizer has token id {top - 1} but the embedding has {n_vocab} rows"
        )
    spm = mtype == "Unigram" or bool(model.get("byte_fallback"))
    unk = _token_content(tc.get("unk_token")) or model.get("unk_token")
    special_added = {i for i, a in added.items() if a.get("special")}

    tokens, types, scores = [], [], []
    spm_scores = _sentencepiece_scores(assets) if spm else None
    for i in range(n_vocab):
        tok = id_to_tok.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        tokens.append(tok)
        if i in added:
            special = i in special_added or (not spm and _SPECIAL_LOOKING.match(tok) is not None)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        elif spm and _BYTE_TOKEN.match(tok):
            types.append(TokenType.BYTE)
        elif spm and tok == unk:
            types.append(TokenType.UNKNOWN)
        else:
            types.append(TokenType.NORMAL)
        if spm_scores is not None and i < len(spm_scores):
            scores.append(spm_scores[i])
        elif mtype == "Unigram":
            scores.append(float(model["vocab"][i][1]) if i < len(model["vocab"]) else -1000.0)
        else:
            scores.append(-1000.0 if i in added else -float(i))  # SentencePiece BPE: rank order

    meta = TokenizerMeta(
        model="llama" if spm else "gpt2",
        pre=None,
        tokens=tokens,
        types=[int(t) for t in types],
        scores=scores if spm else None,
    )
    if spm:
        meta.pre = "default"
        meta.add_space_prefix = _spm_space_prefix(tj)
    else:
        fp = _pre_fingerprint(tj.get("pre_tokenizer"))
        if fp not in PRE_TOKENIZERS:
            raise FormatConstraintError(
                f"gguf: the BPE pre-tokenizer {fp} has no llama.cpp equivalent known to awqconv; "
                "llama.cpp would tokenize differently from the HF tokenizer"
            )
        meta.pre = PRE_TOKENIZERS[fp]
        meta.merges = [_merge_string(m) for m in model.get("merges", [])]
        if not meta.merges:
            raise FormatConstraintError("gguf: tokenizer.json has no BPE merges; llama.cpp needs them")

    tok_to_id = {t: i for i, t in id_to_tok.items()}
    for kind in ("bos", "eos", "unk", "pad"):
        content = _token_content(tc.get(f"{kind}_token"))
        tid = tok_to_id.get(content) if content is not None else None
        if tid is None:
            cid = hf_config.get(f"{kind}_token_id")
            tid = cid[0] if isinstance(cid, list) and cid else cid
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            meta.special_ids[kind] = tid
    before, after = _template_flags(tj.get("post_processor"))
    meta.add_bos = bool(tc["add_bos_token"]) if "add_bos_token" in tc else before
    meta.add_eos = bool(tc["add_eos_token"]) if "add_eos_token" in tc else after
    meta.chat_template = _chat_template(assets, tc)
    return meta


def _spm_space_prefix(tj: dict[str, Any]) -> bool:
    text = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text


def _sentencepiece_scores(assets: dict[str, bytes]) -> list[float] | None:
    raw = assets.get("tokenizer.model")
    if raw is None:
        return None
    try:
        import sentencepiece
    except ImportError:
        return None  # fall back to tokenizer.json rank order
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(raw)
    return [float(sp.GetScore(i)) for i in range(sp.vocab_size())]


def _chat_template(assets: dict[str, bytes], tc: dict[str, Any]) -> str | None:
    t = tc.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if not t and "chat_template.jinja" in assets:
        t = assets["chat_template.jinja"].decode("utf-8")
    if not t:
        t = (_json_asset(assets, "chat_template.json") or {}).get("chat_template")
    return t or None


def add_tokenizer_metadata(w: GGUFWriter, meta: TokenizerMeta) -> None:
    w.add_tokenizer_model(meta.model)
    if meta.pre:
        w.add_tokenizer_pre(meta.pre)
    w.add_token_list(meta.tokens)
    w.add_token_types(meta.types)
    if meta.scores is not None:
        w.add_token_scores(meta.scores)
    if meta.merges:
        w.add_token_merges(meta.merges)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id,
               "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}
    for kind, tid in meta.special_ids.items():
        setters[kind](tid)
    w.add_add_bos_token(meta.add_bos)
    w.add_add_eos_token(meta.add_eos)
    if meta.add_space_prefix is not None:
        w.add_add_space_prefix(meta.add_space_prefix)
    if meta.chat_template:
        w.add_chat_template(meta.chat_template)
