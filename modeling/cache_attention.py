"""Attention over the exact cache's key-value buffer (`cache.BlockDiffusionCache`), with its PyTorch reference and a
Triton kernel for CUDA inference.

A pass of W queries against the cache sits at buffer positions [start, start + W), right after the consumed ones
(`start`, a multiple of the block size, is a device tensor so that a CUDA graph replays at wherever the cache stands).
Query i sees key j where the key is valid (a real token, kept or the pass's own) and its block is not after the
query's: `j // block_size <= (start + i) // block_size`. Everything the rule needs is a (B, V) bool vector and a
scalar, so no (B, W, V) mask is built, and keys past the query's block are never read.

Through transformers' attention interface the same rule is an additive (B, 1, W, V) mask, built at every pass (512
MB for a prefill chunk of 4K queries over 64K keys) and read by SDPA's memory-efficient kernel, which has few programs
to spread over a step's keys (32 queries: one program per head, each walking every key). The kernel here reads no
mask, skips the keys past each query tile's block, and splits a long key range over several programs when the queries
alone leave the GPU idle (flash-decoding), merging their partial results by log-sum-exp. On an H100, from CUDA
graphs (benchmarks/results/cache_attention.md), a step after 64K kept keys took 0.23 ms a layer against 1.48 through
SDPA; a prefill chunk after 60K keys 5.88 ms against 6.82, the mask's building aside.
"""

import torch

from .cuda_device import on_device_of

try:  # installed with mamba-ssm (and by PyTorch's CUDA wheels); without it, the reference
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Tiles, warps and splits, measured by benchmarks/cache_attention.py on an H100 (results/cache_attention.json, every
# call replayed from a CUDA graph as generate() replays steps) at diffuapriel-h-1.3b's heads: for a prefill chunk of
# 4,096 queries, tiles of 64 x 64 with 4 warps (5.88 ms after 60K kept keys, against 6.82 for SDPA under the mask).
# For a step of 32 queries (one program a head), split in whole rounds of programs: 16 x 16 programs fill the 132
# multiprocessors twice (16 splits the fastest from 8K to 256K kept keys: 0.075 ms at 8K, 0.76 at 256K, against 0.197
# and 5.9 for SDPA); fewer keys take fewer splits of at least MIN_SPLIT_KEYS each (8 at 4K: 0.054 ms), and below
# SPLIT_FROM_KEYS none, where the merge costs more than it saves (unsplit 0.028 ms at 1K, split 0.041-0.067).
PREFILL_TILES = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)  # passes of more than 64 queries
STEP_TILES = dict(BLOCK_N=64, num_warps=4, num_stages=3)  # a step: BLOCK_M is the width rounded up to a power of 2
SPLIT_PROGRAMS_PER_MULTIPROCESSOR = 2  # at most this many programs a multiprocessor, in whole rounds
SPLIT_FROM_KEYS = 2048  # no split of a step reading fewer keys
MIN_SPLIT_KEYS = 512  # no split part of fewer keys than this


def visible_keys(key_valid: torch.Tensor, start: torch.Tensor, width: int, block_size: int) -> torch.Tensor:
    """(B, W, V) bool: whether the query at buffer position start + i sees key j, for key_valid (B, V) bool."""
    key_block = torch.arange(key_valid.shape[1], device=key_valid.device) // block_size  # (V,)
    query_block = (start + torch.arange(width, device=key_valid.device)) // block_size  # (W,)
    return key_valid[:, None, :] & (key_block[None, None, :] <= query_block[None, :, None])


