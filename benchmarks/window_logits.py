"""`generate()` with the LM head over the block being filled (the library's way) against the LM head over every
position, the rows read afterwards (as before), alternating in one process: long prompts, where the head's share of a
denoising pass and its logits (B x L x V) are largest.

diffuapriel-1.3b with random weights in bf16, batch 1, a random prompt of each length, greedy, in blocks: the wall
time of each `generate()` call (after one warm-up call of each shape, which captures the CUDA graphs of steps up to
16K tokens), the peak GPU memory of a call, and whether both give the same tokens.

    python benchmarks/window_logits.py --out benchmarks/results/window_logits.json
"""

import argparse
import time
from pathlib import Path

import torch

from harness import build, new_result, save, sharing_weights  # benchmarks/harness.py, beside this script

from diffuapriel_hf import DiffuAprielForMaskedLM

VARIANTS = ["window", "every position"]


class EveryPositionLogits(DiffuAprielForMaskedLM):
    """The denoising pass as it was: the LM head over every position, the rows `logits_to_keep` asks for read from
    its output afterwards (generate() asks for the block being filled)."""

    def forward(self, *args, logits_to_keep=0, **kwargs):
        output = super().forward(*args, logits_to_keep=0, **kwargs)
        if isinstance(logits_to_keep, torch.Tensor):
            output.logits = output.logits[:, logits_to_keep]
        elif logits_to_keep:
            output.logits = output.logits[:, -logits_to_keep:]
        return output


def timed_generate(model, ids, settings) -> tuple[torch.Tensor, float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = model.generate(ids, **settings)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="denoising passes in all (over all blocks)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = build("diffuapriel-1.3b", max_position_embeddings=max(args.prompt_lengths) + args.max_new_tokens)
    models = {"window": model, "every position": sharing_weights(model, EveryPositionLogits)}
    settings = dict(max_new_tokens=args.max_new_tokens, block_length=args.block_length, steps=args.steps,
                    do_sample=False)
    result = new_result(settings=settings, rows={})
    for length in args.prompt_lengths:
        ids = torch.randint(0, model.config.mask_token_id, (1, length), device="cuda")
        row = result["rows"][f"1 x {length}"] = {}
        outputs = {}
        for round_ in range(args.rounds + 1):  # round 0 warms up (graph capture, autotuning)
            for variant in VARIANTS:
                outputs[variant], seconds, peak = timed_generate(models[variant], ids, settings)
                if round_:
                    row.setdefault(f"{variant} seconds", []).append(seconds)
                    row[f"{variant} peak GiB"] = peak
                print(f"1 x {length:6d}  {variant:15s} {seconds:7.3f} s  peak {peak:6.2f} GiB", flush=True)
        row["same tokens"] = bool(torch.equal(outputs["window"], outputs["every position"]))
    save(result, args.out)


if __name__ == "__main__":
    main()
