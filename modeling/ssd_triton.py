# Generated from src/diffuapriel_hf/ssd_triton.py by `python -m diffuapriel_hf.hub bundle modeling`: do not edit.
# Hub remote code of DiffuApriel: loads with trust_remote_code=True where diffuapriel_hf is not installed.
"""A single-pass SSD forward kernel (Triton) for inference: the state is carried across chunks in registers.

mamba-ssm's `mamba_chunk_scan_combined` runs the chunked SSD as five kernels: it writes every chunk's (P, N) state
to memory, passes the states along the sequence in another kernel and reads them back in a third. At 64 heads of 64
with state 128 and chunks of 256 those states weigh as much as x itself.

Here one program owns one (sequence, head, slice of the head's channels) and walks the sequence chunk by chunk,
keeping its slice of the state in float32 registers. Per chunk of T tokens:

    y     = ((C B^T) * decay * dt) x  +  exp(cumsum(dt A)) * (C state^T)  +  D x       # (T, P)
    state = exp(sum(dt A)) * state  +  (x * dt * decay_to_chunk_end)^T B              # (P, N)

so x, dt, B and C are read once and y written once. The price is parallelism: there are only batch x heads x channel
slices walks, each sequential over the sequence (the next chunk's loads overlap the current chunk's products). With
at least one (sequence, head) walk per multiprocessor it beats mamba-ssm's kernels (10-12% off a whole 1.3B denoising
step at 16 x 1K to 4 x 16K tokens on an H200). With fewer (one sequence: 64 heads on 132 multiprocessors), a long
sequence is cut into segments walked in parallel: a first pass keeps only each segment's leaving state, and the second
starts each segment from its entering state, folded from the earlier segments'; short ones go to mamba-ssm
(`single_pass_is_faster`).

It computes the forward from a zero state only (no gradient), with the signature of `mamba_chunk_scan_combined` for
what the mixer passes; `mamba_ops` sends everything else (training, initial or final states, a gate z) to
mamba-ssm. The products round their inputs to x's dtype and accumulate in float32, as mamba-ssm's kernels do; for
float32 inputs they are exact float32 products (no TF32).
"""

import functools

import torch

try:  # a dependency of mamba-ssm: mamba_ops imports this module only where mamba-ssm imports
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("diffuapriel_hf.ssd_triton needs triton, which mamba-ssm installs") from error

# Launch settings measured on an H200 (benchmarks/results/ssd_kernel.json).
CHUNK = 32
NUM_WARPS = 4
NUM_STAGES = 2
# Segments, for sequences with fewer (sequence, head) walks than multiprocessors: enough for this many walks per
# multiprocessor, none shorter than this many tokens, and at least this many; with fewer, mamba-ssm keeps the call
# (whole steps with two segments were not measured).
SEGMENT_WALKS_PER_MULTIPROCESSOR = 8
MIN_SEGMENT_LENGTH = 2048
MIN_SEGMENTS = 4


def single_pass_is_faster(batch: int, nheads: int, seqlen: int, device) -> bool:
    """Whether this kernel beats mamba-ssm's for these sizes: with at least as many (sequence, head) walks as the GPU
    has multiprocessors, or with a sequence long enough to be cut into segments walked in parallel. With fewer, short
    walks (batch 1 under 8K tokens at 64 heads) the GPU is underused and mamba-ssm's five parallel passes win.
    Measured on an H200 (132 multiprocessors) with whole diffuapriel-1.3b denoising steps replayed from CUDA graphs,
    ours vs mamba-ssm: 99.9 vs 112.7 ms at 16 x 1K, 402 vs 458 ms at 4 x 16K (benchmarks/results/ssd_dispatch.json);
    53.0 vs 55.2 ms at 1 x 8K, 101.1 vs 108.8 ms at 1 x 16K, 402.9 vs 445.5 ms at 1 x 64K; 30.6 vs 28.4 ms at 1 x 4K
    unsegmented (ssd_dispatch_batch1.json)."""
    return batch * nheads >= _multiprocessors(device) or _segments(batch, nheads, seqlen, device) > 1


@functools.lru_cache
def _multiprocessors(device) -> int:
    # Asked several times per SSD call (the rule, then the launch settings): looked up once per device.
    return torch.cuda.get_device_properties(device).multi_processor_count


