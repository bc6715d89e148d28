"""Where one denoising step's GPU time goes: the kernels of one forward pass of a preset (random weights, bf16,
batch 1), timed by PyTorch's profiler and grouped by kernel name, largest first. With --training, those of one
training step's forward and backward instead (half the tokens masked, the MDLM loss of the model's forward; no
optimizer), at --batch sequences. With --cached_step, those of one step of a block model's generation: its block
alone against an exact cache holding --length tokens (run eagerly, not from the CUDA graph generation replays, so
that every kernel shows; the listing also counts the launches, which the graph's replay pays about 2-3 us each).
It also records the profiled step's wall time, how long the host took to issue it (the time until the step returned,
before synchronising), how long some kernel ran between the first kernel's start and the last one's end (the rest is
the device waiting for the host), and the longest of those waits with the kernels on either side.

    python benchmarks/profile_step.py --model diffuapriel-1.3b --length 65536 --out benchmarks/results/profile_64k.json
    python benchmarks/profile_step.py --model diffuapriel-1.3b --length 4096 --batch 4 --training --out OUT.json
    python benchmarks/profile_step.py --model diffuapriel-1.3b-block --length 8192 --cached_step --out OUT.json
"""

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from diffuapriel_hf.modeling.denoisers import ExactCacheDenoiser

from harness import build, new_result, save  # benchmarks/harness.py, beside this script


def inference_step(model, length: int):
    ids = torch.randint(0, model.config.mask_token_id, (1, length), device=model.device)
    return torch.no_grad()(lambda: model(ids))


def training_step(model, batch: int, length: int, losses: Optional[list] = None):
    """Forward with the MDLM loss and backward on fixed tokens (seeded), half of them masked (the loss weights left
    at the model's default); each step's loss appended to `losses` when given."""
    model.train()
    device = model.device
    ids = torch.randint(3, model.config.mask_token_id, (batch, length), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    masked = torch.rand(ids.shape, device=device, generator=torch.Generator(device).manual_seed(1)) < 0.5
    noised, labels = ids.masked_fill(masked, model.config.mask_token_id), ids.masked_fill(~masked, -100)

    def step():
        loss = model(input_ids=noised, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if losses is not None:
            losses.append(loss.detach())
    return step


def cached_step(model, batch: int, length: int):
    """One step of block generation after `length` tokens of context: the context consumed into an exact cache
    first (untimed), then the next block's pass against it, all masks but its first token."""
    block = model.config.block_size
    ids = torch.randint(0, model.config.mask_token_id, (batch, length + block), device=model.device)
    ids[:, length + 1 :] = model.config.mask_token_id
    denoiser = ExactCacheDenoiser(model, attention_mask=None, graphs=False)
    denoiser.start_block(slice(length, length + block))
    with torch.no_grad():
        denoiser.consume(ids, length)
    return torch.no_grad()(lambda: denoiser(ids))


def waits_us(kernels) -> tuple[float, list[tuple]]:
    """(span, waits) of kernels given as (start, end, name) in us: the time from the first start to the last end,
    and each wait inside it while no kernel ran, as (length, start from the first kernel's start, the kernel that
    ended before it (the last to end), the one that started after it), in order."""
    kernels = sorted(kernels)
    if not kernels:
        return 0.0, []
    waits, covered_to, last_name = [], kernels[0][1], kernels[0][2]  # the kernels so far have run up to covered_to
    for start, end, name in kernels[1:]:
        if start > covered_to:
            waits.append((start - covered_to, covered_to - kernels[0][0], last_name, name))
        if end > covered_to:
            covered_to, last_name = end, name
    return covered_to - kernels[0][0], waits


def busy_ms(intervals) -> tuple[float, float]:
    """(span, busy) in ms of kernel intervals given as (start, end) in us: from the first start to the last end, and
    the time at least one kernel ran (the union of the intervals); span - busy is the device's idle time inside the
    step, waiting on the host."""
    span, waits = waits_us([(start, end, "") for start, end in intervals])
    return span / 1e3, (span - sum(wait[0] for wait in waits)) / 1e3


def idle_gaps(kernels, count: int) -> list[dict]:
    """The `count` longest waits between kernels (`waits_us`), longest first: each wait's length and start in ms and
    the kernels on either side."""
    longest = sorted(waits_us(kernels)[1], key=lambda wait: wait[0], reverse=True)[:count]
    return [dict(ms=length / 1e3, at_ms=at / 1e3, after=after[:80], before=before[:80])
            for length, at, after, before in longest]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="diffuapriel-1.3b")
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--top", type=int, default=25, help="kernels listed by name; the rest are summed")
    parser.add_argument("--gaps", type=int, default=10, help="the longest waits between kernels listed")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--training", action="store_true", help="a training step's forward and backward")
    parser.add_argument("--cached_step", action="store_true",
                        help="a block model's generation step against an exact cache of --length tokens")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.training and args.cached_step:
        parser.error("--training and --cached_step profile different passes: give one")

    result = new_result(model=args.model, length=args.length, batch=args.batch, training=args.training,
                        cached_step=args.cached_step)
    model = build(args.model, max_position_embeddings=max(65536, args.length + 64))
    if args.training:
        step = training_step(model, args.batch, args.length)
    elif args.cached_step:
        step = cached_step(model, args.batch, args.length)
    else:
        step = inference_step(model, args.length)
    for _ in range(2):  # compile the Triton kernels and settle the allocator
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        step()
        host_ms = 1e3 * (time.perf_counter() - started)
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - started)
    totals, counts, kernels = defaultdict(float), defaultdict(int), []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / 1e3  # ms
            counts[event.name] += 1
            kernels.append((event.time_range.start, event.time_range.end, event.name))
    span, busy = busy_ms([kernel[:2] for kernel in kernels])
    gaps = idle_gaps(kernels, args.gaps)
    result.update(wall_ms=wall_ms, host_ms=host_ms, kernel_span_ms=span, kernel_busy_ms=busy, longest_waits=gaps)
    ranked = sorted(totals, key=totals.get, reverse=True)
    rows = [dict(kernel=name[:160], ms=totals[name], calls=counts[name]) for name in ranked[: args.top]]
    rest = sum(totals[name] for name in ranked[args.top:])
    result.update(total_kernel_ms=sum(totals.values()), other_kernels_ms=rest, launches=sum(counts.values()),
                  kernels=rows)
    for row in rows:
        print(f"{row['ms']:9.2f} ms {row['calls']:5d} x  {row['kernel'][:110]}")
    print(f"{rest:9.2f} ms in other kernels; {result['total_kernel_ms']:.2f} ms in {result['launches']} launches")
    print(f"the step: {wall_ms:.2f} ms (profiled), issued by the host in {host_ms:.2f}; kernels running {busy:.2f} of "
          f"the {span:.2f} ms from the first to the last")
    for gap in gaps:
        print(f"waited {gap['ms']:.3f} ms at {gap['at_ms']:.1f} ms, after {gap['after'][:50]}, "
              f"before {gap['before'][:50]}")
    save(result, args.out)


if __name__ == "__main__":
    main()
