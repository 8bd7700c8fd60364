"""Every Hugging Face architecture awqconv knows, one frozen row each: the single place to add a model.

A row (:class:`Arch`) is keyed by the class name in ``config.json``'s ``architectures`` and holds
three groups of columns:

- ``awq`` (:class:`AwqSpec`): which norm or linear absorbs which AWQ scale (:class:`MappingSpec`),
  where the decoder layers live, whether norms compute ``x * (1 + w)``, which linears skip the clip
  search and which stay dense. ``quant/mappings.py`` binds these names to live modules.
- ``gguf`` (:class:`GgufSpec`, or None where awqconv writes no GGUF): llama.cpp's architecture name,
  the HF -> llama.cpp tensor names (MoE experts stacked), which tensors take the rotary Q/K row
  permutation, and what the family's llama.cpp graph hard-codes (norm gain form, experts, soft-caps,
  windowed layers, query scale). ``formats/gguf_tensors.py`` and ``formats/gguf_arch.py`` read it.
- ``runtime`` (:class:`RuntimeSpec`): what a decoder must do to run the model (norm placement,
  q/k norms, activation, soft-capping, sliding window, MoE routing) and whether the built-in
  runtime (``runtime/model.py``) runs it.

A Llama-like model is one more row: ``register(replace(lookup("LlamaForCausalLM"), name="..."))``.
This module is a leaf: it imports only ``errors`` and the standard library (no torch), and
``quant``, ``formats`` and ``runtime`` import it, never the reverse.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import UnsupportedArchitecture

# ---------------------------------------------------------------------------------------------
# AWQ columns


@dataclass(frozen=True)
class MappingSpec:
    """The output channels of ``prev`` feed the input channels of every linear in ``layers``.

    ``prev /= s`` and ``layers *= s`` (``extra`` too) leaves the float model unchanged. Paths are
    relative to one decoder layer: ``self_attn.qkv_proj[v]`` names the rows of a fused linear that
    feed ``layers``; ``mlp.experts.*.gate_proj`` expands to one slot per expert.
    """

    prev: str  # "input_layernorm", "self_attn.v_proj", "self_attn.qkv_proj[v]", "mlp.gate_up_proj[up]"
    layers: tuple[str, ...]  # linears taking * s; "mlp.experts.*.gate_proj" expands over experts
    inspect: str | None  # parent module for the search loss; None = the linears themselves
    extra: tuple[str, ...] = ()  # consumers compensated with * s but never quantized (routers)
    vo: bool = False  # v -> o smoothing: one scale per kv channel, repeated over query heads
    # Which decoder layers legitimately lack this row's modules, in words; None: every layer has
    # them, and a layer without them is an error (UnsupportedArchitecture naming the row).
    absent_in: str | None = None

    def describe(self) -> str:
        return f"{self.prev} -> {', '.join(self.layers)}"


_QK_NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.qkv_proj")


@dataclass(frozen=True)
class AwqSpec:
    mappings: tuple[MappingSpec, ...]
    layers_path: str = "model.layers"  # the nn.ModuleList of decoder layers, from the model root
    offset_norm: bool = False  # Gemma-style RMSNorm computing x * (1 + w)
    # the clip search scores a linear by its own output error; q and k act only through q.k^T and
    # the softmax, which that error does not measure, so their range is left unclipped
    no_clip: tuple[str, ...] = _QK_NO_CLIP
    not_convert: tuple[str, ...] = ()  # linears inside blocks kept dense (recorded for writers)
    arch: str = ""  # the row's HF class name (set by Arch), for error messages


# ---------------------------------------------------------------------------------------------
# GGUF columns

# HF module path inside a decoder layer -> the llama.cpp tensor stem its loader expects
LLAMA_LAYER_TENSORS: tuple[tuple[str, str], ...] = (
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
)
# HF module path from the model root -> llama.cpp tensor stem
LLAMA_GLOBAL_TENSORS: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
)
_LLAMA_ROPE = ("self_attn.q_proj", "self_attn.k_proj")
_ATTN_TENSORS, _MLP_TENSORS = LLAMA_LAYER_TENSORS[:5], LLAMA_LAYER_TENSORS[5:]
_QK_NORM_TENSORS = (("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"))
# experts.*: every expert's linear goes into one 3-D tensor [expert, out, in] per layer
_MOE_TENSORS = (
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate", "ffn_gate_inp"),  # the router, written dense
    ("mlp.experts.*.gate_proj", "ffn_gate_exps"),
    ("mlp.experts.*.up_proj", "ffn_up_exps"),
    ("mlp.experts.*.down_proj", "ffn_down_exps"),
)
# Gemma 2/3 norm the attention output and the MLP's input and output; llama.cpp's ffn_norm is the pre-MLP one
_GEMMA2_LAYER_TENSORS = _ATTN_TENSORS + (
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
) + _MLP_TENSORS[1:]
_PHI3_LAYER_TENSORS = (
    ("input_layernorm", "attn_norm"),
    ("self_attn.qkv_proj", "attn_qkv"),  # fused q|k|v rows, split by llama.cpp
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_up_proj", "ffn_up"),  # gate rows then up rows: llama.cpp's SwiGLU takes silu of the first half
    ("mlp.down_proj", "ffn_down"),
)
_TIED_ONLY = LLAMA_GLOBAL_TENSORS[:2]  # graphs that always reuse token_embd as the output matrix
_GELU = ("gelu_pytorch_tanh", "gelu")  # llama.cpp computes the tanh approximation for Gemma's "gelu"


@dataclass(frozen=True)
class GgufSpec:
    arch: str  # llama.cpp's general.architecture
    layer_tensors: tuple[tuple[str, str], ...] = LLAMA_LAYER_TENSORS  # (HF path in a layer, llama.cpp stem)
    global_tensors: tuple[tuple[str, str], ...] = LLAMA_GLOBAL_TENSORS  # (HF path from the root, stem)
    # (q, k) module paths whose output rows go from HF's half-split rotary layout to llama.cpp's
    # adjacent pairs: q over num_attention_heads, k over num_key_value_heads. None: llama.cpp
    # applies the half-split (NEOX) rope for this architecture itself, so rows stay as they are.
    rope_permute: tuple[str, str] | None = _LLAMA_ROPE
    act: tuple[str, ...] = ("silu",)  # HF activation names computed by the gated MLP llama.cpp hard-codes
    heads_span_hidden: bool = False  # the graph needs num_attention_heads * head_dim == hidden_size
    # HF norms compute x * (1 + w), llama.cpp's x * w: every *norm.weight is written as w + 1
    norm_plus_one: bool = False
    # config keys of the expert count and experts per token (expert_count / expert_used_count)
    experts: tuple[str, str] | None = None
    expert_width_key: str | None = None  # config key written as expert_feed_forward_length
    softcaps: tuple[str, ...] = ()  # soft-capping config keys the graph applies when the file sets them
    softcap_always: bool = False  # ... and applies even when it does not (llama.cpp's defaults, 50 and 30)
    # llama.cpp windows layer i iff i % p < p - 1 with p this default period (or the one written);
    # None: the graph has no windowed layers
    swa_period: int | None = None
    # llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) at this layer count
    # (Gemma 27B), instead of reading query_pre_attn_scalar
    query_scale_27b_layers: int | None = None


# ---------------------------------------------------------------------------------------------
# runtime columns


@dataclass(frozen=True)
class MoeRouting:
    """softmax over the router logits, top-k experts, weights optionally renormalized to sum 1."""

    experts_key: str  # config key holding the number of experts
    top_k_key: str = "num_experts_per_tok"
    renormalize: bool | str = True  # divide the top-k weights by their sum: always, or when this config flag is true
    dense_layers_key: str | None = None  # config key listing layers with a dense MLP instead
    sparse_step_key: str | None = None  # config key: layer i is sparse iff (i + 1) % step == 0


@dataclass(frozen=True)
class RuntimeSpec:
    runs: bool = False  # the built-in runtime (runtime/model.py) runs this architecture
    # "pre": RMSNorm before attention and before the MLP (input_layernorm, post_attention_layernorm);
    # "sandwich": also after them (Gemma2: post_attention_layernorm on the attention output,
    # pre_/post_feedforward_layernorm around the MLP). The gain form is ``awq.offset_norm``.
    norms: str = "pre"
    qk_norm: bool = False  # per-head RMSNorm on q and k after their projections, before RoPE
    act_key: str = "hidden_act"  # config key naming the MLP activation (gated: act(gate) * up)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size)
    softcap_keys: tuple[str, ...] = ()  # config keys of tanh soft-capping (attention scores, logits)
    # How config.sliding_window applies: None, no sliding window; "always": to every layer
    # whenever it is set; "use_sliding_window": only when that config flag is true; "alternate":
    # every other layer (layer_types, sliding first).
    sliding_window: str | None = None
    moe: MoeRouting | None = None
    # config key of the query pre-attention scalar q: scores are scaled by q ** -0.5 instead of
    # head_dim ** -0.5 (Gemma 2/3: query_pre_attn_scalar, 144 against head_dim 128 in Gemma 2 27B)
    attn_scale_key: str | None = None

    def window(self, cfg: Mapping[str, Any]) -> int | None:
        """The attention window the built-in runtime applies to every layer (None: full attention)."""
        on = cfg.get("use_sliding_window", self.sliding_window == "always")
        return cfg.get("sliding_window") if on else None


# ---------------------------------------------------------------------------------------------
# the row


@dataclass(frozen=True)
class Arch:
    name: str  # HF class in config.json's architectures, e.g. "LlamaForCausalLM"
    awq: AwqSpec
    gguf: GgufSpec | None = None  # None: awqconv writes no GGUF for this architecture
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    def __post_init__(self) -> None:
        if self.awq.arch != self.name:  # every row owns its AwqSpec, named after it
            object.__setattr__(self, "awq", replace(self.awq, arch=self.name))

    @property
    def writes_gguf(self) -> bool:
        return self.gguf is not None


_ATTN = (
    MappingSpec("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    MappingSpec("self_attn.v_proj", ("self_attn.o_proj",), None, vo=True),
)
_MLP = (
    MappingSpec("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    MappingSpec("mlp.up_proj", ("mlp.down_proj",), None),
)
_MOE = (
    MappingSpec(
        "post_attention_layernorm",
        ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
        "mlp",
        extra=("mlp.gate",),  # the router reads the same normed input (llm-compressor PR #2451)
    ),
    MappingSpec("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), None),
)
# Qwen3-MoE layers listed in mlp_only_layers (or off the decoder_sparse_step) have a dense MLP
# instead of the experts: each MLP kind's rows are absent from the other kind's layers.
_QWEN3_MOE_SPARSE = tuple(
    replace(m, absent_in="dense-MLP layers (mlp_only_layers, or off decoder_sparse_step)") for m in _MOE
)
_QWEN3_MOE_DENSE = tuple(replace(m, absent_in="sparse MoE layers") for m in _MLP)

_LLAMA_AWQ = AwqSpec(mappings=_ATTN + _MLP)
_MOE_ROUTER = ("mlp.gate",)  # the router stays dense: its logits pick the experts, and it is small

_ROWS = (
    Arch(
        "LlamaForCausalLM",
        _LLAMA_AWQ,
        gguf=GgufSpec("llama"),
        runtime=RuntimeSpec(runs=True),
    ),
    Arch(
        "MistralForCausalLM",
        _LLAMA_AWQ,
        gguf=GgufSpec("llama"),
        runtime=RuntimeSpec(runs=True, sliding_window="always"),
    ),
    Arch(
        "Qwen2ForCausalLM",
        _LLAMA_AWQ,  # qkv bias: v_proj's bias is divided with its rows
        # llama.cpp runs qwen2 with NEOX (half-split) rope
        gguf=GgufSpec("qwen2", rope_permute=None, heads_span_hidden=True),
        # transformers windows only layers >= max_window_layers (layer_types); so does the built-in runtime
        runtime=RuntimeSpec(runs=True, sliding_window="use_sliding_window"),
    ),
    Arch(
        "Qwen3ForCausalLM",
        _LLAMA_AWQ,  # q_norm/k_norm act per head after q/k: input scaling is unaffected
        # q_norm/k_norm per head; llama.cpp runs qwen3 with NEOX rope
        gguf=GgufSpec("qwen3", layer_tensors=LLAMA_LAYER_TENSORS + _QK_NORM_TENSORS, rope_permute=None),
        runtime=RuntimeSpec(runs=True, qk_norm=True, sliding_window="use_sliding_window"),
    ),
    Arch(
        "GemmaForCausalLM",
        AwqSpec(offset_norm=True, mappings=_ATTN + _MLP),
        gguf=GgufSpec("gemma", global_tensors=_TIED_ONLY, rope_permute=None, act=_GELU, norm_plus_one=True),
        # hidden_act "gelu" in a Gemma config means the tanh approximation
        runtime=RuntimeSpec(runs=True, embed_scale=True),
    ),
    Arch(
        "Gemma2ForCausalLM",
        AwqSpec(
            offset_norm=True,
            mappings=_ATTN
            + (
                # post_attention_layernorm normalizes the attention output; the MLP reads pre_feedforward
                MappingSpec("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                MappingSpec("mlp.up_proj", ("mlp.down_proj",), None),
            ),
        ),
        gguf=GgufSpec(
            "gemma2",
            layer_tensors=_GEMMA2_LAYER_TENSORS,
            global_tensors=_TIED_ONLY,
            rope_permute=None,
            act=_GELU,
            norm_plus_one=True,
            softcaps=("attn_logit_softcapping", "final_logit_softcapping"),
            softcap_always=True,
            swa_period=2,
            query_scale_27b_layers=46,
        ),
        runtime=RuntimeSpec(
            runs=True,
            norms="sandwich",
            act_key="hidden_activation",
            embed_scale=True,
            softcap_keys=("attn_logit_softcapping", "final_logit_softcapping"),
            sliding_window="alternate",
            attn_scale_key="query_pre_attn_scalar",
        ),
    ),
    Arch(
        "Gemma3ForCausalLM",  # the text model (model_type gemma3_text)
        AwqSpec(
            offset_norm=True,  # q_norm/k_norm too; they act per head after q/k, so input scaling leaves them alone
            mappings=_ATTN
            + (
                MappingSpec("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                MappingSpec("mlp.up_proj", ("mlp.down_proj",), None),
            ),
        ),
        gguf=GgufSpec(
            "gemma3",
            layer_tensors=_GEMMA2_LAYER_TENSORS + _QK_NORM_TENSORS,
            rope_permute=None,
            act=("gelu_pytorch_tanh",),
            norm_plus_one=True,
            softcaps=("final_logit_softcapping",),
            swa_period=6,
            query_scale_27b_layers=62,
        ),
        runtime=RuntimeSpec(
            runs=True,
            norms="sandwich",
            qk_norm=True,
            act_key="hidden_activation",
            embed_scale=True,
            # transformers' Gemma 3 attention never reads attn_logit_softcapping ("": no key)
            softcap_keys=("", "final_logit_softcapping"),
            sliding_window="alternate",  # layer_types: 5 sliding layers to 1 full by default
            attn_scale_key="query_pre_attn_scalar",
        ),
    ),
    Arch(
        "Phi3ForCausalLM",
        AwqSpec(
            mappings=(
                MappingSpec("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
                MappingSpec("self_attn.qkv_proj[v]", ("self_attn.o_proj",), None, vo=True),
                MappingSpec("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
                MappingSpec("mlp.gate_up_proj[up]", ("mlp.down_proj",), None),
            )
        ),
        # llama.cpp splits the fused qkv and gate_up itself and runs phi3 with NEOX rope
        gguf=GgufSpec("phi3", layer_tensors=_PHI3_LAYER_TENSORS, rope_permute=None, heads_span_hidden=True),
        runtime=RuntimeSpec(runs=True, sliding_window="always"),
    ),
    Arch(
        "MixtralForCausalLM",
        AwqSpec(mappings=_ATTN + _MOE, not_convert=_MOE_ROUTER),
        # llama.cpp's llama graph routes experts when expert_count is set; renormalized top-k as Mixtral
        gguf=GgufSpec(
            "llama", layer_tensors=_ATTN_TENSORS + _MOE_TENSORS, experts=("num_local_experts", "num_experts_per_tok")
        ),
        runtime=RuntimeSpec(runs=True, sliding_window="always", moe=MoeRouting("num_local_experts")),
    ),
    Arch(
        "Qwen3MoeForCausalLM",
        AwqSpec(mappings=_ATTN + _QWEN3_MOE_SPARSE + _QWEN3_MOE_DENSE, not_convert=_MOE_ROUTER),
        gguf=GgufSpec(
            "qwen3moe",
            layer_tensors=_ATTN_TENSORS + _QK_NORM_TENSORS + _MOE_TENSORS,
            rope_permute=None,
            experts=("num_experts", "num_experts_per_tok"),
            expert_width_key="moe_intermediate_size",
        ),
        runtime=RuntimeSpec(
            runs=True,
            qk_norm=True,
            sliding_window="use_sliding_window",
            moe=MoeRouting(
                "num_experts",
                renormalize="norm_topk_prob",
                dense_layers_key="mlp_only_layers",
                sparse_step_key="decoder_sparse_step",
            ),
        ),
    ),
)

REGISTRY: dict[str, Arch] = {row.name: row for row in _ROWS}


# ---------------------------------------------------------------------------------------------
# lookups


def register(row: Arch) -> Arch:
    """Add a row; an architecture is registered once."""
    if row.name in REGISTRY:
        raise ValueError(f"architecture {row.name} is already registered")
    REGISTRY[row.name] = row
    return row


@contextmanager
def registered(row: Arch) -> Iterator[Arch]:
    """``register(row)`` for the duration of a ``with`` block (tests, experiments)."""
    register(row)
    try:
        yield row
    finally:
        REGISTRY.pop(row.name, None)


def lookup(name: str) -> Arch | None:
    return REGISTRY.get(name)


def first_known(names: Iterable[str]) -> Arch | None:
    """The row of the first registered name in ``names`` (a config's ``architectures`` list)."""
    return next((REGISTRY[n] for n in names if n in REGISTRY), None)


def names() -> list[str]:
    """Every registered architecture, sorted: the ones awqconv quantizes."""
    return sorted(REGISTRY)


def gguf_supported() -> list[str]:
    """Architectures awqconv writes GGUF for, in registration order."""
    return [n for n, row in REGISTRY.items() if row.gguf is not None]


def runtime_supported() -> list[str]:
    """Architectures the built-in runtime runs, in registration order."""
    return [n for n, row in REGISTRY.items() if row.runtime.runs]


def runtime_row(cfg: Mapping[str, Any]) -> Arch:
    """The row of ``cfg['architectures'][0]`` if the built-in runtime runs it, else UnsupportedArchitecture."""
    arch = (cfg.get("architectures") or ["?"])[0]
    row = REGISTRY.get(arch)
    if row is None or not row.runtime.runs:
        raise UnsupportedArchitecture(
            f"the built-in runtime does not run {arch}; supported: {', '.join(runtime_supported())}"
        )
    return row
