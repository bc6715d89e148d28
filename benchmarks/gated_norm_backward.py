"""The gated RMSNorm's backward in the Mamba mixer's training pass: mamba-ssm's `_layer_norm_bwd` under its own launch
and others, against ours (`modeling/gated_norm_triton.py`) under a sweep of launch settings.

mamba-ssm's `_layer_norm_bwd` launches `_layer_norm_bwd_kernel` with one program per multiprocessor (for rows of 4096
channels: 8 warps), each walking its share of the rows one row at a time: load x, z and dy, reduce over the row, store
dx, dz and the recomputed output. In a 1.3B training step on an H100 it took 14.9 ms for 40 calls at 4 x 4K tokens,
0.37 ms a call where the bytes it moves (x, z, dy in; dx, dz, the output out, bf16) take about 0.24 ms at the card's
bandwidth (benchmarks/results/profile_train_4k_at_7b80f40.json). The questions: does a launch of its kernel with
several programs per multiprocessor (more rows in flight) move them faster, and how fast is ours, whose loop over a
program's rows is pipelined (the next rows loading while one is reduced), under which launch settings?

In bf16 with the 1.3B mixer's norm (4096 channels, one group), as the training pass calls it (z a view of in_proj's
output, dz written into a view of its gradient, the output recomputed for out_proj's weight gradient), at 16K tokens a
step (16 x 1K to 1 x 16K are the same 16,384 rows):

- with the norm after the gate (our models'): the time of mamba-ssm's `_layer_norm_bwd`, of its kernel under each
  swept launch (programs per multiprocessor, warps) and of ours under each swept `NormLaunch` (rows per tile,
  programs per multiprocessor, warps, pipeline stages);
- with the norm before the gate: mamba-ssm's, and ours under its default launch and the fastest settings of the first
  sweep;

each with its largest difference from mamba-ssm's outputs (dx, dz and the output the same arithmetic row by row in
float32, rounded to bf16; dw summed over another split of the rows), relative to the largest expected value.

    python benchmarks/gated_norm_backward.py --out benchmarks/results/gated_norm_backward
"""

import argparse
import itertools
import math
from pathlib import Path

import torch

from harness import median_ms, new_result, save  # benchmarks/harness.py, beside this script

ROWS, CHANNELS, EPS = 16384, 4096, 1e-5
IN_PROJ_WIDTH = 2 * CHANNELS + 2 * 128 + 64  # the 1.3B mixer's in_proj output: z, x, B, C, dt
SWEEP = dict(programs_per_multiprocessor=[1, 2, 4, 8], num_warps=[2, 4, 8, 16])
OUR_SWEEP = dict(rows_per_tile=[1, 2], programs_per_multiprocessor=[1, 2, 4], num_warps=[4, 8, 16],
                 num_stages=[1, 2, 3, 4])
# Float32 values of one tensor's tile per thread: compiled for sm_90 without a GPU, 32 spilled registers; 16 did not
# at one row a tile over 8 warps, did at two rows over 16 (a 16-warp program's cap of 128 registers), kept to be timed.
MOST_VALUES_PER_THREAD = 16
FASTEST_RETIMED = 3  # the sweep's fastest settings also timed with the norm before the gate
OUTPUTS = ("dy", "dweight", "dz", "out")


