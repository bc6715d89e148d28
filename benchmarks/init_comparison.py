"""Does Mamba-2's own initialisation train better than the one before it? Short training runs on the CPU.

The two initialisations differ in two places only (`DiffuAprielPreTrainedModel._init_weights`):
  - "mamba2" (the model's own): each Mamba direction's depthwise `conv1d` as PyTorch initialises a Conv1d
    (kaiming-uniform, a = sqrt(5)), and the projections that write into the residual stream (`out_proj`, `o_proj`,
    `down_proj`) kaiming-uniform divided by sqrt(the stack's residual branches), as mamba-ssm does;
  - "normal" (before it): transformers' default normal(0, initializer_range) for both.
Each run of a seed starts from the same model otherwise (built with the model's own initialisation, then those
weights redrawn for "normal" from a generator of their own), and trains on the same batches with the same noise for
the same steps: the shipped model's recipe (the Python standard library with the shipped tokenizer, AdamW with
weight decay 0.1, cosine schedule with warm-up), shortened to fit minutes on a CPU. The score is the held-out negative
ELBO in bits per token (`training.evaluation.text_bits_per_token`, as benchmarks/default_model/evaluate.py computes
it) on held-out modules' files, on a fixed time grid and masking seed.

The runs of benchmarks/results/init_comparison*.json (one torch thread each, about 5-10 minutes a run on a shared
two-core machine):

    python benchmarks/init_comparison.py --seeds 0 1 --threads 1 --out benchmarks/results/init_comparison
    python benchmarks/init_comparison.py --seeds 2 3 --threads 1 --out benchmarks/results/init_comparison_seeds_2_3
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

from diffuapriel_hf import DataCollatorForMaskedDiffusion, DiffuAprielForMaskedLM, default_model_path, preset_config
from diffuapriel_hf.modeling.modeling_diffuapriel import RESIDUAL_PROJECTIONS
from diffuapriel_hf.training.data import document_stream
from diffuapriel_hf.training.evaluation import text_bits_per_token
from diffuapriel_hf.training.stdlib_corpus import stdlib_files

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for the harness beside the scripts
from harness import new_result, save  # noqa: E402

INITS = ("mamba2", "normal")


def training_sequences(tokenizer, seq_len: int) -> torch.Tensor:
    """(S, seq_len) token ids: the training split's documents joined and cut, the remainder dropped."""
    texts = [path.read_text(encoding="utf-8") for path in stdlib_files("train")]
    stream = torch.tensor(document_stream(tokenizer, texts))
    return stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)


def build_model(args, tokenizer, init: str, seed: int) -> DiffuAprielForMaskedLM:
    """The preset with the model's own initialisation (seed `seed`); for "normal", the convolutions and the residual
    projections redrawn from normal(0, initializer_range) with a generator of their own, everything else the same."""
    config = preset_config(args.preset, vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = DiffuAprielForMaskedLM(config)
    if init == "normal":
        generator = torch.Generator().manual_seed(seed + 1)
        redrawn = [module.weight for module in model.modules() if isinstance(module, nn.Conv1d)]
        redrawn += [getattr(module, name).weight for module in model.modules()
                    for kind, name in RESIDUAL_PROJECTIONS if isinstance(module, kind)]
        with torch.no_grad():
            for weight in redrawn:
                weight.normal_(0, config.initializer_range, generator=generator)
    return model


def train(model, sequences: torch.Tensor, collator, args, seed: int) -> list[float]:
    """Trains `model` in place for `args.steps` steps; returns the loss of each step. The batches (a seeded
    permutation of the sequences) and their noise (a seed per example) depend on `seed` only."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed))
    model.train()
    losses = []
    for step in range(args.steps):
        rows = order[step * args.batch_size : (step + 1) * args.batch_size]
        batch = collator([dict(input_ids=sequences[row].tolist(), noise_seed=seed * 10**6 + step * args.batch_size + i)
                          for i, row in enumerate(rows.tolist())])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)
    return losses


def curve_summary(losses: list[float], window: int) -> dict:
    """Mean losses over consecutive windows of `window` steps (nats, 1/t-weighted), and the last window's."""
    means = [sum(losses[i : i + window]) / len(losses[i : i + window]) for i in range(0, len(losses), window)]
    return dict(window=window, window_means=[round(m, 4) for m in means], final=round(means[-1], 4))


def run(args, tokenizer, sequences, held_out_texts, init: str, seed: int) -> dict:
    model = build_model(args, tokenizer, init, seed)
    collator = DataCollatorForMaskedDiffusion(tokenizer)
    start = time.perf_counter()
    losses = train(model, sequences, collator, args, seed)
    seconds = time.perf_counter() - start
    scores = text_bits_per_token(model.eval(), tokenizer, held_out_texts, seq_len=args.seq_len,
                                 num_samples=args.num_samples, batch_size=args.batch_size)
    return dict(init=init, seed=seed, train_seconds=round(seconds, 1), losses=[round(x, 4) for x in losses],
                curve=curve_summary(losses, args.window), held_out=scores)


def markdown(result: dict) -> str:
    lines = ["| init | seed | held-out bits/token | final training loss (last window) | training loss by window |",
             "|---|---|---|---|---|"]
    for run_ in result["runs"]:
        curve = ", ".join(f"{m:.2f}" for m in run_["curve"]["window_means"])
        lines.append(f"| {run_['init']} | {run_['seed']} | {run_['held_out']['bits_per_token']:.4f} | "
                     f"{run_['curve']['final']:.3f} | {curve} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="diffuapriel-8m")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--warmup_steps", type=int, default=15)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS))
    parser.add_argument("--num_samples", type=int, default=8, help="points of the held-out ELBO's fixed t grid")
    parser.add_argument("--held_out_files", type=int, default=4,
                        help="the first N held-out files in the corpus's order (bisect, calendar, colorsys, csv, ...)")
    parser.add_argument("--window", type=int, default=25, help="steps per window of the loss curve's summary")
    parser.add_argument("--log_every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.warmup_steps >= args.steps:
        raise ValueError(f"--warmup_steps ({args.warmup_steps}) must be fewer than --steps ({args.steps})")
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    sequences = training_sequences(tokenizer, args.seq_len)
    if args.steps * args.batch_size > len(sequences):
        raise ValueError(f"--steps x --batch_size ({args.steps * args.batch_size}) exceeds the {len(sequences)} "
                         "training sequences: one epoch at most")
    held_out = stdlib_files("heldout")[: args.held_out_files]
    held_out_texts = [path.read_text(encoding="utf-8") for path in held_out]
    result = new_result(settings={**vars(args), "training_sequences": len(sequences),
                                  "tokens_per_run": args.steps * args.batch_size * args.seq_len,
                                  "tokenizer": "src/diffuapriel_hf/default_model",
                                  "held_out": [path.name for path in held_out],
                                  "python": sys.version.split()[0]}, runs=[])
    for seed in args.seeds:
        for init in args.inits:
            print(f"{init}, seed {seed}", flush=True)
            result["runs"].append(run(args, tokenizer, sequences, held_out_texts, init, seed))
            print(f"  held-out {result['runs'][-1]['held_out']['bits_per_token']:.4f} bits/token", flush=True)
            save(result, args.out, markdown=markdown(result))  # each run kept as it finishes
    return 0 if all(math.isfinite(r["held_out"]["bits_per_token"]) for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
