"""The depthwise causal convolution's backward in the Mamba mixer's training pass: causal-conv1d's
`causal_conv1d_bwd_function`, which the training pass calls (`training_mixer.MixerTrainingPass.backward`), against ours
(`diffuapriel_hf.modeling.conv1d_triton`) under its default launch and a sweep of launch settings.

causal-conv1d's channels-last backward kernel took 0.24 ms a call in a 1.3B training step on an H100 (4 x 4K tokens,
40 calls, 9.7 ms a step), where the bytes it must move (read x and dout, write dx: about 430 MB, bf16) take about
0.13-0.15 ms at the card's bandwidth. In bf16 with the 1.3B mixer's convolution (4352 channels, width 4, silu, a
float32 weight and bias), x a column slice of in_proj's output and dx written into one of its gradient, as the
training pass passes them, at 4 x 4K and 1 x 16K tokens:
- the time of causal-conv1d's backward and of ours under `DEFAULT_LAUNCH` and each swept `ConvLaunch` (positions and
  channels a program, warps, pipeline stages), with the bandwidth that the bytes read and written once imply;
- the largest difference of dx, dweight and dbias from causal-conv1d's, with their scale.

    python benchmarks/conv1d_backward.py --out benchmarks/results/conv1d_backward
"""

import argparse
import itertools
from pathlib import Path

import torch

from diffuapriel_hf.modeling.conv1d_triton import DEFAULT_LAUNCH, ConvLaunch, launch_causal_conv1d_backward
from harness import kernel_comparison_row, new_result, save  # benchmarks/harness.py, beside this script

SHAPES = [(4, 4096), (1, 16384)]
DIM, STATE, HEADS, WIDTH = 4096, 128, 64, 4
CHANNELS = DIM + 2 * STATE  # xBC: the 1.3B mixer's conv_dim
IN_PROJ_WIDTH = 2 * DIM + 2 * STATE + HEADS  # z, xBC, dt
# Around the default: 128 to 512 positions a program, 128 to 512 channels (2 to 16 a thread), stages 1 (the prefetch
# alone) and 3 (Triton's pipeliner, where it takes the loop).
SWEEP = dict(block_t=[128, 256, 512], block_c=[128, 256, 512], num_warps=[1, 2, 4], num_stages=[1, 3])
# bf16 channels a thread: at most 8. Compiled for sm_90 without a GPU: 8 took 176 registers, 16 (one warp over 512)
# 255 and spilled 464 bytes a thread.
MOST_CHANNELS_PER_THREAD = 8
OUTPUTS = ("dx", "dweight", "dbias")


def conv_inputs(batch: int, length: int) -> dict:
    """x (a view of in_proj's output), dout, the float32 weight and bias, and two views of in_proj's gradient to
    write dx into (causal-conv1d's and ours), bf16."""
    g = torch.Generator(device="cuda").manual_seed(0)
    zxbcdt = torch.randn(batch, length, IN_PROJ_WIDTH, device="cuda", generator=g).to(torch.bfloat16)
    dzxbcdt = [torch.empty_like(zxbcdt) for _ in range(2)]
    return dict(x=zxbcdt[..., DIM:DIM + CHANNELS],
                dout=torch.randn(batch, length, CHANNELS, device="cuda", generator=g).to(torch.bfloat16),
                weight=0.5 * torch.randn(CHANNELS, WIDTH, device="cuda", generator=g),
                bias=0.1 * torch.randn(CHANNELS, device="cuda", generator=g),
                dx_theirs=dzxbcdt[0][..., DIM:DIM + CHANNELS], dx_ours=dzxbcdt[1][..., DIM:DIM + CHANNELS])


def bytes_moved(inputs: dict) -> int:
    """What the backward must read and write once: x and dout read, dx written."""
    return 3 * inputs["x"].numel() * inputs["x"].element_size()


def theirs(inputs: dict):
    """causal-conv1d's backward as `training_mixer` calls it: (dx, dweight, dbias)."""
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function

    dx, dweight, dbias, _ = causal_conv1d_bwd_function(
        inputs["x"].transpose(1, 2), inputs["weight"], inputs["bias"], inputs["dout"].transpose(1, 2), None, None,
        None, inputs["dx_theirs"].transpose(1, 2), False, True)
    return dx.transpose(1, 2), dweight, dbias


