"""Held-out bits per token (negative ELBO) of trained models on the standard library's held-out modules. For a block
diffusion model (config.block_size) the bound is the block-factorised one, sum over blocks of NELBO(block | the clean
blocks before it): an upper bound on -log p(x) too.

    python benchmarks/default_model/evaluate.py MODEL_DIR [MODEL_DIR ...] --output results.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from diffuapriel_hf import DiffuAprielForMaskedLM
from diffuapriel_hf.training.evaluation import text_bits_per_token
from diffuapriel_hf.training.stdlib_corpus import HELD_OUT_MODULES, stdlib_files

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for the harness beside the scripts
from harness import new_result, save  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--num_samples", type=int, default=16, help="points of the fixed t grid")
    parser.add_argument("--files", type=int, help="the first N held-out files only (a quick check); default: all")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    files = stdlib_files("heldout")[: args.files]
    texts = [path.read_text(encoding="utf-8") for path in files]
    results = new_result(held_out_modules=list(HELD_OUT_MODULES), held_out_files=len(files), seq_len=args.seq_len,
                         num_samples=args.num_samples, models={})
    for folder in args.models:
        model = DiffuAprielForMaskedLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        scores = text_bits_per_token(model, tokenizer, texts, seq_len=args.seq_len, num_samples=args.num_samples,
                                     batch_size=args.batch_size)
        scores["parameters"] = sum(p.numel() for p in model.parameters())
        scores["layer_types"] = sorted(set(model.config.layer_types))
        scores["block_size"] = model.config.block_size
        results["models"][folder] = scores
        print(folder, json.dumps(scores), flush=True)
    save(results, args.output)


if __name__ == "__main__":
    main()
