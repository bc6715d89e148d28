"""The exact cache's attention: our kernel (`modeling/cache_attention.py`) against the attention implementation under
the cache's additive mask (SDPA, as transformers' `sdpa` attention calls it), at the shapes of diffuapriel-h-1.3b's
attention layers (16 heads of 128, bf16, blocks of 32), on one GPU:
- a prefill chunk: 4,096 queries after 0 to 60K kept keys (SDPA reads the keys up to the chunk's end under a mask);
- a denoising step: 32 queries after 1K to 256K kept keys (SDPA reads the whole buffer under a mask, as the graphed
  steps do, so that their shapes never change).
Per shape, the kernel with its default tiles and splits, a sweep of tiles (prefill) or of splits (step), SDPA's time,
and the largest difference between the kernel's output and SDPA's. Every time is the GPU's alone, from calls replayed
from a CUDA graph as generate()'s are (timed eagerly, a step's small kernels measured the host's launches: the split
path's merge looked 0.4 ms slower than it is).

    python benchmarks/cache_attention.py --out benchmarks/results/cache_attention
"""

import argparse

import torch
import torch.nn.functional as F

from harness import graphed_call_ms, new_result, save

from diffuapriel_hf.modeling import cache_attention as attention

HEADS, HEAD_DIM, BLOCK, DTYPE = 16, 128, 32, torch.bfloat16
PREFILL_WIDTH, PREFILL_KEPT = 4096, [0, 4096, 16384, 61440]
STEP_WIDTH, STEP_KEPT = 32, [1024, 2048, 4096, 8192, 16384, 65536, 131072, 262144]
STEP_SLACK = 256  # the buffer holds the new tokens too: a step reads them under the mask
PREFILL_TILES = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in
                 [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2)]]
STEP_SPLITS = [1, 2, 4, 8, 16, 32, 64]


def inputs(width: int, kept: int, length: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(1, width, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=generator).transpose(1, 2)
    key, value = (torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=DTYPE, generator=generator)
                  for _ in "kv")
    valid = torch.zeros(1, length, dtype=torch.bool, device="cuda")
    valid[:, : kept + width] = True
    return query, key, value, valid, torch.tensor(kept, device="cuda")


def sdpa_with_mask(query, key, value, valid, start, visible: int):
    """What the attention implementation computes: SDPA over the first `visible` buffer positions under the additive
    mask the cache builds (built outside the timing, as the model builds it once a pass for every layer)."""
    allowed = attention.visible_keys(valid[:, :visible], start, query.shape[2], BLOCK)[:, None]
    mask = torch.zeros(allowed.shape, dtype=DTYPE, device="cuda").masked_fill(~allowed, torch.finfo(DTYPE).min)
    key, value = key[:, :, :visible], value[:, :, :visible]
    return lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=HEAD_DIM**-0.5)


def measure(width: int, kept: int, length: int, visible: int, variants: dict) -> dict:
    query, key, value, valid, start = inputs(width, kept, length)
    scale = HEAD_DIM**-0.5
    sdpa = sdpa_with_mask(query, key, value, valid, start, visible)
    kernel = lambda: attention.cache_attention(query, key, value, valid, start, BLOCK, scale)  # noqa: E731
    difference = (kernel().float() - sdpa().transpose(1, 2).float()).abs().max().item()
    row = dict(width=width, kept=kept, buffer=length, sdpa_ms=graphed_call_ms(sdpa), kernel_ms=graphed_call_ms(kernel),
               max_abs_difference=difference)
    row["sweep_ms"] = {name: graphed_call_ms(lambda: attention.launch_cache_attention(
        query, key, value, valid, start, BLOCK, scale, **settings)) for name, settings in variants.items()}
    row["speedup"] = row["sdpa_ms"] / row["kernel_ms"]
    del query, key, value
    torch.cuda.empty_cache()
    return row


def run() -> dict:
    result = new_result(heads=HEADS, head_dim=HEAD_DIM, block_size=BLOCK, dtype=str(DTYPE),
                        prefill_tiles=attention.PREFILL_TILES, step_tiles=attention.STEP_TILES, rows=[])
    prefill_variants = {"M{BLOCK_M} N{BLOCK_N} w{num_warps} s{num_stages}".format(**t): dict(t, splits=1)
                        for t in PREFILL_TILES}
    for kept in PREFILL_KEPT:
        length = kept + PREFILL_WIDTH
        result["rows"].append(dict(kind="prefill", **measure(PREFILL_WIDTH, kept, length, length, prefill_variants)))
        print(result["rows"][-1], flush=True)
    step_variants = {f"splits {s}": dict(attention.STEP_TILES, BLOCK_M=STEP_WIDTH, splits=s) for s in STEP_SPLITS}
    for kept in STEP_KEPT:
        length = kept + STEP_SLACK
        result["rows"].append(dict(kind="step", **measure(STEP_WIDTH, kept, length, length, step_variants)))
        print(result["rows"][-1], flush=True)
    return result


def markdown(result: dict) -> str:
    lines = ["| pass | queries | kept keys | SDPA + mask (ms) | kernel (ms) | speed-up | best of the sweep | "
             "max abs diff |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        best = min(row["sweep_ms"], key=row["sweep_ms"].get)
        lines.append(f"| {row['kind']} | {row['width']:,} | {row['kept']:,} | {row['sdpa_ms']:.3f} | "
                     f"{row['kernel_ms']:.3f} | {row['speedup']:.1f}x | {best}: {row['sweep_ms'][best]:.3f} | "
                     f"{row['max_abs_difference']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="path stem of the .json and .md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device")
    result = run()
    save(result, args.out, markdown=markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