def ours(inputs: dict, launch: ConvLaunch):
    return launch_causal_conv1d_backward(inputs["x"], inputs["weight"], inputs["bias"], inputs["dout"], True,
                                         dx=inputs["dx_ours"], launch=launch)


def swept_launches(inputs: dict) -> list:
    """(launch fields, call) for `SWEEP`'s settings with at most `MOST_CHANNELS_PER_THREAD` channels a thread and at
    least one."""
    def call(launch):
        return lambda: ours(inputs, launch)

    launches = [ConvLaunch(*values) for values in itertools.product(*SWEEP.values())]
    return [(launch._asdict(), call(launch)) for launch in launches
            if 32 * launch.num_warps <= launch.block_c <= MOST_CHANNELS_PER_THREAD * 32 * launch.num_warps]


def conv_rows() -> list[dict]:
    rows = []
    for batch, length in SHAPES:
        inputs = conv_inputs(batch, length)
        rows.append(kernel_comparison_row(
            "conv1d backward", "causal_conv1d", OUTPUTS, lambda: theirs(inputs), lambda: ours(inputs, DEFAULT_LAUNCH),
            swept_launches(inputs), sweep_reps=20, sweep_warmup=2, batch=batch, length=length,
            launch=DEFAULT_LAUNCH._asdict(), gigabytes=bytes_moved(inputs) / 1e9))
    return rows


def sweep_table(row: dict) -> list:
    lines = ["| positions | channels | warps | stages | ms | x causal-conv1d's | max diff dx, dweight, dbias |",
             "|---|---|---|---|---|---|---|"]
    timed = sorted((s for s in row["sweep"] if isinstance(s["ms"], float)), key=lambda s: s["ms"])
    for s in timed + [s for s in row["sweep"] if not isinstance(s["ms"], float)]:
        launch = f"| {s['block_t']} | {s['block_c']} | {s['num_warps']} | {s['num_stages']} |"
        if isinstance(s["ms"], float):
            diffs = ", ".join(f"{s['max_abs_diff'][name]:.3g}" for name in OUTPUTS)
            lines.append(f"{launch} {s['ms']:.3f} | {s['ms'] / row['causal_conv1d_ms']:.2f} | {diffs} |")
        else:
            lines.append(f"{launch} {s['ms']} | | |")
    return lines


def markdown(result: dict) -> str:
    lines = ["# The causal convolution's backward: ours against causal-conv1d's `causal_conv1d_bwd_function`", "",
             f"bf16, {CHANNELS} channels, width {WIDTH}, silu, float32 weight and bias, x and dx views of in_proj's "
             "output and gradient; TB/s: the bytes read and written once (x, dout, dx) over the time.", "",
             "| batch x length | causal-conv1d ms (TB/s) | ours ms (TB/s) | ours / causal-conv1d | best swept ms "
             "(launch) | max diff dx, dweight, dbias (of) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        best = {k: v for k, v in row["best"].items() if k not in ("ms", "max_abs_diff")}
        diffs = ", ".join(f"{row['max_abs_diff'][name]:.3g} ({row['reference_max_abs'][name]:.3g})"
                          for name in OUTPUTS)
        lines.append(f"| {row['batch']} x {row['length']} | {row['causal_conv1d_ms']:.3f} "
                     f"({row['gigabytes'] / row['causal_conv1d_ms']:.2f}) | {row['ours_ms']:.3f} "
                     f"({row['gigabytes'] / row['ours_ms']:.2f}) | {row['ours_ms'] / row['causal_conv1d_ms']:.2f} | "
                     f"{row['best']['ms']:.3f} ({best}) | {diffs} |")
    lines += ["", f"Ours under {result['rows'][0]['launch']} (`DEFAULT_LAUNCH`)."]
    for row in result["rows"]:
        lines += ["", f"## The sweep at {row['batch']} x {row['length']}, fastest first", "", *sweep_table(row)]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = new_result(channels=CHANNELS, width=WIDTH, in_proj_width=IN_PROJ_WIDTH, silu=True)
    result["rows"] = conv_rows()
    save(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
