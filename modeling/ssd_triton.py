"""A single-pass SSD forward kernel (Triton) for inference: the state is carried across chunks in registers.

mamba-ssm's `mamba_chunk_scan_combined` runs the chunked SSD as five kernels: it writes every chunk's (P, N) state
to memory, passes the states along the sequence in another kernel and reads them back in a third. At 64 heads of 64
with state 128 and chunks of 256 those states weigh as much as x itself.

Here one program owns one (sequence, head, slice of the head's channels) and walks the sequence chunk by chunk,
keeping its slice of the state in float32 registers. Per chunk of T tokens, channels by tokens:

    y^T   = x^T ((C B^T) * decay * dt)^T  +  (state C^T) * exp(cumsum(dt A))  +  D x^T    # (P, T)
    state = exp(sum(dt A)) * state  +  (x * dt * decay_to_chunk_end)^T B                  # (P, N)

so x, dt, B and C are read once and y written once. C B^T, the same for every head of a group, is computed once per
(chunk, group) by a small kernel before the walk. The price of the walk is parallelism: there are only batch x heads
x channel slices of them, each sequential over the sequence (the next chunk's loads overlap the current chunk's
products). With at least one (sequence, head) walk per multiprocessor it beats mamba-ssm's kernels. With fewer (one
sequence: 64 heads on 132 multiprocessors), a long sequence is cut into segments walked in parallel: a first kernel
walks each segment for its leaving state only, and the full walk starts each segment from its entering state, folded
from the earlier segments'; short ones go to mamba-ssm (`single_pass_is_faster`).

It computes the forward (no gradient) from a zero or a given initial state, and the state leaving the sequence on
request (what a block model's generation step continues from and hands on), with the signature of
`mamba_chunk_scan_combined` for what the mixer passes; `mamba_ops.kernel_ops` sends everything else (training, a gate
z, documents packed in a row) to mamba-ssm. The products round their inputs to x's dtype and accumulate in float32,
as mamba-ssm's kernels do; for float32 inputs they are exact float32 products (no TF32).
"""

import functools

import torch

try:  # a dependency of mamba-ssm: mamba_ops imports this module only where mamba-ssm imports
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("diffuapriel_hf.modeling.ssd_triton needs triton, which mamba-ssm installs") from error

from .cuda_device import on_device_of
from .kernel_policy import DISPATCH_THRESHOLDS

# Launch settings measured on an H200 (benchmarks/results/ssd_kernel.json). The register cap lets three programs share
# a multiprocessor (the walk would otherwise take about 200 registers a thread, leaving room for two).
CHUNK = 32
NUM_WARPS = 4
NUM_STAGES = 3
MAX_REGISTERS = 168
# Segments, for sequences with fewer (sequence, head) walks than multiprocessors: enough for this many walks per
# multiprocessor, none shorter than this many tokens, and at least this many; with fewer, mamba-ssm keeps the call
# (whole steps with two segments were not measured). Dispatch thresholds: in kernel_policy's table, with their sources.
SEGMENT_WALKS_PER_MULTIPROCESSOR = DISPATCH_THRESHOLDS["ssd_segment_walks_per_multiprocessor"].value
MIN_SEGMENT_LENGTH = DISPATCH_THRESHOLDS["ssd_min_segment_length"].value
MIN_SEGMENTS = DISPATCH_THRESHOLDS["ssd_min_segments"].value
SHORT_SEQUENCE = DISPATCH_THRESHOLDS["ssd_single_pass_short_sequence"].value


