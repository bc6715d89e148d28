"""Which SSD chunk size is fastest for the 1.3B presets' mixer on this GPU, decided by measurement.

The chunked SSD gives the same result at any chunk size (up to rounding); the size only moves work between the
quadratic part inside each chunk (Q x Q per chunk, grows with Q) and the states passed between chunks (one (P, N)
state per head per chunk, grows as 1/Q). mamba-ssm's default is 256. This times, in bf16 at batch 1 with the
presets' sizes (64 heads of 64, state 128, one group):

- `mamba_chunk_scan_combined` alone, forward, and forward + backward, at each chunk size and length, with the time
  of each of its kernels (torch.profiler);
- one eager denoising step of the whole diffuapriel-1.3b model at each chunk size.

    python benchmarks/ssd_chunk_size.py --out benchmarks/results/ssd_chunk_size.json
"""

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from harness import build, median_ms, new_result, save  # benchmarks/harness.py, beside this script
from ssd_kernel import GROUPS, HEAD_DIM, HEADS, STATE  # the 1.3B presets' mixer sizes

CHUNK_SIZES = [64, 128, 256]
LENGTHS = [2048, 8192, 16384, 65536]


def ssd_inputs(length: int, requires_grad: bool = False):
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", generator=g)
    x = torch.randn(1, length, HEADS, HEAD_DIM, dtype=torch.bfloat16, **kw)
    dt = torch.randn(1, length, HEADS, dtype=torch.bfloat16, **kw)
    A = -torch.rand(HEADS, **kw) * 8
    B = torch.randn(1, length, GROUPS, STATE, dtype=torch.bfloat16, **kw)
    C = torch.randn(1, length, GROUPS, STATE, dtype=torch.bfloat16, **kw)
    dt_bias = torch.randn(HEADS, **kw) - 3
    D = torch.ones(HEADS, device="cuda")
    tensors = [x, dt, A, B, C, dt_bias, D]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


def kernel_breakdown(fn) -> dict:
    """ms per CUDA kernel name (summed over launches) of one call of fn."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:60]] += event.device_time / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def ssd_rows(lengths) -> list[dict]:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    rows = []
    for length in lengths:
        for chunk in CHUNK_SIZES:
            x, dt, A, B, C, dt_bias, D = ssd_inputs(length)
            forward = lambda: mamba_chunk_scan_combined(  # noqa: E731
                x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
            with torch.no_grad():
                row = dict(length=length, chunk_size=chunk, forward_ms=median_ms(forward, reps=10, warmup=2),
                           forward_kernels_ms=kernel_breakdown(forward))
            inputs = ssd_inputs(length, requires_grad=True)
            x, dt, A, B, C, dt_bias, D = inputs
            grad = torch.randn(1, length, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")

            def forward_backward():
                y = mamba_chunk_scan_combined(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
                torch.autograd.grad(y, inputs, grad)

            row["forward_backward_ms"] = median_ms(forward_backward, reps=10, warmup=2)
            rows.append(row)
            print(f"SSD L={length:6d} chunk={chunk:3d} forward {row['forward_ms']:7.3f} ms  "
                  f"forward+backward {row['forward_backward_ms']:7.3f} ms", flush=True)
    return rows


def model_rows(lengths) -> list[dict]:
    rows = []
    for chunk in CHUNK_SIZES:
        model = build("diffuapriel-1.3b", mamba_chunk_size=chunk)  # the same weights at every chunk size
        for length in lengths:
            ids = torch.randint(0, model.config.mask_token_id, (1, length), device="cuda")
            with torch.no_grad():
                ms = median_ms(lambda: model(ids), reps=3 if length >= 32768 else 10)
            rows.append(dict(length=length, chunk_size=chunk, eager_step_ms=ms))
            print(f"diffuapriel-1.3b L={length:6d} chunk={chunk:3d} eager step {ms:8.2f} ms", flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    args = parser.parse_args()
    result = new_result(heads=HEADS, head_dim=HEAD_DIM, state=STATE, groups=GROUPS)
    result["ssd"] = ssd_rows(args.lengths)
    result["model"] = model_rows([n for n in args.lengths if n >= 8192])
    save(result, args.out)


if __name__ == "__main__":
    main()
