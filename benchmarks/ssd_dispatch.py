"""Where the single-pass SSD kernel beats mamba-ssm's inside a whole model: the rule `ssd_triton.single_pass_is_faster`
is read off this measurement.

For diffuapriel-1.3b (bf16, random weights) at each shape, one denoising step replayed from a CUDA graph (as
`generate()` runs it, so kernel launch costs do not count) with every inference SSD call on our single-pass kernel,
and with every one on mamba-ssm's `mamba_chunk_scan_combined`; all in one process, on one GPU.

    python benchmarks/ssd_dispatch.py --out benchmarks/results/ssd_dispatch.json
"""

import argparse
from pathlib import Path

import torch

from harness import build, graphed_step_ms, new_result, save  # benchmarks/harness.py, beside this script

SHAPES = [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 16384), (1, 32768), (1, 65536), (16, 1024), (8, 2048),
          (4, 4096), (2, 8192), (4, 16384)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy
    from diffuapriel_hf.modeling.mamba_ops import kernel_ops
    from diffuapriel_hf.modeling.ssd_triton import single_pass_is_faster

    model = build("diffuapriel-1.3b")
    heads = model.config.mamba_n_heads
    choices = {"single_pass": kernel_ops(single_pass=True), "mamba_ssm": kernel_ops(single_pass=False)}
    result = new_result(rows=[])
    for batch, length in SHAPES:
        ids = torch.randint(0, model.config.mask_token_id, (batch, length), device="cuda")
        row = dict(batch=batch, length=length,
                   rule_picks_single_pass=single_pass_is_faster(batch, heads, length, ids.device))
        for name, ops in choices.items():
            with override_kernel_policy(mamba=ops):
                row[f"{name}_graphed_step_ms"] = graphed_step_ms(model, ids, reps=10, warmup=2)
        result["rows"].append(row)
        print(f"{batch:2d} x {length:6d}: single pass {row['single_pass_graphed_step_ms']:7.2f} ms, mamba-ssm "
              f"{row['mamba_ssm_graphed_step_ms']:7.2f} ms, rule picks "
              f"{'single pass' if row['rule_picks_single_pass'] else 'mamba-ssm'}", flush=True)
        save(result, args.out)


if __name__ == "__main__":
    main()