def norm_inputs(norm_before_gate: bool) -> dict:
    """dout, y (rows, channels) bf16; z a view of a wider tensor as the gate is of in_proj's output, and dz a view of
    its gradient; the weight, and rstd as mamba-ssm's forward leaves it."""
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_fwd

    g = torch.Generator(device="cuda").manual_seed(0)
    y, dout = (torch.randn(ROWS, CHANNELS, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    z = torch.randn(ROWS, IN_PROJ_WIDTH, device="cuda", generator=g).to(torch.bfloat16)[:, :CHANNELS]
    dz = torch.empty(ROWS, IN_PROJ_WIDTH, device="cuda", dtype=torch.bfloat16)[:, :CHANNELS]
    weight = 1 + 0.1 * torch.randn(CHANNELS, device="cuda", generator=g)
    _, _, rstd = _layer_norm_fwd(y, weight, None, EPS, z, norm_before_gate=norm_before_gate, is_rms_norm=True)
    return dict(dout=dout, y=y, z=z, weight=weight, rstd=rstd, dz=dz)


def mamba_ssm_backward(inputs: dict, norm_before_gate: bool):
    """mamba-ssm's `_layer_norm_bwd` as `training_mixer` calls it: (dy, dw, dz, out)."""
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd

    y = inputs["y"]
    dy, dw, _, dz, out = _layer_norm_bwd(
        inputs["dout"], y, inputs["weight"], None, EPS, None, inputs["rstd"], inputs["z"], group_size=CHANNELS,
        norm_before_gate=norm_before_gate, is_rms_norm=True, recompute_output=True, dz=inputs["dz"],
        out=torch.empty_like(y))
    return dy, dw, dz, out


def launched_backward(inputs: dict, programs_per_multiprocessor: int, num_warps: int):
    """mamba-ssm's backward kernel under a given launch, the norm after the gate: (dy, dw, dz, out), as
    `_layer_norm_bwd` returns them."""
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd_kernel

    x, z, dz, dy = inputs["y"], inputs["z"], inputs["dz"], inputs["dout"]
    rows, channels = x.shape
    programs = programs_per_multiprocessor * torch.cuda.get_device_properties(x.device).multi_processor_count
    dx, out = torch.empty_like(x), torch.empty_like(x)
    dw_parts = torch.empty(programs, channels, device=x.device, dtype=torch.float32)
    _layer_norm_bwd_kernel[(programs, 1)](
        x, inputs["weight"], None, z, out, dy, dx, dw_parts, None, dz, None, inputs["rstd"], x.stride(0),
        z.stride(0), out.stride(0), dy.stride(0), dx.stride(0), dz.stride(0), dw_parts.stride(0), 0, rows, channels,
        EPS, math.ceil(rows / programs), BLOCK_N=channels, NORM_BEFORE_GATE=False, IS_RMS_NORM=True,
        num_warps=num_warps,
    )
    return dx, dw_parts.sum(0).to(inputs["weight"].dtype), dz, out


def our_backward(inputs: dict, norm_before_gate: bool, launch):
    """Ours under `launch` (a `NormLaunch`), called as `training_mixer` would: (dy, dw, dz, out)."""
    from diffuapriel_hf.modeling.gated_norm_triton import launch_gated_rms_norm_backward

    return launch_gated_rms_norm_backward(
        inputs["dout"], inputs["y"], inputs["z"], inputs["weight"], inputs["rstd"], group_size=CHANNELS,
        norm_before_gate=norm_before_gate, recompute_output=True, dz=inputs["dz"], out=torch.empty_like(inputs["y"]))


def copied(outputs) -> tuple:
    """The outputs kept apart from the buffers the next call writes (dz is the same view every call)."""
    return tuple(t.clone() for t in outputs)


def largest_difference(outputs, expected) -> float:
    """The largest absolute difference over the four outputs, each relative to its largest expected value."""
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(outputs, expected))


def timed_row(call, expected, fields: dict) -> dict:
    """`fields` with `call`'s median ms and its largest differences from `expected` (relative overall, absolute by
    output), or the error that stopped it (a launch that does not fit the multiprocessor, a failed compile)."""
    try:
        outputs = copied(call())
        differences = dict(largest_difference=largest_difference(outputs, expected),
                           absolute={name: (a.float() - b.float()).abs().max().item()
                                     for name, a, b in zip(OUTPUTS, outputs, expected)})
        ms = median_ms(call, reps=20, warmup=2)
    except Exception as error:
        differences, ms = dict(largest_difference=None), repr(error).splitlines()[0][:120]
    row = dict(fields, ms=ms, **differences)
    print(row, flush=True)
    return row


def mamba_ssm_launch_rows(inputs: dict, expected) -> list:
    return [timed_row(lambda: launched_backward(inputs, **launch), expected, launch)
            for launch in (dict(zip(SWEEP, values)) for values in itertools.product(*SWEEP.values()))]


def our_launches() -> list:
    """`OUR_SWEEP`'s settings whose tile holds at most `MOST_VALUES_PER_THREAD` values a tensor per thread."""
    from diffuapriel_hf.modeling.gated_norm_triton import NormLaunch

    launches = [NormLaunch(*values) for values in itertools.product(*OUR_SWEEP.values())]
    return [launch for launch in launches
            if launch.rows_per_tile * CHANNELS <= MOST_VALUES_PER_THREAD * 32 * launch.num_warps]


def our_rows(inputs: dict, expected, norm_before_gate: bool, launches) -> list:
    from diffuapriel_hf.modeling.gated_norm_triton import DEFAULT_LAUNCH

    return [timed_row(lambda: our_backward(inputs, norm_before_gate, launch), expected,
                      dict(launch._asdict(), default=launch == DEFAULT_LAUNCH)) for launch in launches]


def fastest(rows: list, count: int) -> list:
    from diffuapriel_hf.modeling.gated_norm_triton import NormLaunch

    timed = sorted((row for row in rows if isinstance(row["ms"], float)), key=lambda row: row["ms"])
    return [NormLaunch(*(row[field] for field in NormLaunch._fields)) for row in timed[:count]]


def measure() -> dict:
    from diffuapriel_hf.modeling.gated_norm_triton import DEFAULT_LAUNCH

    result = {}
    inputs = norm_inputs(norm_before_gate=False)
    expected = copied(mamba_ssm_backward(inputs, False))
    result["mamba_ssm_ms"] = median_ms(lambda: mamba_ssm_backward(inputs, False), reps=20, warmup=2)
    print(f"mamba-ssm's _layer_norm_bwd, norm after the gate: {result['mamba_ssm_ms']:.3f} ms", flush=True)
    result["sweep"] = mamba_ssm_launch_rows(inputs, expected)
    result["ours"] = our_rows(inputs, expected, False, our_launches())
    retimed = list(dict.fromkeys([DEFAULT_LAUNCH, *fastest(result["ours"], FASTEST_RETIMED)]))
    inputs = norm_inputs(norm_before_gate=True)
    expected = copied(mamba_ssm_backward(inputs, True))
    result["norm_before_gate"] = dict(
        mamba_ssm_ms=median_ms(lambda: mamba_ssm_backward(inputs, True), reps=20, warmup=2),
        ours=our_rows(inputs, expected, True, retimed))
    return result


def our_table(rows: list, mamba_ssm_ms: float) -> list:
    lines = ["| rows per tile | programs per multiprocessor | warps | stages | ms | x mamba-ssm's | largest difference "
             "| largest absolute (dy, dw, dz, out) |", "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: (not isinstance(row["ms"], float), row["ms"] if isinstance(
            row["ms"], float) else 0)):
        launch = (f"| {row['rows_per_tile']} | {row['programs_per_multiprocessor']} | {row['num_warps']} | "
                  f"{row['num_stages']}{' (default)' if row['default'] else ''} |")
        if isinstance(row["ms"], float):
            absolute = ", ".join(f"{row['absolute'][name]:.2g}" for name in OUTPUTS)
            lines.append(f"{launch} {row['ms']:.3f} | {row['ms'] / mamba_ssm_ms:.2f} | "
                         f"{row['largest_difference']:.2g} | {absolute} |")
        else:
            lines.append(f"{launch} {row['ms']} | | | |")
    return lines


