"""The SSD backward's walk of the states' gradient (`diffuapriel_hf.modeling.ssd_backward_triton`, one kernel)
against mamba-ssm's two kernels that the training pass called before it (`_chunk_scan_bwd_dstates`, which writes
every chunk's own term in float32, then `_state_passing_bwd`, which reads them back and walks them).

In bf16 with the 1.3B presets' sizes (64 heads of 64, state 128, one group, chunks of 256), C a view of a wider tensor
as the mixer's convolution output is, at the training throughput benchmark's shapes (16K tokens a step):
- the time of mamba-ssm's pair and of ours under its launch settings and each swept (tiles of the state, tokens per
  product, warps, pipeline stages, each chunk's products in a loop or unrolled);
- the largest difference of dstates from mamba-ssm's, ours and each swept setting's, with their scale.
A 1.3B training step calls it once per direction per Mamba layer.

    python benchmarks/ssd_backward_walk.py --out benchmarks/results/ssd_backward_walk
"""

import argparse
import itertools
from pathlib import Path

import torch

from diffuapriel_hf.modeling.ssd_backward_triton import (entering_states_backward, launch_entering_states_backward,
                                                         launch_settings)
from harness import chunked_ssd_inputs, fastest, median_ms, new_result, save, timed_launch  # beside this script

SHAPES = [(16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)]
HEADS, HEAD_DIM, STATE, GROUPS, CHUNK = 64, 64, 128, 1, 256
# 24 settings at 1ccf978 (results/ssd_backward_walk_sweep.json): 64 tokens a product and 3 stages were the fastest at
# every shape; the tiles are swept again around them, with each chunk's products in a loop or unrolled.
SWEEP = dict(tile=[(64, 128), (64, 64), (64, 32), (32, 64)], block_k=[64], num_warps=[4], num_stages=[2, 3],
             unroll_chunk=[False, True])


def walk_inputs(batch: int, length: int):
    """C (b, l, g, n) a view of the convolution's output, dA_cumsum (b, h, c, chunk), dy (b, l, h, p), the float32
    states entering each chunk."""
    g = torch.Generator(device="cuda").manual_seed(0)
    xBC, dy, _, dA_cumsum = chunked_ssd_inputs(batch, length, HEADS, HEAD_DIM, GROUPS, STATE, CHUNK, g)
    C = xBC[..., -GROUPS * STATE:].unflatten(-1, (GROUPS, STATE))
    chunk_states = torch.randn(batch, dA_cumsum.shape[2], HEADS, HEAD_DIM, STATE, device="cuda", generator=g)
    chunk_states[:, 0] = 0
    return C, dA_cumsum, dy, chunk_states


def walk_rows() -> list[dict]:
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_bwd_dstates
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd

    def theirs(C, dA_cumsum, dy, chunk_states):
        own = _chunk_scan_bwd_dstates(C, dA_cumsum, dy, dtype=torch.float32)
        return _state_passing_bwd(chunk_states.flatten(-2), dA_cumsum[..., -1], own.flatten(-2),
                                  has_initial_states=False, dstates_dtype=dy.dtype)[:2]

    rows = []
    for batch, length in SHAPES:
        inputs = walk_inputs(batch, length)
        reference = theirs(*inputs)[0].unflatten(-1, (HEAD_DIM, STATE))
        ours = entering_states_backward(*inputs, torch.bfloat16)[0]
        row = dict(batch=batch, length=length, launch=launch_settings(batch, HEADS),
                   mamba_ssm_ms=median_ms(lambda: theirs(*inputs), reps=20, warmup=2),
                   ours_ms=median_ms(lambda: entering_states_backward(*inputs, torch.bfloat16), reps=20, warmup=2),
                   max_abs_diff=(ours.float() - reference.float()).abs().max().item(),
                   reference_max_abs=reference.float().abs().max().item(), sweep=[])
        difference = lambda got: (got[0].float() - reference.float()).abs().max().item()  # noqa: E731
        for (block_p, block_n), block_k, num_warps, num_stages, unroll_chunk in itertools.product(*SWEEP.values()):
            launch = dict(block_p=block_p, block_n=block_n, block_k=block_k, num_warps=num_warps,
                          num_stages=num_stages, unroll_chunk=unroll_chunk)
            run = lambda: launch_entering_states_backward(*inputs, torch.bfloat16, **launch)  # noqa: E731
            row["sweep"].append(timed_launch(launch, run, difference, reps=10))
        row["best"] = fastest(row["sweep"])
        rows.append(row)
        print(f"walk {batch:2d} x {length:6d}: mamba-ssm {row['mamba_ssm_ms']:.3f} ms, ours {row['ours_ms']:.3f} ms "
              f"(best swept {row['best']}), max diff {row['max_abs_diff']:.3g} of {row['reference_max_abs']:.3g}",
              flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["# The states' gradient walk: ours (one kernel) against mamba-ssm's two", "",
             f"bf16, {HEADS} heads of {HEAD_DIM}, state {STATE}, chunks of {CHUNK}.", "",
             "| batch x length | mamba-ssm ms | ours ms (launch) | ours / mamba-ssm | best swept ms (launch) |",
             "|---|---|---|---|---|"]
    for row in result["rows"]:
        best = {k: v for k, v in row["best"].items() if k not in ("ms", "max_abs_diff")}
        lines.append(f"| {row['batch']} x {row['length']} | {row['mamba_ssm_ms']:.3f} | {row['ours_ms']:.3f} "
                     f"({row['launch']}) | "
                     f"{row['ours_ms'] / row['mamba_ssm_ms']:.2f} | {row['best']['ms']:.3f} ({best}) |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = new_result(heads=HEADS, head_dim=HEAD_DIM, state=STATE, groups=GROUPS, chunk=CHUNK)
    result["rows"] = walk_rows()
    save(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
