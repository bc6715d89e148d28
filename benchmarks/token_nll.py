"""The training loss's -log p(label) over the LM head's logits: `loss_triton`'s two Triton kernels against the
reference `diffusion.token_nll` (a float32 copy of the logits, cross-entropy, its backward, the cast back).

bf16 logits of the labelled positions of a 1.3B training step at 16K tokens, half of them masked (8,192 rows), over
GPT-2's vocabulary with the mask token (50,258), as the LM head gives them: a slice of its product padded to 50,264.
For each: forward and backward time (the median of CUDA-event timings), the peak memory the pair allocates beyond
the logits, and the largest differences from the reference of -log p and of the logits' gradient.

    python benchmarks/token_nll.py --out benchmarks/results/token_nll
"""

import argparse
from pathlib import Path

import torch

from diffuapriel_hf.modeling import loss_triton
from diffuapriel_hf.modeling.diffusion import token_nll
from harness import median_ms, new_result, save  # benchmarks/harness.py, beside this script

ROWS, VOCAB, PADDED = 8192, 50258, 50264
MASK_TOKEN_ID = VOCAB - 1


def loss_inputs():
    """(logits, labels, upstream): the head's padded product sliced to the vocabulary, bf16; every row labelled."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(ROWS, PADDED, device="cuda", generator=g)).to(torch.bfloat16)[:, :VOCAB]
    labels = torch.randint(0, MASK_TOKEN_ID, (ROWS,), device="cuda", generator=g)
    return logits, labels, torch.rand(ROWS, device="cuda", generator=g)


def forward_and_backward(nll_function, logits, labels, upstream):
    """-log p and the logits' gradient through `nll_function`."""
    leaf = logits.detach().requires_grad_(True)
    nll = nll_function(leaf, labels, MASK_TOKEN_ID)
    (nll * upstream).sum().backward()
    return nll.detach(), leaf.grad


def measure(nll_function, inputs) -> dict:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_and_backward(nll_function, *inputs)
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    return dict(ms=median_ms(lambda: forward_and_backward(nll_function, *inputs), reps=10, warmup=2),
                peak_gib=peak_gib)


def markdown(result: dict) -> str:
    kernels, reference = result["kernels"], result["reference"]
    return "\n".join([
        "# The loss's -log p(label): loss_triton's kernels against diffusion.token_nll", "",
        f"{result['rows']:,} rows of {result['vocab']:,} bf16 logits (a slice of a product padded to "
        f"{result['padded']:,}), forward and backward.", "",
        "| implementation | ms | x reference | peak GiB beyond the logits |", "|---|---|---|---|",
        f"| diffusion.token_nll | {reference['ms']:.3f} | 1.00 | {reference['peak_gib']:.2f} |",
        f"| loss_triton.token_nll | {kernels['ms']:.3f} | {kernels['ms'] / reference['ms']:.2f} | "
        f"{kernels['peak_gib']:.2f} |", "",
        f"Largest differences from the reference: -log p {result['nll_max_diff']:.3g}, the gradient "
        f"{result['grad_max_diff']:.3g} (its largest value {result['grad_max']:.3g}).",
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    inputs = loss_inputs()
    (nll, grad), (expected, expected_grad) = (forward_and_backward(f, *inputs)
                                              for f in (loss_triton.token_nll, token_nll))
    result = new_result(rows=ROWS, vocab=VOCAB, padded=PADDED,
                        nll_max_diff=(nll - expected).abs().max().item(),
                        grad_max_diff=(grad.float() - expected_grad.float()).abs().max().item(),
                        grad_max=expected_grad.float().abs().max().item())
    result["reference"] = measure(token_nll, inputs)
    result["kernels"] = measure(loss_triton.token_nll, inputs)
    print(markdown(result))
    save(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