def markdown(result: dict) -> str:
    before = result["norm_before_gate"]
    lines = ["# The gated RMSNorm's backward: mamba-ssm's kernel and ours", "",
             f"bf16, {ROWS:,} rows of {CHANNELS} channels (the 1.3B mixer's norm at 16K tokens a step), one group, z "
             "and dz views of in_proj's output and gradient, the output recomputed. Norm after the gate (our "
             f"models'): mamba-ssm's `_layer_norm_bwd` {result['mamba_ssm_ms']:.3f} ms.", "",
             "## mamba-ssm's kernel under other launches", "",
             "| programs per multiprocessor | warps | ms | x mamba-ssm's launch | largest difference |",
             "|---|---|---|---|---|"]
    for row in result["sweep"]:
        timed = isinstance(row["ms"], float)
        lines.append(f"| {row['programs_per_multiprocessor']} | {row['num_warps']} | "
                     f"{row['ms']:.3f} | {row['ms'] / result['mamba_ssm_ms']:.2f} | {row['largest_difference']:.2g} |"
                     if timed else f"| {row['programs_per_multiprocessor']} | {row['num_warps']} | {row['ms']} | | |")
    lines += ["", "## Ours (`gated_norm_triton`), norm after the gate, fastest first", "",
              *our_table(result["ours"], result["mamba_ssm_ms"]), "",
              f"## Norm before the gate: mamba-ssm's `_layer_norm_bwd` {before['mamba_ssm_ms']:.3f} ms; ours under "
              "the default and the fastest settings above", "", *our_table(before["ours"], before["mamba_ssm_ms"])]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = new_result(rows=ROWS, channels=CHANNELS, in_proj_width=IN_PROJ_WIDTH)
    result.update(measure())
    save(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