def cache_attention_reference(query, key, value, key_valid, start, block_size: int, scaling: float) -> torch.Tensor:
    """query (B, H, W, d), key and value (B, Hkv, V, d) with H a multiple of Hkv, key_valid (B, V) bool, start a
    0-dim long tensor -> (B, W, H, d), as transformers' attention functions return it. A query that sees no key gets
    zeros. Scores and softmax in float32."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1).float() for t in (key, value))  # (B, H, V, d)
    visible = visible_keys(key_valid, start, query.shape[2], block_size)[:, None]  # (B, 1, W, V)
    scores = (query.float() @ key.transpose(-1, -2)) * scaling  # (B, H, W, V)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return (weights @ value).to(query.dtype).transpose(1, 2)


def cache_attention(query, key, value, key_valid, start, block_size: int, scaling: float) -> torch.Tensor:
    """`cache_attention_reference` as the Triton kernel (CUDA tensors, no gradient; the model's `KernelPolicy`
    chooses it): tiles and splits chosen from the shapes."""
    batch, heads, width, head_dim = query.shape
    if width > 64:
        tiles, splits = PREFILL_TILES, 1
    else:
        tiles = dict(STEP_TILES, BLOCK_M=max(16, triton.next_power_of_2(width)))
        programs = batch * heads * triton.cdiv(width, tiles["BLOCK_M"])
        # (Triton's interpreter runs CPU tensors: one "multiprocessor".)
        multiprocessors = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 1
        fitting = SPLIT_PROGRAMS_PER_MULTIPROCESSOR * multiprocessors // programs  # no partly filled last round
        splits = 1 if key.shape[2] < SPLIT_FROM_KEYS else max(1, min(fitting, key.shape[2] // MIN_SPLIT_KEYS))
    return launch_cache_attention(query, key, value, key_valid, start, block_size, scaling, splits, **tiles)


def launch_cache_attention(query, key, value, key_valid, start, block_size, scaling, splits, BLOCK_M, BLOCK_N,
                           num_warps, num_stages):
    """The kernel with explicit tiles and splits (the interpreter tests and the benchmark call it). With one split the
    programs write the output; with several, each writes its part's normalised output and log-sum-exp (float32),
    merged here."""
    batch, heads, width, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("cache_attention needs queries, keys and values contiguous in their last dimension")
    out = torch.empty(batch, width, heads, head_dim, device=query.device, dtype=query.dtype)
    if splits == 1:
        partial, log_sum_exp = out[None], torch.empty(1, batch, width, heads, device=query.device)
    else:
        partial = torch.empty(splits, batch, width, heads, head_dim, device=query.device, dtype=torch.float32)
        log_sum_exp = torch.empty(splits, batch, width, heads, device=query.device, dtype=torch.float32)
    valid = key_valid.view(torch.uint8) if key_valid.dtype == torch.bool else key_valid
    grid = (triton.cdiv(width, BLOCK_M), batch * heads, splits)
    with on_device_of(query):
        _cache_attention_kernel[grid](
            query, key, value, valid, start, partial, log_sum_exp,
            *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], valid.stride(0), *partial.stride()[:4],
            *log_sum_exp.stride()[:4], width, length, heads, heads // kv_heads, head_dim, scaling,
            BLOCK_SIZE=block_size, SPLITS=splits, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=num_warps,
            num_stages=num_stages,
        )
    if splits == 1:
        return out
    # Each part's weight is its share of the whole softmax sum: exp(lse_s - lse). Parts with no visible key have
    # lse_s = -inf and weight 0; a query that sees no key at all gets zeros.
    total = torch.logsumexp(log_sum_exp, dim=0)  # (B, W, H)
    weights = torch.exp(log_sum_exp - total.masked_fill(total == float("-inf"), 0.0)).nan_to_num(0.0)
    return out.copy_((weights[..., None] * partial).sum(0))


__all__ = ["cache_attention", "cache_attention_reference", "launch_cache_attention", "visible_keys"]

if triton is not None:

    @triton.jit
    def _cache_attention_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, out_ptr, lse_ptr,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_valid_b, stride_os, stride_ob, stride_om, stride_oh, stride_ls, stride_lb, stride_lm, stride_lh,
        width, length, heads, groups, head_dim, scaling,
        BLOCK_SIZE: tl.constexpr, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # One program: BLOCK_M queries of one (row, head), against one of SPLITS parts of the keys they may see.
        # Online softmax in base 2 (scores times log2(e)); out = the part's normalised output, lse its natural log-sum.
        # 64-bit offsets: a batch of long buffers exceeds 2**31 elements.
        tile, row_head, split = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        row, head = row_head // heads, row_head % heads
        kv_head = head // groups
        start = tl.load(start_ptr)
        queries = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,) in the pass
        channels = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + row * stride_qb + head * stride_qh + queries[:, None] * stride_qm + channels[None, :],
                    mask=(queries[:, None] < width) & (channels[None, :] < head_dim), other=0.0)  # (M, D)
        query_block = (start + queries) // BLOCK_SIZE
        # Keys past the last query's block are never visible: the key range ends there.
        last_query = tl.minimum(tile * BLOCK_M + BLOCK_M, width) - 1
        end = tl.minimum(((start + last_query) // BLOCK_SIZE + 1) * BLOCK_SIZE, length)
        part = tl.cdiv(tl.cdiv(end, SPLITS), BLOCK_N) * BLOCK_N
        low, high = split * part, tl.minimum(split * part + part, end)
        k_base = k_ptr + row * stride_kb + kv_head * stride_kh
        v_base = v_ptr + row * stride_vb + kv_head * stride_vh
        score_scale = scaling * 1.4426950408889634  # log2(e)
        running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for key_start in range(low, high, BLOCK_N):
            keys = key_start + tl.arange(0, BLOCK_N)  # (N,)
            inside = keys < high
            k = tl.load(k_base + keys[None, :] * stride_kn + channels[:, None],
                        mask=inside[None, :] & (channels[:, None] < head_dim), other=0.0)  # (D, N)
            v = tl.load(v_base + keys[:, None] * stride_vn + channels[None, :],
                        mask=inside[:, None] & (channels[None, :] < head_dim), other=0.0)  # (N, D)
            valid = tl.load(valid_ptr + row * stride_valid_b + keys, mask=inside, other=0) != 0
            seen = valid[None, :] & ((keys // BLOCK_SIZE)[None, :] <= query_block[:, None])  # (M, N)
            scores = tl.dot(q, k, input_precision=DOT_PRECISION) * score_scale
            scores = tl.where(seen, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that have seen nothing yet
            probabilities = tl.exp2(scores - shift[:, None])
            rescale = tl.exp2(running_max - shift)
            running_sum = running_sum * rescale + tl.sum(probabilities, axis=1)
            acc = acc * rescale[:, None] + tl.dot(probabilities.to(v.dtype), v, input_precision=DOT_PRECISION)
            running_max = new_max
        empty = running_sum == 0.0
        acc = acc / tl.where(empty, 1.0, running_sum)[:, None]
        log2_sum = running_max + tl.log2(tl.where(empty, 1.0, running_sum))
        lse = tl.where(empty, float("-inf"), log2_sum * 0.6931471805599453)  # ln(2)
        out_rows = out_ptr + split * stride_os + row * stride_ob + head * stride_oh + queries[:, None] * stride_om
        tl.store(out_rows + channels[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(queries[:, None] < width) & (channels[None, :] < head_dim))
        tl.store(lse_ptr + split * stride_ls + row * stride_lb + head * stride_lh + queries * stride_lm, lse,
                 mask=queries < width)
