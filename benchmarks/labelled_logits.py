"""What computing the training loss from the labelled positions' logits alone (`skip_logits`, the default of a
training step) saves against the logits of every position (`skip_logits=False`, the path before it): one training
step (forward with the loss, backward, AdamW), float32 on the CPU, or bf16 on a GPU with --device cuda.

Each (config, path) runs in a fresh subprocess so that its peak resident memory is its own (on CUDA: the peak
allocated). The batch comes from the train command's collator with fixed seeds (the same masks both ways); the share
of labelled (masked) positions is reported, since the saving grows with the unlabelled share.

    python benchmarks/labelled_logits.py --out benchmarks/results/labelled_logits_cpu
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from harness import new_result, save, wall_seconds

CONFIGS = {
    # ~50M parameters: GPT-2 vocabulary, 6 bidirectional Mamba-2 blocks of width 512 (as benchmarks/cpu_scaling.py).
    "mamba-50m": dict(name="diffuapriel-240m", hidden_size=512, num_hidden_layers=6, intermediate_size=1024),
    "diffuapriel-240m": dict(name="diffuapriel-240m"),
}
PATHS = {"labelled positions": True, "every position": False}  # name -> skip_logits


def measure(config_name: str, skip_logits: bool, batch_size: int, length: int, reps: int, device: str) -> dict:
    """Runs in the child process: `reps` timed training steps after an untimed one, and the peak memory."""
    from diffuapriel_hf import DataCollatorForMaskedDiffusion, DiffuAprielForMaskedLM, preset_config

    fields = dict(CONFIGS[config_name])
    config = preset_config(fields.pop("name"), **fields)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = DiffuAprielForMaskedLM(config).to(device, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokenizer = SimpleNamespace(mask_token_id=config.mask_token_id, pad_token_id=config.pad_token_id,
                                padding_side="right")
    ids = torch.randint(0, config.mask_token_id, (batch_size, length), generator=torch.Generator().manual_seed(0))
    examples = [{"input_ids": row.tolist(), "noise_seed": i} for i, row in enumerate(ids)]
    batch = DataCollatorForMaskedDiffusion(tokenizer)(examples)  # nothing is padded: no attention mask
    batch = {name: tensor.to(device) for name, tensor in batch.items()}

    def step():
        model(**batch, skip_logits=skip_logits).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = wall_seconds(step, reps)
    peak_mib = (torch.cuda.max_memory_allocated() if device == "cuda"
                else 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20
    return dict(config=config_name, skip_logits=skip_logits, parameters=model.num_parameters(), batch=batch_size,
                length=length, labelled_share=float((batch["labels"] != -100).float().mean()),
                step_seconds=seconds, step_s=statistics.median(seconds), peak_memory_mib=round(peak_mib, 1))


def markdown(result: dict) -> str:
    lines = [f"One training step (forward with the loss, backward, AdamW) on {result['device_argument']}, median of "
             f"{result['reps']} steps after an untimed one; peak memory: "
             f"{'allocated' if result['device_argument'] == 'cuda' else 'resident (whole process)'}.", "",
             "| config | params | batch x length | labelled share | loss from | step s | peak MiB | speed-up | "
             "memory saved MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        full = next(r for r in result["rows"] if r["config"] == row["config"] and not r["skip_logits"])
        path = next(name for name, skip in PATHS.items() if skip == row["skip_logits"])
        lines.append(f"| {row['config']} | {row['parameters'] / 1e6:.1f}M | {row['batch']} x {row['length']} | "
                     f"{row['labelled_share']:.0%} | {path} | {row['step_s']:.3f} | {row['peak_memory_mib']:,.0f} | "
                     f"{full['step_s'] / row['step_s']:.2f}x | "
                     f"{full['peak_memory_mib'] - row['peak_memory_mib']:,.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="path stem of the .json and .md")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "SKIP_LOGITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = measure(args.child[0], args.child[1] == "True", args.batch, args.length, args.reps, args.device)
        print(json.dumps(row))
        return
    if args.out is None:
        parser.error("give --out")
    result = new_result(device_argument=args.device, torch_threads=torch.get_num_threads(), reps=args.reps, rows=[])
    for config_name in args.configs:
        for skip_logits in PATHS.values():
            child = [sys.executable, __file__, "--child", config_name, str(skip_logits), "--batch", str(args.batch),
                     "--length", str(args.length), "--reps", str(args.reps), "--device", args.device]
            row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    save(result, args.out, markdown=markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