def _segments(batch: int, nheads: int, seqlen: int, device) -> int:
    """How many segments to cut each sequence into (tuned on an H200: benchmarks/results/ssd_kernel.json)."""
    walks = batch * nheads
    if walks >= _multiprocessors(device):
        return 1
    segments = min(SEGMENT_WALKS_PER_MULTIPROCESSOR * _multiprocessors(device) // walks, seqlen // MIN_SEGMENT_LENGTH)
    return segments if segments >= MIN_SEGMENTS else 1


@triton.jit
def _ssd_forward_kernel(
    x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, leaving_ptr, log_decay_ptr,
    seqlen, segment_length, nsegments, nheads, heads_per_group, headdim, dstate, dt_min, dt_max,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr, HAS_D: tl.constexpr,
    STORE_Y: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (sequence and head, channel slice, segment) walks tokens [segment start, segment end). With STORE_Y
    # false it keeps only the state leaving the segment (and the segment's total log decay); with STORE_Y true it
    # starts from the state entering the segment, folded from the earlier segments' leaving states, and writes y.
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    segment = tl.program_id(2)
    batch = pid_bh // nheads
    head = pid_bh % nheads
    group = head // heads_per_group
    x_ptr += batch * stride_x_b + head * stride_x_h
    dt_ptr += batch * stride_dt_b + head * stride_dt_h
    B_ptr += batch * stride_B_b + group * stride_B_g
    C_ptr += batch * stride_C_b + group * stride_C_g
    y_ptr += batch * stride_y_b + head * stride_y_h
    segment_start = segment * segment_length
    segment_end = tl.minimum(segment_start + segment_length, seqlen)

    offs_t = tl.arange(0, CHUNK)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    # States: (batch, segments, heads, headdim, dstate) float32; log decays: (batch, segments, heads).
    state_offsets = offs_p[:, None] * dstate + offs_n[None, :]
    state_mask = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    A = tl.load(A_ptr + head).to(tl.float32)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + head).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + head).to(tl.float32)
    causal = offs_t[:, None] >= offs_t[None, :]
    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if STORE_Y:
        for earlier in range(0, segment):
            index = (batch * nsegments + earlier) * nheads + head
            state = state * tl.exp(tl.load(log_decay_ptr + index))
            state += tl.load(leaving_ptr + index * headdim * dstate + state_offsets, mask=state_mask, other=0.0)
    log_decay = A * 0.0  # the segment's total log decay, sum of dt A

    for start in range(segment_start, segment_end, CHUNK):
        t = start + offs_t
        in_seq = t < segment_end
        dt = tl.load(dt_ptr + t * stride_dt_l, mask=in_seq, other=0.0).to(tl.float32)  # (T,)
        if HAS_DT_BIAS:
            dt += dt_bias
        if DT_SOFTPLUS:
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        if HAS_DT_LIMIT:
            dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        dt = tl.where(in_seq, dt, 0.0)  # past the end: no decay, no input
        dA = dt * A
        dA_cumsum = tl.cumsum(dA, axis=0)  # (T,)
        dA_total = tl.sum(dA, axis=0)
        log_decay += dA_total

        xp = x_ptr + t[:, None] * stride_x_l + offs_p[None, :] * stride_x_p
        x = tl.load(xp, mask=in_seq[:, None] & (offs_p[None, :] < headdim), other=0.0)  # (T, BLOCK_P)
        bc_mask = in_seq[:, None] & (offs_n[None, :] < dstate)
        B = tl.load(B_ptr + t[:, None] * stride_B_l + offs_n[None, :] * stride_B_n, mask=bc_mask, other=0.0)

        if STORE_Y:
            C = tl.load(C_ptr + t[:, None] * stride_C_l + offs_n[None, :] * stride_C_n, mask=bc_mask, other=0.0)
            # Within the chunk: y_i = sum_{j <= i} C_i.B_j exp(cumsum_i - cumsum_j) dt_j x_j.
            scores = tl.dot(C, tl.trans(B), input_precision=DOT_PRECISION)  # (T, T)
            decay = tl.exp(tl.where(causal, dA_cumsum[:, None] - dA_cumsum[None, :], float("-inf")))
            scores = scores * decay * dt[None, :]
            y = tl.dot(scores.to(x.dtype), x, input_precision=DOT_PRECISION)  # (T, BLOCK_P)
            # The state entering the chunk, decayed to each position.
            from_state = tl.dot(C, tl.trans(state).to(C.dtype), input_precision=DOT_PRECISION)  # (T, BLOCK_P)
            y += from_state * tl.exp(dA_cumsum)[:, None]
            if HAS_D:
                y += D * x.to(tl.float32)
            yp = y_ptr + t[:, None] * stride_y_l + offs_p[None, :] * stride_y_p
            tl.store(yp, y.to(y_ptr.dtype.element_ty), mask=in_seq[:, None] & (offs_p[None, :] < headdim))

        # The state leaving the chunk.
        weight = tl.exp(dA_total - dA_cumsum) * dt  # (T,)
        x_weighted = (x.to(tl.float32) * weight[:, None]).to(x.dtype)
        state = state * tl.exp(dA_total) + tl.dot(tl.trans(x_weighted), B, input_precision=DOT_PRECISION)

    if not STORE_Y:
        index = (batch * nsegments + segment) * nheads + head
        tl.store(leaving_ptr + index * headdim * dstate + state_offsets, state, mask=state_mask)
        if pid_p == 0:
            tl.store(log_decay_ptr + index, log_decay)


