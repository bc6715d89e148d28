"""The SSD backward's products at a chunk's pairs of positions, dCB and ddA, by our one kernel
(`diffuapriel_hf.modeling.ssd_backward_triton.chunk_pairs_backward`) against mamba-ssm's `_chunk_scan_bwd_dcb` and
`_chunk_scan_bwd_ddAcs_stable`, which the training pass calls one after the other
(`training_mixer.ssd_backward_from_states`), each forming the same (dy_t . x_s) over every pair of a chunk's positions.

In bf16 with the 1.3B presets' sizes (64 heads of 64, state 128, one group, chunks of 128), x a view of the
convolution's output as the mixer passes it, at the training throughput benchmark's shapes (16K tokens a step):
- the time of mamba-ssm's two kernels together (autotuned) and of ours under its launch settings and each swept
  (positions t a program, splits of a group's heads, warps, pipeline stages), with the bandwidth that the bytes read
  and written imply;
- the largest difference of dCB and ddA from mamba-ssm's, ours and each swept setting's, with their scale.
A 1.3B training step calls each of mamba-ssm's two once per direction per Mamba layer (40 calls each).

    python benchmarks/ssd_backward_pairs.py --out benchmarks/results/ssd_backward_pairs
"""

import argparse
import itertools
from pathlib import Path

import torch

from diffuapriel_hf.modeling.ssd_backward_triton import (LAUNCH_CHUNK_PAIRS, chunk_pairs_backward,
                                                         launch_chunk_pairs_backward)
from harness import chunked_ssd_inputs, kernel_comparison_row, new_result, save  # benchmarks/harness.py, beside this

SHAPES = [(16, 1024), (4, 4096), (2, 8192), (1, 16384)]
HEADS, HEAD_DIM, STATE, GROUPS, CHUNK = 64, 64, 128, 1, 128
# Around the default (LAUNCH_CHUNK_PAIRS): one, two or four programs a chunk of 128 (the ddA of each summed after),
# a group's 64 heads in one program or split in two or four (their dCB summed after).
SWEEP = dict(block_m=[32, 64, 128], head_splits=[1, 2, 4], num_warps=[4, 8], num_stages=[2, 3])
OUTPUTS = ("dCB", "ddA")


def pairs_inputs(batch: int, length: int):
    """x, dt_chunks, dA_cumsum, dy, CB and the number of groups as the training pass gives them (x a view of the
    convolution's output, CB from mamba-ssm's `_bmm_chunk_fwd`)."""
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_fwd

    g = torch.Generator(device="cuda").manual_seed(0)
    xBC, dy, dt_chunks, dA_cumsum = chunked_ssd_inputs(batch, length, HEADS, HEAD_DIM, GROUPS, STATE, CHUNK, g)
    x, B, C = xBC.split([HEADS * HEAD_DIM, GROUPS * STATE, GROUPS * STATE], dim=-1)
    CB = _bmm_chunk_fwd(C.unflatten(-1, (GROUPS, STATE)), B.unflatten(-1, (GROUPS, STATE)), CHUNK,
                        output_dtype=torch.float32)
    return x.unflatten(-1, (HEADS, HEAD_DIM)), dt_chunks, dA_cumsum, dy, CB, GROUPS


def bytes_moved(inputs) -> int:
    """What the two outputs need read and written once: x, dy, dt, the decays and CB read; dCB (CB's size) and ddA
    (the decays' size) written."""
    x, dt_chunks, dA_cumsum, dy, CB, _ = inputs
    read = sum(t.numel() * t.element_size() for t in (x, dt_chunks, dA_cumsum, dy, CB))
    return read + CB.numel() * 4 + dA_cumsum.numel() * 4


def swept_launches(inputs) -> list:
    """(launch, call) for each setting of `SWEEP`."""
    def call(launch):
        return lambda: launch_chunk_pairs_backward(*inputs, **launch)

    return [(launch, call(launch)) for launch in (dict(zip(SWEEP, values))
                                                  for values in itertools.product(*SWEEP.values()))]


def pairs_rows() -> list[dict]:
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_bwd_dcb, _chunk_scan_bwd_ddAcs_stable

    rows = []
    for batch, length in SHAPES:
        inputs = pairs_inputs(batch, length)
        x, dt_chunks, dA_cumsum, dy, CB, groups = inputs
        theirs = lambda: (_chunk_scan_bwd_dcb(x, dt_chunks, dA_cumsum, dy, ngroups=groups),  # noqa: E731
                          _chunk_scan_bwd_ddAcs_stable(x, dt_chunks, dA_cumsum, dy, CB))
        rows.append(kernel_comparison_row(
            "pairs", "mamba_ssm", OUTPUTS, theirs, lambda: chunk_pairs_backward(*inputs), swept_launches(inputs),
            batch=batch, length=length, launch=LAUNCH_CHUNK_PAIRS, gigabytes=bytes_moved(inputs) / 1e9))
    return rows


def cells(values) -> str:
    return "| " + " | ".join(str(value) for value in values) + " |"


def markdown(result: dict) -> str:
    """The two kernels against ours at each shape, then each shape's sweep, fastest first."""
    lines = ["# The SSD backward's dCB and ddA: ours against mamba-ssm's `_chunk_scan_bwd_dcb` and "
             "`_chunk_scan_bwd_ddAcs_stable`", "",
             f"bf16, {HEADS} heads of {HEAD_DIM} in {GROUPS} group, chunks of {CHUNK}; mamba-ssm's two kernels timed "
             "together; TB/s: the bytes read and written once over the time. Ours under "
             f"{result['rows'][0]['launch']} (`LAUNCH_CHUNK_PAIRS`).", "",
             cells(["batch x length", "mamba-ssm ms (TB/s)", "ours ms (TB/s)", "ours / mamba-ssm", "best swept ms",
                    "max diff dCB, ddA (of)"]), cells(["---"] * 6)]
    for row in result["rows"]:
        speed = lambda ms: f"{ms:.3f} ({row['gigabytes'] / ms:.2f})"  # noqa: E731
        lines.append(cells([f"{row['batch']} x {row['length']}", speed(row["mamba_ssm_ms"]), speed(row["ours_ms"]),
                            f"{row['ours_ms'] / row['mamba_ssm_ms']:.2f}", f"{row['best']['ms']:.3f}",
                            ", ".join(f"{row['max_abs_diff'][name]:.3g} ({row['reference_max_abs'][name]:.3g})"
                                      for name in OUTPUTS)]))
    for row in result["rows"]:
        lines += ["", f"## The sweep at {row['batch']} x {row['length']}, fastest first", "",
                  cells(list(SWEEP) + ["ms", "x mamba-ssm's", "max diff dCB, ddA"]), cells(["---"] * (len(SWEEP) + 3))]
        for swept in sorted(row["sweep"], key=lambda s: s["ms"] if isinstance(s["ms"], float) else float("inf")):
            if isinstance(swept["ms"], float):
                timing = [f"{swept['ms']:.3f}", f"{swept['ms'] / row['mamba_ssm_ms']:.2f}",
                          ", ".join(f"{swept['max_abs_diff'][name]:.3g}" for name in OUTPUTS)]
            else:  # the error it raised
                timing = [swept["ms"], "", ""]
            lines.append(cells([swept[name] for name in SWEEP] + timing))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = new_result(heads=HEADS, head_dim=HEAD_DIM, state=STATE, groups=GROUPS, chunk=CHUNK)
    result["rows"] = pairs_rows()
    save(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
