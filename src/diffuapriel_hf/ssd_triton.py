"""A single-pass SSD forward kernel (Triton) for inference: the state is carried across chunks in registers.

mamba-ssm's `mamba_chunk_scan_combined` runs the chunked SSD as five kernels: it writes every chunk's (P, N) state
to memory, passes the states along the sequence in another kernel and reads them back in a third. At 64 heads of 64
with state 128 and chunks of 256 those states weigh as much as x itself.

Here one program owns one (sequence, head, slice of the head's channels) and walks the sequence chunk by chunk,
keeping its slice of the state in float32 registers. Per chunk of T tokens:

    y     = ((C B^T) * decay * dt) x  +  exp(cumsum(dt A)) * (C state^T)  +  D x       # (T, P)
    state = exp(sum(dt A)) * state  +  (x * dt * decay_to_chunk_end)^T B              # (P, N)

so x, dt, B and C are read once and y written once; nothing else touches memory. The price is parallelism: there are
only batch x heads x channel slices programs, each sequential over the sequence (the next chunk's loads overlap the
current chunk's products). With at least one (sequence, head) walk per multiprocessor it beats mamba-ssm's kernels
(10-12% off a whole 1.3B denoising step at 16 x 1K to 4 x 16K tokens on an H200); with fewer, long walks (batch 1) it
is slower, and `single_pass_is_faster` sends those to mamba-ssm.

It computes the forward only (no gradient), with the signature of `mamba_chunk_scan_combined` for what the mixer
passes; `mamba_ops` sends everything else (training, initial or final states, a gate z) to mamba-ssm. The products
round their inputs to x's dtype and accumulate in float32, as mamba-ssm's kernels do; for float32 inputs they are
exact float32 products (no TF32).
"""

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
# Segments: enough parallel walks for this many per multiprocessor, but no segment shorter than this many tokens.
SEGMENT_WALKS_PER_MULTIPROCESSOR = 2
MIN_SEGMENT_LENGTH = 2048


def single_pass_is_faster(batch: int, nheads: int, device) -> bool:
    """Whether this kernel beats mamba-ssm's for these sizes: when there are at least as many (sequence, head) walks
    as the GPU has multiprocessors. With fewer (batch 1 at 64 heads), the GPU is underused and mamba-ssm's five
    parallel passes win. Measured on an H200 (132 multiprocessors) with whole diffuapriel-1.3b denoising steps replayed
    from CUDA graphs (benchmarks/results/ssd_dispatch.json): 99.9 vs 112.7 ms at 16 x 1K tokens, 102.3 vs 113.2 ms at
    4 x 4K, 402 vs 458 ms at 4 x 16K; level at 2 x 8K and 1 x 2K; slower at batch 1 (31.6 vs 30.1 ms at 4K, 59.8 vs
    56.2 ms at 8K)."""
    return batch * nheads >= torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _ssd_forward_kernel(
    x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, entering_ptr, leaving_ptr, log_decay_ptr,
    seqlen, segment_length, nheads, heads_per_group, headdim, dstate, dt_min, dt_max,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr, HAS_D: tl.constexpr,
    STORE_Y: tl.constexpr, HAS_ENTERING: tl.constexpr, STORE_LEAVING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (sequence and head, channel slice, segment) walks tokens [segment start, segment end).
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    segment = tl.program_id(2)
    nsegments = tl.num_programs(2)
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
    state_index = (batch * nsegments + segment) * nheads + head
    state_offsets = state_index * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :]
    state_mask = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    A = tl.load(A_ptr + head).to(tl.float32)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + head).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + head).to(tl.float32)
    causal = offs_t[:, None] >= offs_t[None, :]
    if HAS_ENTERING:
        state = tl.load(entering_ptr + state_offsets, mask=state_mask, other=0.0)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
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

    if STORE_LEAVING:
        tl.store(leaving_ptr + state_offsets, state, mask=state_mask)
        if pid_p == 0:
            tl.store(log_decay_ptr + state_index, log_decay)


def _check(x, dt, A, B, C, D, z, dt_bias, initial_states):
    if z is not None:
        raise ValueError("ssd_forward does not gate its output: pass z=None and gate afterwards")
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
    if initial_states is not None and initial_states.shape != (batch, nheads, headdim, B.shape[3]):
        raise ValueError(f"initial_states must be (batch, heads, headdim, state) = {(batch, nheads, headdim, B.shape[3])}, "
                         f"got {tuple(initial_states.shape)}")