def _check(x, dt, A, B, C, D, z, dt_bias, initial_states, return_final_states):
    if z is not None or initial_states is not None or return_final_states:
        raise ValueError("ssd_forward starts from a zero state, returns only y and does not gate it: pass z=None, "
                         "initial_states=None and return_final_states=False (mamba_ops sends those calls to mamba-ssm)")
    batch, seqlen, nheads, headdim = x.shape
    if dt.shape != (batch, seqlen, nheads) or A.shape != (nheads,):
        raise ValueError(f"dt must be {(batch, seqlen, nheads)} and A {(nheads,)}, got {tuple(dt.shape)} and "
                         f"{tuple(A.shape)}")
    if B.shape != C.shape or B.shape[:2] != (batch, seqlen) or nheads % B.shape[2]:
        raise ValueError(f"B and C must be (batch, seqlen, groups, state) with groups dividing {nheads} heads, got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    if D is not None and D.shape != (nheads,):
        raise ValueError(f"D must be one value per head, shape {(nheads,)}, got {tuple(D.shape)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"dt_bias must have shape {(nheads,)}, got {tuple(dt_bias.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or B.dtype != x.dtype or C.dtype != x.dtype:
        raise ValueError(f"x, B and C must share one floating dtype, got {x.dtype}, {B.dtype}, {C.dtype}")


def ssd_forward(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
    dt_limit=(0.0, float("inf")), return_final_states=False,
):
    """y = SSD(x, dt, A, B, C) + D x, as `mamba_chunk_scan_combined` computes it from a zero state, without gradient.

    x: (b, l, h, p), dt: (b, l, h), A: (h,), B and C: (b, l, g, n), D and dt_bias: (h,) -> y (b, l, h, p) in x's
    dtype. Inputs may be strided views (the mixer's slices of one projection). `chunk_size` is accepted for the
    common signature; the result does not depend on it, and this kernel walks the sequence in chunks of `CHUNK`."""
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states, return_final_states)
    batch, seqlen, nheads, headdim = x.shape
    block_p = max(16, triton.next_power_of_2(headdim))
    segments = _segments(batch, nheads, seqlen, x.device)
    # Too few walks and too short to cut into segments: split each head's channels over two programs instead. float32
    # (a test path) takes the smaller tiles too, which keep its doubled shared memory within bounds.
    if block_p > 32 and (x.dtype == torch.float32 or segments == 1 and batch * nheads < _multiprocessors(x.device)):
        block_p = 32
    return launch_ssd_forward(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, segments=segments, chunk=CHUNK,
                              block_p=block_p, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def launch_ssd_forward(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, segments, chunk, block_p, num_warps,
                       num_stages):
    """The kernel with explicit tile sizes and segment count (`ssd_forward` picks them; the benchmark sweeps them).

    With one segment, one pass. With several, the sequence is cut into `segments` pieces walked in parallel: a first
    pass walks each piece but the last from a zero state and keeps only the state leaving it (and its total decay); a
    second pass starts each piece from the state entering it, folded from the earlier pieces' leaving states, and
    writes y."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    segment_length = triton.cdiv(triton.cdiv(seqlen, segments), chunk) * chunk
    segments = triton.cdiv(seqlen, segment_length)
    y = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
    leaving = torch.empty(batch, segments, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    log_decay = torch.empty(batch, segments, nheads, device=x.device, dtype=torch.float32)

    def launch(store_y):
        # The state pass leaves out the last segment: no segment enters after it.
        grid = (batch * nheads, triton.cdiv(headdim, block_p), segments if store_y else segments - 1)
        _ssd_forward_kernel[grid](
            x, dt, dt_bias, A, B, C, D, y, leaving, log_decay,
            seqlen, segment_length, segments, nheads, nheads // ngroups, headdim, dstate, float(dt_limit[0]),
            float(dt_limit[1]), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(),
            HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
            HAS_DT_LIMIT=tuple(dt_limit) != (0.0, float("inf")), HAS_D=D is not None, STORE_Y=store_y,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", CHUNK=chunk, BLOCK_P=block_p,
            BLOCK_N=max(16, triton.next_power_of_2(dstate)), num_warps=num_warps, num_stages=num_stages,
        )

    if segments > 1:
        launch(store_y=False)
    launch(store_y=True)
    return y