def single_pass_is_faster(batch: int, nheads: int, seqlen: int, device) -> bool:
    """Whether this kernel beats mamba-ssm's for these sizes: with at least as many (sequence, head) walks as the GPU
    has multiprocessors, with a sequence long enough to be cut into segments walked in parallel, or with one so short
    (a block model's generation step) that its walks are a few chunks and mamba-ssm's five launches cost more than
    they parallelise. Between those, short walks (batch 1 under 4K tokens at 64 heads) underuse the GPU and mamba-ssm's
    five parallel passes win.
    Measured on an H200 (132 multiprocessors) with whole diffuapriel-1.3b denoising steps replayed from CUDA graphs,
    ours vs mamba-ssm (benchmarks/results/ssd_dispatch.json): 10.4 vs 8.6 ms at 1 x 1K, 19.3 vs 14.5 at 1 x 2K
    (mamba-ssm kept); 27.0 vs 27.9 at 1 x 4K, 51.0 vs 54.8 at 1 x 8K, 96.9 vs 104.5 at 1 x 16K, 382.6 vs 428.0 at
    1 x 64K, 94.9 vs 106.1 at 16 x 1K, 99.0 vs 105.8 at 2 x 8K, 377.7 vs 433.0 at 4 x 16K."""
    return (seqlen <= SHORT_SEQUENCE or batch * nheads >= _multiprocessors(device)
            or _segments(batch, nheads, seqlen, device) > 1)


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
def _time_steps(dt_ptr, t, in_seq, stride_dt_l, dt_bias, dt_min, dt_max, HAS_DT_BIAS: tl.constexpr,
                DT_SOFTPLUS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr):
    # dt at tokens t as the SSD uses it: clamp(softplus(dt + dt_bias)) where asked, float32, zero past the end (no
    # decay, no input).
    dt = tl.load(dt_ptr + t * stride_dt_l, mask=in_seq, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += dt_bias
    if DT_SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    if HAS_DT_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    return tl.where(in_seq, dt, 0.0)


@triton.jit
def _chunk_inputs(x_ptr, dt_ptr, B_ptr, t, in_seq, offs_p, offs_n, A, dt_bias, dt_min, dt_max, headdim, dstate,
                  stride_x_l, stride_x_p, stride_dt_l, stride_B_l, stride_B_n,
                  HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr):
    # What the segment-states kernel and the walk both read at the tokens t of a chunk, the same way (the walk folds
    # the states kernel's results into its own): dt (T,), its running and total log decay, x (P, T) and B (T, N).
    dt = _time_steps(dt_ptr, t, in_seq, stride_dt_l, dt_bias, dt_min, dt_max, HAS_DT_BIAS, DT_SOFTPLUS, HAS_DT_LIMIT)
    dA_cumsum = tl.cumsum(dt * A, axis=0)
    dA_total = tl.sum(dt * A, axis=0)
    x = tl.load(x_ptr + offs_p[:, None] * stride_x_p + t[None, :] * stride_x_l,
                mask=(offs_p[:, None] < headdim) & in_seq[None, :], other=0.0)
    B = tl.load(B_ptr + t[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                mask=in_seq[:, None] & (offs_n[None, :] < dstate), other=0.0)
    return dt, dA_cumsum, dA_total, x, B


@triton.jit
def _next_state(state, x, B, dt, dA_cumsum, dA_total, DOT_PRECISION: tl.constexpr):
    # The state (P, N) leaving a chunk from the one entering it: decayed over the chunk, plus each token's input x
    # (P, T) weighted by dt and its decay to the chunk's end, times B (T, N).
    weight = tl.exp(dA_total - dA_cumsum) * dt  # (T,)
    x_weighted = (x.to(tl.float32) * weight[None, :]).to(x.dtype)
    return state * tl.exp(dA_total) + tl.dot(x_weighted, B, input_precision=DOT_PRECISION)


@triton.jit
def _chunk_products_kernel(
    B_ptr, C_ptr, cb_ptr, seqlen, nchunks, ngroups, dstate,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # C_i . B_j for the tokens i, j of one chunk of one (sequence, group): float32 (T, T) at cb[batch, chunk, group].
    # Every head of the group reads it in the walk, which would otherwise compute it again.
    chunk = tl.program_id(0)
    batch = tl.program_id(1) // ngroups
    group = tl.program_id(1) % ngroups
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, BLOCK_N)
    t = chunk * CHUNK + offs_t
    mask = (t[:, None] < seqlen) & (offs_n[None, :] < dstate)
    B_ptr += batch * stride_B_b + group * stride_B_g
    C_ptr += batch * stride_C_b + group * stride_C_g
    B = tl.load(B_ptr + t[:, None] * stride_B_l + offs_n[None, :] * stride_B_n, mask=mask, other=0.0)  # (T, N)
    C = tl.load(C_ptr + t[:, None] * stride_C_l + offs_n[None, :] * stride_C_n, mask=mask, other=0.0)  # (T, N)
    cb = tl.dot(C, tl.trans(B), input_precision=DOT_PRECISION)  # (T, T)
    cb_ptr += ((batch * nchunks + chunk) * ngroups + group) * CHUNK * CHUNK
    tl.store(cb_ptr + offs_t[:, None] * CHUNK + offs_t[None, :], cb)


@triton.jit
def _segment_states_kernel(
    x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, leaving_ptr, log_decay_ptr,
    seqlen, segment_length, nsegments, nheads, heads_per_group, headdim, dstate, dt_min, dt_max,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (sequence and head, channel slice, segment) walks its segment from a zero state and keeps only the state
    # leaving it, sum_t exp(log decay from t to the segment's end) dt_t x_t B_t^T (P, N), and the segment's total log
    # decay: the walk's state update without its outputs. (Weighting each token by its decay to the segment's end
    # instead, a matrix product with no rescaling between chunks after a first pass over dt, was slower on an H200:
    # 0.57 vs 0.40 ms at 64 heads x 64K tokens.)
    pid_bh = tl.program_id(0)
    batch = pid_bh // nheads
    head = pid_bh % nheads
    segment = tl.program_id(2)
    x_ptr += batch * stride_x_b + head * stride_x_h
    dt_ptr += batch * stride_dt_b + head * stride_dt_h
    B_ptr += batch * stride_B_b + (head // heads_per_group) * stride_B_g
    segment_start = segment * segment_length
    segment_end = tl.minimum(segment_start + segment_length, seqlen)
    offs_t = tl.arange(0, CHUNK)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    A = tl.load(A_ptr + head).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + head).to(tl.float32) if HAS_DT_BIAS else 0.0

    total = A * 0.0
    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for start in range(segment_start, segment_end, CHUNK):
        t = start + offs_t
        in_seq = t < segment_end
        dt, dA_cumsum, dA_total, x, B = _chunk_inputs(
            x_ptr, dt_ptr, B_ptr, t, in_seq, offs_p, offs_n, A, dt_bias, dt_min, dt_max, headdim, dstate, stride_x_l,
            stride_x_p, stride_dt_l, stride_B_l, stride_B_n, HAS_DT_BIAS, DT_SOFTPLUS, HAS_DT_LIMIT,
        )  # (T,), (T,), (), (P, T), (T, N)
        total += dA_total
        state = _next_state(state, x, B, dt, dA_cumsum, dA_total, DOT_PRECISION)

    # States: (batch, segments, heads, headdim, dstate) float32; log decays: (batch, segments, heads).
    index = (batch * nsegments + segment) * nheads + head
    tl.store(leaving_ptr + index * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :], state,
             mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate))
    if tl.program_id(1) == 0:
        tl.store(log_decay_ptr + index, total)


@triton.jit
def _ssd_forward_kernel(
    x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, cb_ptr, y_ptr, leaving_ptr, log_decay_ptr, initial_ptr,
    final_ptr, chunk_states_ptr, state_every, nstates,
    seqlen, segment_length, nsegments, nchunks, nheads, heads_per_group, headdim, dstate, dt_min, dt_max,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr, HAS_D: tl.constexpr,
    HAS_INITIAL: tl.constexpr, RETURN_FINAL: tl.constexpr, STORE_CHUNK_STATES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (sequence and head, channel slice, segment) starts from the state entering its segment, folded from the
    # sequence's initial state (or zeros) and the earlier segments' leaving states, walks tokens [segment start,
    # segment end) and writes y; the last segment's program also writes the state leaving the sequence. Everything is
    # computed transposed, channels by tokens: the state (P, N) is then the left operand of its product with C and
    # stays in registers, as the matrix units take a left operand from there (a right one comes from shared memory,
    # which the state would have to pass through every chunk). With STORE_CHUNK_STATES, the state entering every
    # `state_every` tokens is also written: mamba-ssm's chunk states, which its backward reads (segments start at such
    # a position).
    pid_bh = tl.program_id(0)
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
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    A = tl.load(A_ptr + head).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + head).to(tl.float32) if HAS_DT_BIAS else 0.0
    D = tl.load(D_ptr + head).to(tl.float32) if HAS_D else 0.0
    causal = offs_t[:, None] <= offs_t[None, :]  # causal[j, i]: token j of the chunk feeds token i
    # States (batch, heads, headdim, dstate) float32: this program's slice of its (sequence, head)'s.
    state_offsets = pid_bh * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :]
    state_mask = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    if HAS_INITIAL:
        state = tl.load(initial_ptr + state_offsets, mask=state_mask, other=0.0)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for earlier in range(0, segment):
        index = (batch * nsegments + earlier) * nheads + head
        state = state * tl.exp(tl.load(log_decay_ptr + index))
        state += tl.load(leaving_ptr + index * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :],
                         mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate), other=0.0)

    for start in range(segment_start, segment_end, CHUNK):
        t = start + offs_t
        in_seq = t < segment_end
        if STORE_CHUNK_STATES:
            if start % state_every == 0:  # chunk states: (batch, nstates, heads, headdim, dstate) float32
                index = (batch * nstates + start // state_every) * nheads + head
                tl.store(chunk_states_ptr + index * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :],
                         state, mask=state_mask)
        dt, dA_cumsum, dA_total, x, B = _chunk_inputs(
            x_ptr, dt_ptr, B_ptr, t, in_seq, offs_p, offs_n, A, dt_bias, dt_min, dt_max, headdim, dstate, stride_x_l,
            stride_x_p, stride_dt_l, stride_B_l, stride_B_n, HAS_DT_BIAS, DT_SOFTPLUS, HAS_DT_LIMIT,
        )  # (T,), (T,), (), (P, T), (T, N)
        C = tl.load(C_ptr + offs_n[:, None] * stride_C_n + t[None, :] * stride_C_l,
                    mask=(offs_n[:, None] < dstate) & in_seq[None, :], other=0.0)  # (N, T)

        # Within the chunk: y_i = sum_{j <= i} C_i.B_j exp(cumsum_i - cumsum_j) dt_j x_j, as scores[j, i].
        cb = cb_ptr + ((batch * nchunks + start // CHUNK) * (nheads // heads_per_group) + group) * CHUNK * CHUNK
        scores = tl.load(cb + offs_t[None, :] * CHUNK + offs_t[:, None])  # (T_j, T_i): C_i . B_j
        decay = tl.exp(tl.where(causal, dA_cumsum[None, :] - dA_cumsum[:, None], float("-inf")))
        scores = scores * decay * dt[:, None]
        y = tl.dot(x, scores.to(x.dtype), input_precision=DOT_PRECISION)  # (P, T)
        # The state entering the chunk, decayed to each position.
        from_state = tl.dot(state.to(x.dtype), C, input_precision=DOT_PRECISION)  # (P, T)
        y += from_state * tl.exp(dA_cumsum)[None, :]
        if HAS_D:
            y += D * x.to(tl.float32)
        tl.store(y_ptr + offs_p[:, None] * stride_y_p + t[None, :] * stride_y_l, y.to(y_ptr.dtype.element_ty),
                 mask=(offs_p[:, None] < headdim) & in_seq[None, :])

        state = _next_state(state, x, B, dt, dA_cumsum, dA_total, DOT_PRECISION)
    if RETURN_FINAL:
        if segment == nsegments - 1:
            tl.store(final_ptr + state_offsets, state, mask=state_mask)


def _check(x, dt, A, B, C, D, z, dt_bias, initial_states):
    if z is not None:
        raise ValueError("ssd_forward does not gate its output: pass z=None (mamba_ops sends those calls to mamba-ssm)")
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
    state_shape = (batch, nheads, headdim, B.shape[3])
    if initial_states is not None and (initial_states.shape != state_shape or not initial_states.is_floating_point()):
        raise ValueError(f"initial_states must be a floating tensor of shape (batch, heads, headdim, state) = "
                         f"{state_shape}, got {initial_states.dtype} {tuple(initial_states.shape)}")


def ssd_forward(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
    dt_limit=(0.0, float("inf")), return_final_states=False, states_dt_by_head=True, return_chunk_states=False,
):
    """y = SSD(x, dt, A, B, C) + D x, as `mamba_chunk_scan_combined` computes it, without gradient.

    x: (b, l, h, p), dt: (b, l, h), A: (h,), B and C: (b, l, g, n), D and dt_bias: (h,) -> y (b, l, h, p) in x's
    dtype; with `return_final_states`, (y, the state leaving the sequence (b, h, p, n) float32). `initial_states`
    (b, h, p, n): the state entering the sequence (default zeros). Inputs may be strided views (the mixer's slices
    of one projection). The result does not depend on `chunk_size`: this kernel walks the sequence in chunks of
    `CHUNK`. With `return_chunk_states`, it also returns the state entering every chunk of `chunk_size` tokens (a
    multiple of `CHUNK`), (b, ceil(l / chunk_size), h, p, n) float32, last: what mamba-ssm's forward hands its backward
    as `states`. `states_dt_by_head`: see `launch_ssd_forward`."""
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states)
    if return_chunk_states and chunk_size % CHUNK:
        raise ValueError(f"return_chunk_states needs chunk_size to be a multiple of {CHUNK}, got {chunk_size}")
    batch, seqlen, nheads, headdim = x.shape
    block_p = max(16, triton.next_power_of_2(headdim))
    segments = _segments(batch, nheads, seqlen, x.device)
    # Too few walks and too short to cut into segments: split each head's channels over two programs instead. float32
    # (a test path) takes the smaller tiles too, which keep its doubled shared memory within bounds.
    if block_p > 32 and (x.dtype == torch.float32 or segments == 1 and batch * nheads < _multiprocessors(x.device)):
        block_p = 32
    return launch_ssd_forward(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, segments=segments, chunk=CHUNK,
                              block_p=block_p, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                              max_registers=MAX_REGISTERS, states_dt_by_head=states_dt_by_head,
                              initial_states=initial_states, return_final_states=return_final_states,
                              chunk_states_every=chunk_size if return_chunk_states else None)


def time_steps_by_head(dt: torch.Tensor) -> torch.Tensor:
    """dt (b, l, h) as float32 with each head's time steps in one contiguous row: a (b, l, h) view of a (b, h, l)
    tensor, one small copy. The segment-states kernel reads them so: its pipeline then fetches a chunk's time steps
    ahead of use, where Triton leaves loads of fewer than 4 bytes a thread out of the pipeline and the mixer's dt (a
    bfloat16 column of in_proj's output, a row apart per token) kept each chunk waiting on memory. The walk reads dt
    as passed: pipelined, its loop needs more registers and ran slower (benchmarks/results/ssd_time_steps.json)."""
    return dt.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format).transpose(1, 2)


