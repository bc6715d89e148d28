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
from harness import median_ms, new_result, save  # benchmarks/harness.py, beside this script

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
    chunks = -(-length // CHUNK)
    width = HEADS * HEAD_DIM + 2 * GROUPS * STATE
    xBC = torch.randn(batch, length, width, device="cuda", generator=g).to(torch.bfloat16)
    x, B, C = xBC.split([HEADS * HEAD_DIM, GROUPS * STATE, GROUPS * STATE], dim=-1)
    x, B, C = x.unflatten(-1, (HEADS, HEAD_DIM)), B.unflatten(-1, (GROUPS, STATE)), C.unflatten(-1, (GROUPS, STATE))
    dy = torch.randn(batch, length, HEADS, HEAD_DIM, device="cuda", generator=g).to(torch.bfloat16)
    dt = torch.rand(batch, HEADS, chunks * CHUNK, device="cuda", generator=g) * 0.1
    dt[..., length:] = 0
    A = -torch.exp(torch.rand(HEADS, device="cuda", generator=g))
    dA_cumsum = torch.cumsum((dt * A[:, None]).unflatten(-1, (chunks, CHUNK)), dim=-1)
    CB = _bmm_chunk_fwd(C, B, CHUNK, output_dtype=torch.float32)
    dstates = torch.randn(batch, chunks, HEADS, HEAD_DIM, STATE, device="cuda", generator=g).to(torch.bfloat16)
    D = 1 + 0.2 * torch.randn(HEADS, device="cuda", generator=g)
    dx = torch.empty(batch, length, width, device="cuda", dtype=torch.bfloat16)[..., :HEADS * HEAD_DIM]
    inputs = (x, dt.unflatten(-1, (chunks, CHUNK)), dA_cumsum, B, CB, dy, dstates)
    return inputs, D, dx.unflatten(-1, (HEADS, HEAD_DIM))


def bytes_moved(inputs) -> int:
    """What the gradient must read and write once: x, dy, B, dstates, CB, dt and the decays read; dx and ddt
    written."""
    x, dt_chunks, dA_cumsum, B, CB, dy, dstates = inputs
    read = sum(t.numel() * t.element_size() for t in (x, dt_chunks, dA_cumsum, B, CB, dy, dstates))
    return read + x.numel() * x.element_size() + dt_chunks.numel() * 4


def differences(got, reference) -> dict:
    return {name: (a.float() - b.float()).abs().max().item() for name, a, b in zip(OUTPUTS, got, reference)}


def swept_launch(inputs, D, dx, reference, block_m, block_k, num_warps, num_stages) -> dict:
    """One setting of the sweep: its time and its largest differences from `reference`, or, where it does not fit the
    multiprocessor (registers, shared memory), the error as its time."""
    launch = dict(block_m=block_m, block_p=HEAD_DIM, block_k=block_k, block_n=STATE, num_warps=num_warps,
                  num_stages=num_stages)
    run = lambda: launch_chunk_inputs_backward(*inputs, D, dx, **launch)  # noqa: E731
    try:
        return dict(launch, max_abs_diff=differences(run(), reference), ms=median_ms(run, reps=10))
    except Exception as error:
        return dict(launch, max_abs_diff=None, ms=repr(error).splitlines()[0][:120])


def dx_rows() -> list[dict]:
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx

    rows = []
    for batch, length in SHAPES:
        inputs, D, dx = dx_inputs(batch, length)
        theirs = lambda: _chunk_scan_chunk_state_bwd_dx(*inputs, D=D, dx=dx)  # noqa: E731
        ours = lambda: chunk_inputs_backward(*inputs, D=D, dx=dx)  # noqa: E731
        reference = [t.clone() for t in theirs()]
        gigabytes = bytes_moved(inputs) / 1e9
        row = dict(batch=batch, length=length, launch=LAUNCH_CHUNK_INPUTS, gigabytes=gigabytes,
                   mamba_ssm_ms=median_ms(theirs, reps=20, warmup=2), ours_ms=median_ms(ours, reps=20, warmup=2),
                   max_abs_diff=differences(ours(), reference),
                   reference_max_abs={name: t.float().abs().max().item() for name, t in zip(OUTPUTS, reference)},
                   sweep=[swept_launch(inputs, D, dx, reference, block_m, block_k, num_warps, num_stages)
                          for (block_m, block_k), num_warps, num_stages in itertools.product(*SWEEP.values())])
        row["best"] = min((s for s in row["sweep"] if isinstance(s["ms"], float)), key=lambda s: s["ms"])
        rows.append(row)
        print(f"dx {batch:2d} x {length:6d}: mamba-ssm {row['mamba_ssm_ms']:.3f} ms, ours {row['ours_ms']:.3f} ms "
              f"({gigabytes / row['ours_ms']:.2f} TB/s; best swept {row['best']}), max diff {row['max_abs_diff']} "
              f"of {row['reference_max_abs']}", flush=True)
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
