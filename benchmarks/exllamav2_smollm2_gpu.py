"""ExLlamaV2 vs awqconv's runtime on the SmolLM2-135M exllamav2 export (GPU).

The export is made on the CPU (it is larger than one device call carries, so it travels split
into zstd parts):
    awqconv quantize builtin:smollm2-135m -g 64 --calib-samples 64 --to exllamav2 -o out/
    python benchmarks/exllamav2_smollm2_gpu.py --export out/exllamav2   # -> $OUT/exllamav2_smollm2_gpu.json
ExLlamaV2 0.3.2 (EXLLAMA_NO_SDPA=1) loads the directory; awqconv reads the same directory back to
canonical (its exllamav2 reader) and runs its runtime in fp16 and a dense fp32 reference. Prompts are
fixed texts plus 256 tokens of awqconv/data/eval_heldout.txt, tokenized by the export's tokenizer.json.
Reported per pair: max/mean |dlogit|, logit scale, top-1 agreement; and each side's 24-token greedy
continuation of the first prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import exllamav2_7b_gpu as bench7b  # noqa: E402  (sets EXLLAMA_NO_SDPA through exllamav2_gpu)
import torch  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is the boiling point of water at sea level?<|im_end|>\n<|im_start|>assistant\n",
]


def greedy(step, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, recomputing the whole prefix each step (both sides the same way)."""
    out = list(ids)
    for _ in range(n):
        out.append(int(step(out).argmax()))
    return out[len(ids):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, help="the exllamav2 export directory")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    t0 = time.time()
    export = Path(args.export)
    from tokenizers import Tokenizer

    from awqconv.formats import exllamav2 as exl_format

    build = bench7b.start_exllamav2_build(Path("/tmp/exllamav2_build.log"))
    tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    held = (HERE.parent / "awqconv" / "data" / "eval_heldout.txt").read_text()
    prompts = [tok.encode(p).ids for p in PROMPTS] + [tok.encode(held).ids[:256]]
    qm = exl_format.read(export)
    vocab = int(qm.hf_config["vocab_size"])
    res = {"export": str(export), "prompt_tokens": [len(p) for p in prompts], "torch": torch.__version__,
           "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "group_size": qm.quant_config.group_size, "linears": len(qm.linears),
           "zero_point_0_groups": sum(int((p.zeros == 0).sum()) for p in qm.linears.values())}
    qm.linears = {k: v.to("cuda") for k, v in qm.linears.items()}
    ours, _ = bench7b.runtime_logits(qm, "cuda", prompts, torch.float16)
    ref32, _ = bench7b.runtime_logits(qm, "cuda", prompts, torch.float32, mode="dense")
    res["runtime_fp16_vs_fp32_dense"] = bench7b.compare(ours, ref32)

    from awqconv.runtime import RuntimeLM, build_decoder

    lm = RuntimeLM(build_decoder(qm, "cuda", dtype=torch.float16))
    res["runtime_greedy"] = tok.decode(greedy(lambda ids: lm(torch.tensor([ids])).logits[0, -1], prompts[0], 24))
    del lm

    rc = build.wait()
    if rc:
        print(Path("/tmp/exllamav2_build.log").read_text()[-3000:])
    import exllamav2
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    model = ExLlamaV2(ExLlamaV2Config(str(export)))
    model.load()
    res["exllamav2"] = exllamav2.__version__
    with torch.inference_mode():
        def exl_logits(ids: list[int]) -> torch.Tensor:
            return model.forward(torch.tensor([ids]))[0, :, :vocab].float().cpu()

        theirs = [exl_logits(p) for p in prompts]
        res["exllamav2_greedy"] = tok.decode(greedy(lambda ids: exl_logits(ids)[-1], prompts[0], 24))
    res["runtime_vs_exllamav2"] = bench7b.compare(ours, theirs)
    res["exllamav2_vs_fp32_dense"] = bench7b.compare(theirs, ref32)
    res["wall_s"] = round(time.time() - t0, 1)
    out = Path(os.environ.get("OUT", "/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "exllamav2_smollm2_gpu.json").write_text(json.dumps(res, indent=1))
    summary = {k: ({kk: vv for kk, vv in v.items() if kk != "per_prompt"} if isinstance(v, dict) else v)
               for k, v in res.items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