def ssd_forward(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
    dt_limit=(0.0, float("inf")), return_final_states=False,
):
    """y = SSD(x, dt, A, B, C) + D x, as `mamba_chunk_scan_combined` computes it, without gradient.

    x: (b, l, h, p), dt: (b, l, h), A: (h,), B and C: (b, l, g, n), D and dt_bias: (h,), initial_states:
    (b, h, p, n) -> y (b, l, h, p) in x's dtype, and the final state (b, h, p, n) in float32 when asked. Inputs may be
    strided views (the mixer's slices of one projection). `chunk_size` is accepted for the common signature; the
    result does not depend on it, and this kernel walks the sequence in chunks of `CHUNK`."""
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states)
    batch, seqlen, nheads, headdim = x.shape
    block_p = max(16, triton.next_power_of_2(headdim))
    multiprocessors = torch.cuda.get_device_properties(x.device).multi_processor_count
    # Split the head's channels over two programs when one program per (sequence, head) would leave most of the
    # GPU's multiprocessors idle (batch 1: 64 heads on 132).
    if block_p > 32 and batch * nheads < multiprocessors:
        block_p = 32
    walks = batch * nheads * triton.cdiv(headdim, block_p)
    segments = max(1, min(triton.cdiv(SEGMENT_WALKS_PER_MULTIPROCESSOR * multiprocessors, walks),
                          seqlen // MIN_SEGMENT_LENGTH))
    return launch_ssd_forward(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_states, return_final_states,
                              segments=segments, chunk=CHUNK, block_p=block_p, num_warps=NUM_WARPS,
                              num_stages=NUM_STAGES)


def launch_ssd_forward(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_states, return_final_states,
                       segments, chunk, block_p, num_warps, num_stages):
    """The kernel with explicit tile sizes and segment count (`ssd_forward` picks them; the benchmark sweeps them).

    With one segment, one pass. With several, the sequence is cut into `segments` pieces walked in parallel: a first
    pass walks each piece from a zero state and keeps only the state leaving it (and its total decay); the states
    entering the pieces follow from those by a short recurrence over the pieces; a second pass walks each piece from
    its entering state and writes y."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    segment_length = triton.cdiv(triton.cdiv(seqlen, segments), chunk) * chunk
    segments = triton.cdiv(seqlen, segment_length)
    y = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
    states_shape = (batch, segments, nheads, headdim, dstate)
    leaving = torch.empty(states_shape, device=x.device, dtype=torch.float32)
    log_decay = torch.empty(batch, segments, nheads, device=x.device, dtype=torch.float32)
    grid = (batch * nheads, triton.cdiv(headdim, block_p), segments)

    def launch(store_y, entering, store_leaving):
        _ssd_forward_kernel[grid](
            x, dt, dt_bias, A, B, C, D, y, entering, leaving, log_decay,
            seqlen, segment_length, nheads, nheads // ngroups, headdim, dstate, float(dt_limit[0]),
            float(dt_limit[1]), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(),
            HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
            HAS_DT_LIMIT=tuple(dt_limit) != (0.0, float("inf")), HAS_D=D is not None, STORE_Y=store_y,
            HAS_ENTERING=entering is not None, STORE_LEAVING=store_leaving,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", CHUNK=chunk, BLOCK_P=block_p,
            BLOCK_N=max(16, triton.next_power_of_2(dstate)), num_warps=num_warps, num_stages=num_stages,
        )

    state = None if initial_states is None else initial_states.float()  # (b, h, p, n)
    entering = None
    if segments > 1:
        launch(store_y=False, entering=None, store_leaving=True)
        entering = torch.empty_like(leaving)
        state = torch.zeros_like(leaving[:, 0]) if state is None else state
        for segment in range(segments):
            entering[:, segment] = state
            state = state * torch.exp(log_decay[:, segment])[..., None, None] + leaving[:, segment]
    elif state is not None:
        entering = state.reshape(states_shape).contiguous()
    launch(store_y=True, entering=entering, store_leaving=return_final_states)
    if not return_final_states:
        return y
    return y, leaving[:, -1]
