"""LoRA on an awqconv PEFT-layout directory with plain transformers + peft (no awqconv import).

    awqconv quantize <model> --to exllamav2,peft -o out/
    python examples/train.py out/peft --output out/adapter [--text my.txt] [--steps 100]
    awqconv export out/peft --to hf-awq,gguf,exllamav2 --adapter out/adapter --adapter-mode separate -o out2/

The base weights are frozen (LoRA only), so out/peft still converts back to the exact INT4 model.
Never merge the adapter into out/peft; let `awqconv export --adapter-mode merge` do it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="the peft/ directory awqconv wrote")
    ap.add_argument("--output", type=Path, default=Path("adapter"), help="where to save the adapter")
    ap.add_argument("--text", type=Path, help="training text, one example per line")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lines = args.text.read_text().splitlines() if args.text else DEFAULT_TEXT
    lines = [line for line in lines if line.strip()]
    batch = tok(lines, return_tensors="pt", padding=True, truncation=True, max_length=args.max_len).to(device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                        target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for step in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.save_pretrained(args.output)
    print(f"adapter saved to {args.output}")


if __name__ == "__main__":
    main()
