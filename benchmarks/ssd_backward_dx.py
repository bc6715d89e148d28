"""The SSD backward's gradient of the chunks' inputs (dx, and dt's and D's through x) by our kernel
(`diffuapriel_hf.modeling.ssd_backward_triton.chunk_inputs_backward`) against mamba-ssm's
`_chunk_scan_chunk_state_bwd_dx`, which the training pass calls (`training_mixer.ssd_backward_from_states`).

In bf16 with the 1.3B presets' sizes (64 heads of 64, state 128, one group, chunks of 128), x and B views of the
convolution's output and dx a view of its gradient, as the mixer passes them, at the training throughput benchmark's
shapes (16K tokens a step):
- the time of mamba-ssm's kernel (autotuned) and of ours under its launch settings and each swept (positions a
  program, positions per product, warps, pipeline stages), with the bandwidth that the bytes read and written imply;
- the largest difference of dx, ddt and dD from mamba-ssm's, ours and each swept setting's, with their scale.
A 1.3B training step calls it once per direction per Mamba layer (40 calls).

    python benchmarks/ssd_backward_dx.py --out benchmarks/results/ssd_backward_dx
"""

import argparse
import itertools
from pathlib import Path

import torch

from diffuapriel_hf.modeling.ssd_backward_triton import (LAUNCH_CHUNK_INPUTS, chunk_inputs_backward,
                                                         launch_chunk_inputs_backward)
from harness import chunked_ssd_inputs, kernel_comparison_row, new_result, save  # benchmarks/harness.py, beside this

SHAPES = [(16, 1024), (4, 4096), (2, 8192), (1, 16384)]
HEADS, HEAD_DIM, STATE, GROUPS, CHUNK = 64, 64, 128, 1, 128
# Around the default (LAUNCH_CHUNK_INPUTS): a head's channels and the state in one tile each, one or two programs a
# chunk of 128, 32 or 64 positions a product over the chunk.
SWEEP = dict(tile=[(64, 32), (64, 64), (128, 32), (128, 64)], num_warps=[4, 8], num_stages=[2, 3])
OUTPUTS = ("dx", "ddt", "dD")


def dx_inputs(batch: int, length: int):
    """x, dt_chunks, dA_cumsum, B, CB, dy, dstates as the training pass gives them (x and B views of the convolution's
    output, CB from mamba-ssm's `_bmm_chunk_fwd`), D per head, and dx, a view of a wider tensor."""
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_fwd

    g = torch.Generator(device="cuda").manual_seed(0)
    xBC, dy, dt_chunks, dA_cumsum = chunked_ssd_inputs(batch, length, HEADS, HEAD_DIM, GROUPS, STATE, CHUNK, g)
    x, B, C = xBC.split([HEADS * HEAD_DIM, GROUPS * STATE, GROUPS * STATE], dim=-1)
    x, B, C = x.unflatten(-1, (HEADS, HEAD_DIM)), B.unflatten(-1, (GROUPS, STATE)), C.unflatten(-1, (GROUPS, STATE))
    CB = _bmm_chunk_fwd(C, B, CHUNK, output_dtype=torch.float32)
    dstates = torch.randn(batch, dA_cumsum.shape[2], HEADS, HEAD_DIM, STATE, device="cuda",
                          generator=g).to(torch.bfloat16)
    D = 1 + 0.2 * torch.randn(HEADS, device="cuda", generator=g)
    dx = torch.empty_like(xBC)[..., :HEADS * HEAD_DIM]
    return (x, dt_chunks, dA_cumsum, B, CB, dy, dstates), D, dx.unflatten(-1, (HEADS, HEAD_DIM))


def bytes_moved(inputs) -> int:
    """What the gradient must read and write once: x, dy, B, dstates, CB, dt and the decays read; dx and ddt
    written."""
    x, dt_chunks, dA_cumsum, B, CB, dy, dstates = inputs
    read = sum(t.numel() * t.element_size() for t in (x, dt_chunks, dA_cumsum, B, CB, dy, dstates))
    return read + x.numel() * x.element_size() + dt_chunks.numel() * 4


def swept_launches(inputs, D, dx) -> list:
    """(launch, call) for each setting of `SWEEP`."""
    def call(launch):
        return lambda: launch_chunk_inputs_backward(*inputs, D, dx, **launch)

    launches = [dict(block_m=block_m, block_p=HEAD_DIM, block_k=block_k, block_n=STATE, num_warps=num_warps,
                     num_stages=num_stages)
                for (block_m, block_k), num_warps, num_stages in itertools.product(*SWEEP.values())]
    return [(launch, call(launch)) for launch in launches]


def dx_rows() -> list[dict]:
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx

    rows = []
    for batch, length in SHAPES:
        inputs, D, dx = dx_inputs(batch, length)
        rows.append(kernel_comparison_row(
            "dx", "mamba_ssm", OUTPUTS, lambda: _chunk_scan_chunk_state_bwd_dx(*inputs, D=D, dx=dx),
            lambda: chunk_inputs_backward(*inputs, D=D, dx=dx), swept_launches(inputs, D, dx), batch=batch,
            length=length, launch=LAUNCH_CHUNK_INPUTS, gigabytes=bytes_moved(inputs) / 1e9))
    return rows


def markdown(result: dict) -> str:
    lines = ["# The SSD backward's dx: ours against mamba-ssm's `_chunk_scan_chunk_state_bwd_dx`", "",
             f"bf16, {HEADS} heads of {HEAD_DIM}, state {STATE}, chunks of {CHUNK}; TB/s: the bytes read and written "
             "once over the time.", "",
             "| batch x length | mamba-ssm ms (TB/s) | ours ms (TB/s) | ours / mamba-ssm | best swept ms (launch) "
             "| max diff dx, ddt, dD (of) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        best = {k: v for k, v in row["best"].items() if k not in ("ms", "max_abs_diff")}
        diffs = ", ".join(f"{row['max_abs_diff'][name]:.3g} ({row['reference_max_abs'][name]:.3g})"
                          for name in OUTPUTS)
        lines.append(f"| {row['batch']} x {row['length']} | {row['mamba_ssm_ms']:.3f} "
                     f"({row['gigabytes'] / row['mamba_ssm_ms']:.2f}) | {row['ours_ms']:.3f} "
                     f"({row['gigabytes'] / row['ours_ms']:.2f}) | {row['ours_ms'] / row['mamba_ssm_ms']:.2f} | "
                     f"{row['best']['ms']:.3f} ({best}) | {diffs} |")
    lines += ["", f"Ours under {result['rows'][0]['launch']} (`LAUNCH_CHUNK_INPUTS`)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = new_result(heads=HEADS, head_dim=HEAD_DIM, state=STATE, groups=GROUPS, chunk=CHUNK)
    result["rows"] = dx_rows()
    save(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
