"""How much the conditional likelihood's estimate moves with its seed, for each estimator and number of samples.

Scores continuations of held-out standard-library files given the text before them with the default model (or
--model) on the CPU: one token, a whole line, and 32 tokens, each after a prompt of up to --prompt_tokens tokens that
ends at a line's start. Every estimator of `model.compute_conditional_elbo` ("time_grid", "time_stratified",
"count_stratified") runs at each number of samples with --seeds seeds; for each continuation the spread of its
estimates over the seeds is its standard deviation, reported as the mean over the continuations of a kind (in nats,
and relative to the estimate), with the mean estimate in bits per token (all estimators estimate the same bound).
The default estimator and number of samples of `modeling/likelihood.py` are read off this table.

    python benchmarks/conditional_elbo_variance.py --out benchmarks/results/conditional_elbo_variance
"""

import argparse
import random
import time

import torch
from transformers import AutoTokenizer

from diffuapriel_hf import DiffuAprielForMaskedLM, default_model_path
from diffuapriel_hf.modeling.likelihood import ESTIMATORS
from diffuapriel_hf.training.stdlib_corpus import stdlib_files
from harness import new_result, save  # benchmarks/harness.py, beside this script

KINDS = ("1 token", "a line", "32 tokens")


def continuation_pairs(tokenizer, count: int, prompt_tokens: int, seed: int) -> dict:
    """For each kind, `count` (prompt ids, continuation ids) pairs: a line start drawn at random (from `seed`) in the
    held-out files, the prompt the tokens before it (at most `prompt_tokens`), the continuation the line's first token,
    the line (its newline included), or the 32 tokens from there."""
    draw = random.Random(seed)
    files = [path.read_text(encoding="utf-8") for path in stdlib_files("heldout")]
    pairs = {kind: [] for kind in KINDS}
    while min(len(found) for found in pairs.values()) < count:
        text = draw.choice(files)
        lines = text.splitlines(keepends=True)
        index = draw.randrange(1, len(lines))
        if len(lines[index].strip()) < 8:
            continue
        # Tokenized whole and split where the text before the line ends, as lm-eval splits a context and its
        # continuation: tokens never break at a place they would not break in running text.
        context = "".join(lines[:index])
        before = tokenizer(context, add_special_tokens=False).input_ids
        whole = tokenizer(context + "".join(lines[index:]), add_special_tokens=False).input_ids
        line = tokenizer(context + lines[index], add_special_tokens=False).input_ids[len(before):]
        after, before = whole[len(before):], before[-prompt_tokens:]
        if len(before) < prompt_tokens // 2 or len(after) < 32:
            continue
        for kind, continuation in zip(KINDS, (after[:1], line, after[:32])):
            if len(pairs[kind]) < count:
                pairs[kind].append((before, continuation))
    return pairs


def batch(pairs: list, pad_id: int):
    """(input_ids, prompt_mask, attention_mask) of the pairs, padded on the right."""
    width = max(len(prompt) + len(continuation) for prompt, continuation in pairs)
    input_ids = torch.full((len(pairs), width), pad_id)
    prompt_mask = torch.zeros(len(pairs), width, dtype=torch.bool)
    attention_mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for row, (prompt, continuation) in enumerate(pairs):
        ids = prompt + continuation
        input_ids[row, : len(ids)] = torch.tensor(ids)
        prompt_mask[row, : len(prompt)] = True
        attention_mask[row, : len(ids)] = 1
    return input_ids, prompt_mask, attention_mask


def spread(model, inputs, estimator: str, num_samples: int, seeds: int) -> dict:
    """The estimates of every seed, (seeds, B) nats, summarised over the pairs."""
    start = time.perf_counter()
    nats = torch.stack([model.compute_conditional_elbo(*inputs, num_samples=num_samples, seed=seed,
                                                       estimator=estimator).nats for seed in range(seeds)])
    seconds = time.perf_counter() - start
    tokens = inputs[2].sum() - inputs[1].sum()
    sd = nats.std(0)  # (B,) over the seeds
    return dict(estimator=estimator, num_samples=num_samples, mean_sd_nats=float(sd.mean()),
                mean_relative_sd=float((sd / nats.mean(0)).mean()), max_relative_sd=float((sd / nats.mean(0)).max()),
                bits_per_token=float(nats.mean(0).sum() / tokens / torch.log(torch.tensor(2.0))),
                seconds_per_call=seconds / seeds)


def markdown(result: dict) -> str:
    lines = [
        f"Conditional likelihood estimators on `{result['model']}`, CPU: {result['pairs']} continuations of each "
        f"kind after prompts of up to {result['prompt_tokens']} tokens, {result['seeds']} seeds each. sd: the "
        "standard deviation of a continuation's estimate over the seeds, averaged over the continuations; relative: "
        "divided by the estimate. bits/token: the mean estimate. (The shipped model trained on sequences of 512 "
        "tokens only: these, under 100 tokens, end where it never saw a sequence end, which makes its bits per token "
        "high here; what this table measures is the spread.)",
        "",
        "| continuation | estimator | samples | sd (nats) | relative sd | max relative sd | bits/token | s per call |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, rows in result["kinds"].items():
        for row in rows:
            lines.append(f"| {kind} | `{row['estimator']}` | {row['num_samples']} | {row['mean_sd_nats']:.3f} | "
                         f"{row['mean_relative_sd']:.1%} | {row['max_relative_sd']:.1%} | {row['bits_per_token']:.3f} |"
                         f" {row['seconds_per_call']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved DiffuApriel folder (default: the shipped model)")
    parser.add_argument("--pairs", type=int, default=16, help="continuations of each kind")
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--num_samples", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", required=True, help="results stem: writes OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model or str(default_model_path())
    model = DiffuAprielForMaskedLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    result = new_result(model=args.model or "the shipped model (src/diffuapriel_hf/default_model)", pairs=args.pairs,
                        prompt_tokens=args.prompt_tokens, seeds=args.seeds, kinds={})
    for kind, pairs in continuation_pairs(tokenizer, args.pairs, args.prompt_tokens, seed=0).items():
        inputs = batch(pairs, model.config.pad_token_id)
        result["kinds"][kind] = [spread(model, inputs, estimator, num_samples, args.seeds)
                                 for estimator in ESTIMATORS for num_samples in args.num_samples]
        for row in result["kinds"][kind]:
            print(kind, row, flush=True)
    save(result, args.out, markdown=markdown(result))


if __name__ == "__main__":
    main()
