"""Where the single-pass SSD kernel beats mamba-ssm's inside a whole model: the rule `ssd_triton.single_pass_is_faster`
is read off this measurement.

For diffuapriel-1.3b (bf16, random weights) at each shape, one denoising step replayed from a CUDA graph (as
`generate()` runs it, so kernel launch costs do not count) with every inference SSD call on our single-pass kernel,
and with every one on mamba-ssm's `mamba_chunk_scan_combined`; all in one process, on one GPU.

With --short, the short sequences of a block model's generation instead: single SSD calls of the 1.3B presets' heads
(64 of 64, state 128) over 16 to 512 tokens, from a given state handing on the one they leave (the left-to-right
direction of a step) and from zeros (the right-to-left one), ten calls replayed from one CUDA graph
(`block_step.py` measures the choice inside whole steps).

    python benchmarks/ssd_dispatch.py --out benchmarks/results/ssd_dispatch.json
    python benchmarks/ssd_dispatch.py --short --out benchmarks/results/ssd_dispatch_short.json
"""

import argparse
from pathlib import Path

import torch

from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy
from diffuapriel_hf.modeling.mamba_ops import kernel_ops
from diffuapriel_hf.modeling.ssd_triton import single_pass_is_faster

from harness import build, graphed_call_ms, graphed_step_ms, new_result, save  # benchmarks/harness.py

SHAPES = [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 16384), (1, 32768), (1, 65536), (16, 1024), (8, 2048),
          (4, 4096), (2, 8192), (4, 16384)]
SHORT_LENGTHS = [16, 32, 64, 128, 256, 512]
SHORT_BATCHES = [1, 2]


def choices() -> dict:
    return {"single_pass": kernel_ops(single_pass=True), "mamba_ssm": kernel_ops(single_pass=False)}


def whole_steps(out: Path) -> None:
    model = build("diffuapriel-1.3b")
    heads = model.config.mamba_n_heads
    result = new_result(rows=[])
    for batch, length in SHAPES:
        ids = torch.randint(0, model.config.mask_token_id, (batch, length), device="cuda")
        row = dict(batch=batch, length=length,
                   rule_picks_single_pass=single_pass_is_faster(batch, heads, length, ids.device))
        for name, ops in choices().items():
            with override_kernel_policy(mamba=ops):
                row[f"{name}_graphed_step_ms"] = graphed_step_ms(model, ids, reps=10, warmup=2)
        result["rows"].append(row)
        print(f"{batch:2d} x {length:6d}: single pass {row['single_pass_graphed_step_ms']:7.2f} ms, mamba-ssm "
              f"{row['mamba_ssm_graphed_step_ms']:7.2f} ms, rule picks "
              f"{'single pass' if row['rule_picks_single_pass'] else 'mamba-ssm'}", flush=True)
        save(result, out)


def short_calls(rows: list) -> None:
    """Single SSD calls of the 1.3B presets' heads over short sequences, from a given or a zero state."""
    heads, head_dim, state = 64, 64, 128
    for batch in SHORT_BATCHES:
        for length in SHORT_LENGTHS:
            x = torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16)
            dt = torch.randn(batch, length, heads, device="cuda", dtype=torch.bfloat16)
            B, C = (torch.randn(batch, length, 1, state, device="cuda", dtype=torch.bfloat16) for _ in "BC")
            A, D, dt_bias = -torch.rand(heads, device="cuda") - 0.5, torch.ones(heads, device="cuda"), torch.zeros(
                heads, device="cuda")
            entering = torch.randn(batch, heads, head_dim, state, device="cuda")
            for name, ops in choices().items():
                for from_state in (True, False):
                    kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=True,
                                  initial_states=entering if from_state else None, return_final_states=from_state)
                    with torch.no_grad():
                        ms = graphed_call_ms(lambda: ops.chunk_scan(x, dt, A, B, C, 32, **kwargs))
                    rows.append(dict(kind="call", batch=batch, length=length, from_state=from_state, ssd=name, ms=ms))
                    print(f"call {batch} x {length:4d} {'from a state' if from_state else 'from zeros  '} {name:12s} "
                          f"{ms * 1e3:8.1f} us", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="a block model's short sequences (see above)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.short:
        return whole_steps(args.out)
    result = new_result(rows=[])
    short_calls(result["rows"])
    save(result, args.out)


if __name__ == "__main__":
    main()
