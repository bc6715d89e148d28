"""Our single-pass SSD forward kernel (`diffuapriel_hf.modeling.ssd_triton`) against mamba-ssm's
`mamba_chunk_scan_combined`.

In bf16 with the 1.3B presets' sizes (64 heads of 64, state 128, one group), inputs laid out as the mixer passes
them (x, B and C strided views of one convolution output, dt of in_proj's), dt raw with dt_bias and softplus inside
the call, as in inference:

- the time of mamba-ssm's call (its default chunk size, 256) and of ours under each launch setting swept (segments,
  pipeline stages, register cap), at batch 1 x 2K..64K and 16 x 1K. Chunks of 32 tokens, a whole head's 64 channels
  per program and 4 warps are fixed: chunks of 64, half a head per program and 8 warps were slower at every shape
  (`ssd_kernel.json` as of commit 6c9f268 for the earlier kernel, `archive/ssd_transposed.json` for this one);
- the largest difference between the two outputs, relative to the output's scale.

The kernel times are of eager calls, so mamba-ssm's five launches (and its Python wrapper) count against it at short
lengths; which kernel a model should use is decided on whole graphed steps by `ssd_dispatch.py`. Run it without
MAMBA_DETERMINISTIC=1, which makes mamba-ssm skip its autotuning (and run slower).

    python benchmarks/ssd_kernel.py --out benchmarks/results/ssd_kernel.json
"""

import argparse
import itertools
from pathlib import Path

import torch

from harness import median_ms, new_result, save  # benchmarks/harness.py, beside this script

SHAPES = [(1, 2048), (1, 4096), (1, 8192), (1, 16384), (1, 65536), (16, 1024)]
HEADS, HEAD_DIM, STATE, GROUPS = 64, 64, 128, 1
SWEEP = dict(segments=[1, 4, 8, 12, 16, 24], num_stages=[2, 3], max_registers=[None, 168, 128])


def mixer_inputs(batch: int, length: int):
    """x, dt, A, B, C, D, dt_bias as the mixer passes them: x, B, C views of one (b, l, d + 2gn) tensor (the
    convolution's output), dt a view of another (in_proj's)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    d = HEADS * HEAD_DIM
    xBC = torch.randn(batch, length, d + 2 * GROUPS * STATE, device="cuda", generator=g).to(torch.bfloat16)
    x, B, C = xBC.split([d, GROUPS * STATE, GROUPS * STATE], dim=-1)
    # dt as the mixer passes it: the last columns of in_proj's (b, l, 2d + 2gn + h) output.
    in_proj_width = 2 * d + 2 * GROUPS * STATE + HEADS
    dt = torch.randn(batch, length, in_proj_width, device="cuda", generator=g).to(torch.bfloat16)[..., -HEADS:]
    A = -torch.exp(torch.rand(HEADS, device="cuda", generator=g) * 2)
    D = torch.ones(HEADS, device="cuda")
    dt_bias = torch.rand(HEADS, device="cuda", generator=g) * 4 - 6
    return (x.reshape(batch, length, HEADS, HEAD_DIM), dt, A, B.reshape(batch, length, GROUPS, STATE),
            C.reshape(batch, length, GROUPS, STATE), D, dt_bias)


def kernel_rows() -> list[dict]:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from diffuapriel_hf.modeling.ssd_triton import launch_ssd_forward, ssd_forward

    rows = []
    for batch, length in SHAPES:
        x, dt, A, B, C, D, dt_bias = mixer_inputs(batch, length)
        kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=True)
        theirs = lambda: mamba_chunk_scan_combined(x, dt, A, B, C, 256, **kwargs)  # noqa: E731
        ours = lambda: ssd_forward(x, dt, A, B, C, 256, **kwargs)  # noqa: E731
        with torch.no_grad():
            reference, y = theirs(), ours()
            row = dict(batch=batch, length=length, mamba_ssm_ms=median_ms(theirs, reps=20, warmup=2),
                       ours_ms=median_ms(ours, reps=20, warmup=2),
                       max_abs_diff=(y.float() - reference.float()).abs().max().item(),
                       reference_max_abs=reference.float().abs().max().item(), sweep=[])
            for segments, num_stages, max_registers in itertools.product(*SWEEP.values()):
                if segments > 1 and length // segments < 1024:
                    continue
                launch = lambda: launch_ssd_forward(  # noqa: E731
                    x, dt, A, B, C, D, dt_bias, True, (0.0, float("inf")), segments, chunk=32, block_p=64,
                    num_warps=4, num_stages=num_stages, max_registers=max_registers)
                try:
                    ms = median_ms(launch, reps=10, warmup=1)
                except Exception as error:  # a setting that does not fit the multiprocessor (registers, shared memory)
                    ms = repr(error).splitlines()[0][:120]
                row["sweep"].append(dict(segments=segments, num_stages=num_stages, max_registers=max_registers, ms=ms))
        timed = [s for s in row["sweep"] if isinstance(s["ms"], float)]
        best = min(timed, key=lambda s: s["ms"])
        row["best"] = best
        rows.append(row)
        print(f"SSD {batch:2d} x {length:6d}: mamba-ssm {row['mamba_ssm_ms']:.3f} ms, ours {row['ours_ms']:.3f} ms "
              f"(best swept {best}), max diff {row['max_abs_diff']:.3g} of {row['reference_max_abs']:.3g}",
              flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = new_result(heads=HEADS, head_dim=HEAD_DIM, state=STATE, groups=GROUPS)
    result["kernel"] = kernel_rows()
    save(result, args.out)


if __name__ == "__main__":
    main()
