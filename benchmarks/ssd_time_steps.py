"""How our SSD kernels read the time steps dt, alternating in one process:

- "as passed": both the segment-states kernel and the walk read the mixer's dt, a bfloat16 column of in_proj's output
  (Triton loads it synchronously: fewer than 4 bytes a thread);
- "states by head" (the library's choice): the segment-states kernel reads `ssd_triton.time_steps_by_head(dt)`
  (float32, one contiguous row per head, which its pipeline fetches ahead), the walk the column;
- "both by head": the walk reads float32 rows per head too (eager calls only).

It measures:

- eager calls of the kernels (`launch_ssd_forward`, 1.3B mixer sizes, batch 1), the copies included, with each
  kernel's time under torch.profiler and whether the outputs are bit-identical;
- whole diffuapriel-1.3b denoising steps replayed from CUDA graphs (batch 1, bf16, random weights), the first two
  (the SSD on our single-pass kernel, as these steps take it, through `override_kernel_policy`).

    python benchmarks/ssd_time_steps.py --out benchmarks/results/ssd_time_steps.json
"""

import argparse
import dataclasses
import functools
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy
from diffuapriel_hf.modeling.mamba_ops import MambaOps, kernel_ops

from harness import build, graphed_step_ms, median_ms, new_result, save  # benchmarks/, beside this script
from ssd_kernel import mixer_inputs

VARIANTS = ["as passed", "states by head", "both by head"]


def kernel_times(fn) -> dict:
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    # Kernel names up to their template arguments (PyTorch's copy kernel has a page of them).
    return {event.key.split("<")[0]: event.device_time / 1e3 for event in trace.key_averages() if event.device_time > 0}


def call_rows(lengths, rounds) -> dict:
    from diffuapriel_hf.modeling import ssd_triton

    rows = {}
    for length in lengths:
        x, dt, A, B, C, D, dt_bias = mixer_inputs(1, length)
        segments = ssd_triton._segments(1, x.shape[2], length, x.device)

        def call(variant):
            steps = ssd_triton.time_steps_by_head(dt) if variant == "both by head" else dt
            return ssd_triton.launch_ssd_forward(
                x, steps, A, B, C, D, dt_bias, True, (0.0, float("inf")), segments=segments, chunk=ssd_triton.CHUNK,
                block_p=64, num_warps=ssd_triton.NUM_WARPS, num_stages=ssd_triton.NUM_STAGES,
                max_registers=ssd_triton.MAX_REGISTERS, states_dt_by_head=variant != "as passed",
            )

        with torch.no_grad():
            outputs = [call(variant) for variant in VARIANTS]
            row = dict(segments=segments, bit_identical=all(torch.equal(outputs[0], y) for y in outputs[1:]))
            for _ in range(rounds):
                for variant in VARIANTS:
                    row.setdefault(f"{variant} ms", []).append(median_ms(lambda: call(variant), reps=20, warmup=3))
            for variant in VARIANTS:
                row[f"{variant} kernels ms"] = kernel_times(lambda: call(variant))
        rows[f"1 x {length}"] = row
        print(f"1 x {length}", json.dumps(row, indent=1), flush=True)
    return rows


def single_pass_ops(states_dt_by_head: bool) -> MambaOps:
    """The CUDA kernels with every SSD call on our single-pass kernel (the one these steps take; benchmarks/
    ssd_dispatch.py measures the choice), its segment-states kernel reading dt by head or as passed."""
    from diffuapriel_hf.modeling.ssd_triton import ssd_forward

    ops = kernel_ops(single_pass=True)
    chunk_scan = functools.partial(ssd_forward, states_dt_by_head=states_dt_by_head)
    return dataclasses.replace(ops, name=f"{ops.name}, states dt by head: {states_dt_by_head}", chunk_scan=chunk_scan)


def step_rows(lengths, rounds) -> dict:
    model = build("diffuapriel-1.3b")
    ops = {variant: single_pass_ops(variant == "states by head") for variant in VARIANTS[:2]}
    rows = {}
    for length in lengths:
        ids = torch.randint(0, model.config.mask_token_id, (1, length), device="cuda")
        for _ in range(rounds):
            for variant in VARIANTS[:2]:
                with override_kernel_policy(mamba=ops[variant]):
                    ms = graphed_step_ms(model, ids, reps=5 if length > 16384 else 15, warmup=2)
                rows.setdefault(f"1 x {length}: {variant}", []).append(ms)
                print(f"1 x {length:6d}  {variant:10s} {ms:8.2f} ms", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--call-lengths", nargs="+", type=int, default=[16384, 65536])
    parser.add_argument("--step-lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = new_result(rounds=args.rounds)
    result["calls"] = call_rows(args.call_lengths, args.rounds)
    result["step_ms"] = step_rows(args.step_lengths, args.rounds)
    save(result, args.out)


if __name__ == "__main__":
    main()
