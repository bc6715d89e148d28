"""The gated RMSNorm's backward in the Mamba mixer's training pass: mamba-ssm's launch of its kernel against more
programs with fewer warps each.

mamba-ssm's `_layer_norm_bwd` launches `_layer_norm_bwd_kernel` with one program per multiprocessor (for rows of 4096
channels: 8 warps), each walking its share of the rows one row at a time: load x, z and dy, reduce over the row, store
dx, dz and the recomputed output. In a 1.3B training step on an H100 it took 14.9 ms for 40 calls at 4 x 4K tokens,
0.37 ms a call where the bytes it moves (x, z, dy in; dx, dz, the output out, bf16) take about 0.24 ms at the card's
bandwidth (benchmarks/results/profile_train_4k_at_7b80f40.json). The question: does a launch with several programs per
multiprocessor (more rows in flight) move them faster?

In bf16 with the 1.3B mixer's norm (4096 channels, one group, norm after the gate, as the training pass calls it:
recomputing the output for out_proj's weight gradient), at 16K tokens a step (16 x 1K to 1 x 16K are the same 16,384
rows): the time of mamba-ssm's `_layer_norm_bwd` and of its kernel under each swept launch (programs per
multiprocessor, warps), with each launch's largest difference from mamba-ssm's launch (dx, dz and the output the same
arithmetic row by row; dw summed over another split of the rows).

    python benchmarks/gated_norm_backward.py --out benchmarks/results/gated_norm_backward
"""

import argparse
import itertools
import math
from pathlib import Path

import torch

from harness import median_ms, new_result, save  # benchmarks/harness.py, beside this script

ROWS, CHANNELS, EPS = 16384, 4096, 1e-5
SWEEP = dict(programs_per_multiprocessor=[1, 2, 4, 8], num_warps=[2, 4, 8, 16])


def norm_inputs():
    """dy, x, z (rows, channels) bf16, z a view of a wider tensor as the gate is of in_proj's output; the weight, and
    rstd as mamba-ssm's forward leaves it."""
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_fwd

    g = torch.Generator(device="cuda").manual_seed(0)
    x, dy = (torch.randn(ROWS, CHANNELS, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    in_proj_width = 2 * CHANNELS + 2 * 128 + 64  # the 1.3B mixer's: z, x, B, C, dt
    z = torch.randn(ROWS, in_proj_width, device="cuda", generator=g).to(torch.bfloat16)[:, :CHANNELS]
    weight = 1 + 0.1 * torch.randn(CHANNELS, device="cuda", generator=g)
    _, _, rstd = _layer_norm_fwd(x, weight, None, EPS, z, norm_before_gate=False, is_rms_norm=True)
    return dy, x, z, weight, rstd


def launched_backward(dy, x, z, weight, rstd, programs_per_multiprocessor: int, num_warps: int):
    """mamba-ssm's backward kernel under a given launch: (dx, dw, dz, out), as `_layer_norm_bwd` returns them."""
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd_kernel

    rows, channels = x.shape
    programs = programs_per_multiprocessor * torch.cuda.get_device_properties(x.device).multi_processor_count
    dx, dz, out = torch.empty_like(x), torch.empty_like(z), torch.empty_like(x)
    dw_parts = torch.empty(programs, channels, device=x.device, dtype=torch.float32)
    _layer_norm_bwd_kernel[(programs, 1)](
        x, weight, None, z, out, dy, dx, dw_parts, None, dz, None, rstd, x.stride(0), z.stride(0), out.stride(0),
        dy.stride(0), dx.stride(0), dz.stride(0), dw_parts.stride(0), 0, rows, channels, EPS,
        math.ceil(rows / programs), BLOCK_N=channels, NORM_BEFORE_GATE=False, IS_RMS_NORM=True, num_warps=num_warps,
    )
    return dx, dw_parts.sum(0).to(weight.dtype), dz, out


def largest_difference(outputs, expected) -> float:
    """The largest absolute difference over the four outputs, each relative to its largest expected value."""
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(outputs, expected))


def launch_rows() -> dict:
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd

    dy, x, z, weight, rstd = norm_inputs()

    def mamba_ssm_launch():
        dx, dw, _, dz, out = _layer_norm_bwd(dy, x, weight, None, EPS, None, rstd, z, norm_before_gate=False,
                                             is_rms_norm=True, recompute_output=True)
        return dx, dw, dz, out

    expected = mamba_ssm_launch()
    result = dict(mamba_ssm_ms=median_ms(mamba_ssm_launch, reps=20, warmup=2), sweep=[])
    for programs_per_multiprocessor, num_warps in itertools.product(*SWEEP.values()):
        launch = dict(programs_per_multiprocessor=programs_per_multiprocessor, num_warps=num_warps)
        try:
            difference = largest_difference(launched_backward(dy, x, z, weight, rstd, **launch), expected)
            ms = median_ms(lambda: launched_backward(dy, x, z, weight, rstd, **launch), reps=20, warmup=2)
        except Exception as error:  # a launch that does not fit the multiprocessor (registers)
            difference, ms = None, repr(error).splitlines()[0][:120]
        result["sweep"].append(dict(launch, ms=ms, largest_difference=difference))
        print(f"{launch}: {ms} ms (mamba-ssm's launch {result['mamba_ssm_ms']:.3f}), difference {difference}",
              flush=True)
    return result


def markdown(result: dict) -> str:
    lines = ["# The gated RMSNorm's backward: mamba-ssm's launch against others", "",
             f"bf16, {ROWS:,} rows of {CHANNELS} channels (the 1.3B mixer's norm at 16K tokens a step), output "
             f"recomputed. mamba-ssm's `_layer_norm_bwd`: {result['mamba_ssm_ms']:.3f} ms.", "",
             "| programs per multiprocessor | warps | ms | x mamba-ssm's launch | largest difference |",
             "|---|---|---|---|---|"]
    for row in result["sweep"]:
        timed = isinstance(row["ms"], float)
        lines.append(f"| {row['programs_per_multiprocessor']} | {row['num_warps']} | "
                     f"{row['ms']:.3f} | {row['ms'] / result['mamba_ssm_ms']:.2f} | {row['largest_difference']:.2g} |"
                     if timed else f"| {row['programs_per_multiprocessor']} | {row['num_warps']} | {row['ms']} | | |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = new_result(rows=ROWS, channels=CHANNELS)
    result.update(launch_rows())
    save(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