def launch_ssd_forward(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, segments, chunk, block_p, num_warps,
                       num_stages, max_registers=None, states_dt_by_head=True, initial_states=None,
                       return_final_states=False, chunk_states_every=None):
    """The kernels with explicit tile sizes, segment count and register cap (`ssd_forward` picks them; the benchmark
    sweeps them): C B^T per chunk and group; with several segments, the state leaving each segment but the last (and
    its total log decay); then the walk of every segment, from the state entering it, writing y (and the state
    leaving the last segment; with `chunk_states_every`, a multiple of `chunk`, the state entering every that many
    tokens, returned last). The segment-states kernel reads `time_steps_by_head(dt)`, or with
    `states_dt_by_head=False` dt as passed (the same result; slower from a column of in_proj's output:
    benchmarks/results/ssd_time_steps.json)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    state_every = chunk if chunk_states_every is None else chunk_states_every
    if state_every % chunk:
        raise ValueError(f"chunk_states_every must be a multiple of the chunk {chunk}, got {chunk_states_every}")
    # Segments start where a chunk state is stored, so that each program stores those of its own segment.
    segment_length = triton.cdiv(triton.cdiv(seqlen, segments), state_every) * state_every
    segments = triton.cdiv(seqlen, segment_length)
    nchunks = triton.cdiv(seqlen, chunk)
    block_n = max(16, triton.next_power_of_2(dstate))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    y = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
    leaving = torch.empty(batch, segments, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    log_decay = torch.empty(batch, segments, nheads, device=x.device, dtype=torch.float32)
    chunk_products = torch.empty(batch, nchunks, ngroups, chunk, chunk, device=x.device, dtype=torch.float32)
    initial = None if initial_states is None else initial_states.to(torch.float32).contiguous()
    final = torch.empty(batch, nheads, headdim, dstate, device=x.device, dtype=torch.float32) if (
        return_final_states) else None
    nstates = triton.cdiv(seqlen, state_every)
    chunk_states = None if chunk_states_every is None else torch.empty(
        batch, nstates, nheads, headdim, dstate, device=x.device, dtype=torch.float32)

    def common_args(dt):  # what the segment-states kernel and the walk both take, each with its own layout of dt
        return float(dt_limit[0]), float(dt_limit[1]), *x.stride(), *dt.stride(), *B.stride()

    common_flags = dict(HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
                    HAS_DT_LIMIT=tuple(dt_limit) != (0.0, float("inf")), DOT_PRECISION=precision, CHUNK=chunk,
                    BLOCK_P=block_p, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, maxnreg=max_registers)
    grid = (batch * nheads, triton.cdiv(headdim, block_p), segments)
    with on_device_of(x):
        _chunk_products_kernel[(nchunks, batch * ngroups)](
            B, C, chunk_products, seqlen, nchunks, ngroups, dstate, *B.stride(), *C.stride(),
            DOT_PRECISION=precision, CHUNK=chunk, BLOCK_N=block_n, num_warps=4,
        )
        if segments > 1:  # the last segment's leaving state: nothing enters after it
            states_dt = time_steps_by_head(dt) if states_dt_by_head else dt
            _segment_states_kernel[grid[:2] + (segments - 1,)](
                x, states_dt, dt_bias, A, B, leaving, log_decay, seqlen, segment_length, segments, nheads,
                nheads // ngroups, headdim, dstate, *common_args(states_dt), **common_flags,
            )
        _ssd_forward_kernel[grid](
            x, dt, dt_bias, A, B, C, D, chunk_products, y, leaving, log_decay, initial, final, chunk_states,
            state_every, nstates, seqlen, segment_length, segments, nchunks, nheads, nheads // ngroups, headdim,
            dstate, *common_args(dt), *C.stride(), *y.stride(),
            HAS_D=D is not None, HAS_INITIAL=initial is not None, RETURN_FINAL=return_final_states,
            STORE_CHUNK_STATES=chunk_states is not None, **common_flags,
        )
    outputs = (y,) + ((final,) if return_final_states else ()) + ((chunk_states,) if chunk_states is not None else ())
    return outputs[0] if len(outputs) == 1 else outputs


__all__ = ["launch_ssd_forward", "single_pass_is_faster", "ssd_forward", "time_steps_by_head"]
