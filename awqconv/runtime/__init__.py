"""The built-in runtime: a decoder over INT4 linears for every registry family (model.py, built by
build.py, configured by spec.py from archs.RuntimeSpec; MoE blocks in moe.py; its one-token GPU step in
decode_chain.py, its switches in options.py), batched generation with streaming and CUDA graphs
(generate.py), artifact loading (lm.py), and the verify / bench / chat back-ends the CLI calls."""

from .bench import bench, format_table
from .chat import chat
from .generate import GenerationResult, Generator, SamplingParams
from .lm import RuntimeLM, load_quantized
from .model import Decoder, build_decoder
from .options import RuntimeOptions
from .verify import VerifyReport, verify

__all__ = ["Decoder", "GenerationResult", "Generator", "RuntimeLM", "RuntimeOptions", "SamplingParams", "VerifyReport",
           "bench", "build_decoder", "chat", "format_table", "load_quantized", "verify"]
