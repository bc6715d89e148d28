"""Which chunk the PyTorch reference SSD (`mamba_chunk_scan_combined_reference`, the CPU's path) should run in, decided
by measurement on the CPU. The chunk orders the SSD's sums and does not change its result; it moves work between the
part inside each chunk (per head, several passes over a (chunk x chunk) decay matrix) and the states passed between
chunks (one (P, N) state per head per chunk). This times, in float32 with torch's threads:

- the reference alone, forward (no gradient) and forward + backward, at chunks of 32 to 256, for the mixer sizes of
  the 8M presets (16 heads of 32, state 64) and of diffuapriel-240m (32 heads of 64, state 128);
- a whole training step of diffuapriel-8m (forward with the loss, backward, AdamW) at 8 x 512 tokens, the
  reference in the model's chunk (`mamba_chunk_size`, 128) against `TORCH_OPS.chunk_size`.

    python benchmarks/reference_chunk_size.py --out benchmarks/results/reference_chunk_size_cpu
"""

import argparse
import dataclasses
import statistics

import torch

from harness import new_result, save, wall_seconds  # benchmarks/harness.py, beside this script

from diffuapriel_hf import DiffuAprielForMaskedLM, preset_config
from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy
from diffuapriel_hf.modeling.mamba_ops import TORCH_OPS, mamba_chunk_scan_combined_reference

CHUNK_SIZES = [32, 64, 128, 256]
# name: (batch, length, heads, head_dim, groups, state)
SHAPES = {
    "8m, 8 x 512": (8, 512, 16, 32, 1, 64),
    "8m, 1 x 2048": (1, 2048, 16, 32, 1, 64),
    "240m, 2 x 1024": (2, 1024, 32, 64, 1, 128),
}


def ssd_ms(shape, chunk: int, backward: bool, reps: int) -> float:
    batch, length, heads, head_dim, groups, state = shape
    generator = torch.Generator().manual_seed(0)
    x, z = (torch.randn(batch, length, heads, head_dim, generator=generator) for _ in range(2))
    dt = torch.rand(batch, length, heads, generator=generator)
    B, C = (torch.randn(batch, length, groups, state, generator=generator) for _ in range(2))
    A, D = -torch.rand(heads, generator=generator), torch.randn(heads, generator=generator)
    inputs = [x, z, dt, B, C, A, D]
    for t in inputs:
        t.requires_grad_(backward)

    def call():
        with torch.set_grad_enabled(backward):
            y = mamba_chunk_scan_combined_reference(x, dt, A, B, C, chunk, D=D, z=z, dt_softplus=True)
            if backward:
                torch.autograd.grad(y.sum(), inputs)
    return 1e3 * statistics.median(wall_seconds(call, reps))


def training_step_ms(ops, reps: int) -> float:
    config = preset_config("diffuapriel-8m", mask_token_id=4095)  # the last id of its 4,096-token vocabulary
    torch.manual_seed(0)
    model = DiffuAprielForMaskedLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.mask_token_id, (8, 512), generator=generator)
    masked = torch.rand(ids.shape, generator=generator) < 0.5
    noised, labels = ids.masked_fill(masked, config.mask_token_id), ids.masked_fill(~masked, -100)

    def step():
        with override_kernel_policy(mamba=ops):
            model(input_ids=noised, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(wall_seconds(step, reps))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path stem of the .json and .md")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    result = new_result(threads=torch.get_num_threads(), rows=[])
    lines = ["| mixer, batch x length | pass | " + " | ".join(f"chunk {c} ms" for c in CHUNK_SIZES) + " |",
             "|---|---|" + "---|" * len(CHUNK_SIZES)]
    for name, shape in SHAPES.items():
        for backward in (False, True):
            times = {chunk: ssd_ms(shape, chunk, backward, args.reps) for chunk in CHUNK_SIZES}
            result["rows"].append(dict(shape=name, backward=backward, ms=times))
            cells = " | ".join(f"{times[c]:.1f}" for c in CHUNK_SIZES)
            lines.append(f"| {name} | {'forward + backward' if backward else 'forward'} | {cells} |")
            print(lines[-1], flush=True)
    model_chunk = dataclasses.replace(TORCH_OPS, chunk_size=None)
    result["training_step_ms"] = {"model's chunk (128)": training_step_ms(model_chunk, args.reps),
                                  f"TORCH_OPS.chunk_size ({TORCH_OPS.chunk_size})": training_step_ms(TORCH_OPS,
                                                                                                     args.reps)}
    lines += ["", "diffuapriel-8m training step (forward, backward, AdamW) at 8 x 512 tokens: " + ", ".join(
        f"{name} {ms:.0f} ms" for name, ms in result["training_step_ms"].items()) + "."]
    save(result, args.out, markdown="\n".join(lines))
    print("\n".join(lines[-1:]))


if __name__ == "__main__":
    main()
