"""The SSD backward's walk back along the sequence (Triton): the gradient of the state between chunks.

The SSD's output in chunk c reads the state entering it, s_c, through C_t exp(dA_cumsum_t) s_c, and the states pass
from chunk to chunk as s_{c+1} = exp(dA_c) s_c + local_c (dA_c the chunk's total log decay, local_c the state its own
inputs leave). So, walking from the last chunk back,

    g_{c+1} = dL/ds_{c+1}                                    # what chunk c's local state gets: dstates[c]
    dL/ddA_c = exp(dA_c) <s_c, g_{c+1}>                       # (ddA_chunk[c])
    g_c = exp(dA_c) g_{c+1} + sum_t in c (dy_t exp(dA_cumsum_t))^T C_t    # (P, N)

mamba-ssm's backward runs this as two kernels: `_chunk_scan_bwd_dstates` writes every chunk's own term (the sum over
its tokens) as a float32 (P, N) state per head, and `_state_passing_bwd` reads those back and walks them. At 64 heads
of 64 with state 128 and chunks of 256, those float32 states weigh twice as much as dy. Here one program owns one
(sequence, head, tile of the state) and walks the chunks from last to first, keeping its tile of g in float32
registers and computing each chunk's own term as it reaches it (one product over the chunk's tokens), so that only
dstates (in the inputs' dtype, as mamba-ssm writes them) and the decays' gradient are written.

It computes what those two kernels compute for a pass with no initial or final state and no documents packed in a
row (the training pass's, `training_mixer`): dy scaled by exp(dA_cumsum) is rounded to dy's dtype before its product
with C, which accumulates in float32, as in mamba-ssm's kernel.

The gradient of the chunks' inputs (`chunk_inputs_backward`, in place of mamba-ssm's
`_chunk_scan_chunk_state_bwd_dx`): x_s enters its chunk's outputs through dt_s CB[t, s] exp(a_t - a_s) for t >= s
in the chunk (a = dA_cumsum, CB[t, s] = C_t . B_s) and the state leaving it through dt_s exp(a_last - a_s) B_s, so

    bracket[s, p] = sum_{t>=s} CB[t, s] exp(a_t - a_s) dy[t, p] + exp(a_last - a_s) sum_n B[s, n] dstates[p, n]
    dx[s, p] = dt_s bracket[s, p] + D dy[s, p];   ddt[s] = sum_p x[s, p] bracket[s, p];   dD = sum dy x

mamba-ssm's kernel adds its programs' parts of ddt (a program may own part of a head's channels) and of dD with
atomics, into buffers that its autotuner's hook zeroes before every call. Here one program owns a tile of a chunk's
positions for a whole head of up to 64 channels, so it writes ddt once (the parts of wider heads' tiles are summed
after), and dD as one partial per program, summed after. (Looping over a wider head's tiles inside the program
instead made Triton 3.9's code for an H100 spill registers: 2.5 KB of stack a thread.) The roundings are
mamba-ssm's: CB exp(a_t - a_s) rounded to dy's dtype and dstates to B's before their products, which accumulate in
float32, as every sum does; dx is written in dx's dtype.

The products at a chunk's pairs of positions (`chunk_pairs_backward`, in place of mamba-ssm's `_chunk_scan_bwd_dcb`
and `_chunk_scan_bwd_ddAcs_stable`, which each form the same product): with pairs[t, s] = (dy_t . x_s) dt_s
exp(min(a_t - a_s, 0)) for s <= t in a chunk, per head,

    dCB[t, s] = sum over the group's heads of pairs[t, s]          # the gradient of CB[t, s] = C_t . B_s
    ddA[j] = sum over s < j <= t of pairs[t, s] CB[t, s]          # of the increment dt_j A inside a_t - a_s

ddA is taken as mamba-ssm's stable kernel takes it, with no difference of running sums: a row's running sum over s,
summed over the rows t >= j. Here one program owns a tile of a chunk's positions t against all its positions s, and
walks its group's heads, one product each, summing dCB in float32 registers and writing that head's ddA, so that x
and dy are read once for both (x once per row tile, the tiles of a chunk side by side) and CB once per program.
"""

import torch
import torch.nn.functional as F

try:  # a dependency of mamba-ssm: training_mixer imports this module only where mamba-ssm imports
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("diffuapriel_hf.modeling.ssd_backward_triton needs triton, which mamba-ssm installs") from error

from .cuda_device import on_device_of

# The tile of the state each program owns, the tokens per product and the launch, by how many (sequence, head) walks
# there are. Swept on an H100 at 16K tokens a step (64 heads of 64, state 128): with 128 walks or more (2 x 8K and
# shorter), a 1.3B head's whole state in one program (tiles of 64 x 128), 64 tokens a product, 3 pipeline stages:
# 0.20-0.32 ms against mamba-ssm's two kernels' 0.29-0.42 (results/ssd_backward_walk.json, at 77ec6b7; the 24
# settings of results/ssd_backward_walk_sweep.json chose it). With 64 (1 x 16K), where those tiles take 0.46-0.58 ms,
# four programs a walk (tiles of 64 x 32) with each chunk's products unrolled so that the walk itself is pipelined:
# 0.328 ms against 0.38-0.47 for the same tiles in a loop and mamba-ssm's 0.324 (results/ssd_backward_walk.json; the
# four fastest of 16 settings there were unrolled). Timings at these sizes move by up to a fifth between runs.
WALKS_FOR_WHOLE_STATE_TILES = 128
LAUNCH_MANY_WALKS = dict(block_p=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
LAUNCH_FEW_WALKS = dict(block_p=64, block_n=32, block_k=64, num_warps=4, num_stages=2, unroll_chunk=True)


def launch_settings(batch: int, heads: int) -> dict:
    """The launch settings for batch x heads walks (see LAUNCH_MANY_WALKS)."""
    return LAUNCH_MANY_WALKS if batch * heads >= WALKS_FOR_WHOLE_STATE_TILES else LAUNCH_FEW_WALKS


def entering_states_backward_reference(C, dA_cumsum, dy, chunk_states, dtype):
    """`entering_states_backward` in PyTorch (same arguments, same results), one chunk at a time."""
    _check(C, dA_cumsum, dy, chunk_states)
    batch, seqlen, heads, _ = dy.shape
    chunks, chunk = dA_cumsum.shape[2:]
    pad = chunks * chunk - seqlen
    C = F.pad(C, (0, 0, 0, 0, 0, pad)).unflatten(1, (chunks, chunk))  # (b, c, k, g, n)
    C = C.repeat_interleave(heads // C.shape[3], dim=3).float()  # (b, c, k, h, n)
    dy_scaled = F.pad(dy, (0, 0, 0, 0, 0, pad)).unflatten(1, (chunks, chunk)).float()
    dy_scaled = (dy_scaled * torch.exp(dA_cumsum.float()).permute(0, 2, 3, 1)[..., None]).to(dy.dtype)
    own = torch.einsum("bckhp,bckhn->bchpn", dy_scaled.float(), C)  # each chunk's outputs' own term
    decay = torch.exp(dA_cumsum[..., -1].float())  # (b, h, c)
    dstates = torch.zeros_like(own)
    ddA_chunk = torch.zeros(batch, heads, chunks, device=dy.device, dtype=torch.float32)
    gradient = torch.zeros_like(own[:, 0])  # (b, h, p, n): of the state after the last chunk (no final state)
    for c in range(chunks - 1, 0, -1):
        dstates[:, c] = gradient
        ddA_chunk[:, :, c] = (chunk_states[:, c].float() * gradient).sum(dim=(-1, -2)) * decay[:, :, c]
        gradient = decay[:, :, c, None, None] * gradient + own[:, c]
    dstates[:, 0] = gradient
    return dstates.to(dtype), ddA_chunk


@triton.jit
def _own_term_part(dy_ptr, C_ptr, dA_cumsum_ptr, start, k, offs_p, offs_n, offs_k, seqlen, headdim, dstate,
                   stride_dy_l, stride_dy_p, stride_C_l, stride_C_n, stride_dA_k, DOT_PRECISION: tl.constexpr,
                   CHUNK: tl.constexpr):
    """The part of a chunk's own term from its tokens k to k + BLOCK_K: (dy exp(dA_cumsum))^T C, (P, N) float32."""
    t = start + k + offs_k
    in_chunk = (k + offs_k < CHUNK) & (t < seqlen)
    dy = tl.load(dy_ptr + t[None, :] * stride_dy_l + offs_p[:, None] * stride_dy_p,
                 mask=in_chunk[None, :] & (offs_p[:, None] < headdim), other=0.0)  # (P, K)
    dA = tl.load(dA_cumsum_ptr + (k + offs_k) * stride_dA_k, mask=in_chunk, other=0.0)
    dy = (dy.to(tl.float32) * tl.exp(dA)[None, :]).to(dy_ptr.dtype.element_ty)
    C = tl.load(C_ptr + t[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
                mask=in_chunk[:, None] & (offs_n[None, :] < dstate), other=0.0)  # (K, N)
    return tl.dot(dy, C.to(dy.dtype), input_precision=DOT_PRECISION)


@triton.jit
def _entering_states_backward_kernel(
    dy_ptr, C_ptr, dA_cumsum_ptr, states_ptr, dstates_ptr, ddA_ptr,
    seqlen, nchunks, headdim, dstate, heads_per_group,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_dA_b, stride_dA_h, stride_dA_c, stride_dA_k,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p, stride_s_n,
    stride_ds_b, stride_ds_c, stride_ds_h, stride_ds_p, stride_ds_n,
    stride_ddA_b, stride_ddA_h, stride_ddA_c, stride_ddA_tile,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, UNROLL_CHUNK: tl.constexpr,
):
    tile, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tiles_n = tl.cdiv(dstate, BLOCK_N)
    offs_p = (tile // tiles_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_tile = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    dy_ptr += b * stride_dy_b + h * stride_dy_h
    C_ptr += b * stride_C_b + (h // heads_per_group) * stride_C_g
    dA_cumsum_ptr += b * stride_dA_b + h * stride_dA_h
    states_tile = (states_ptr + b * stride_s_b + h * stride_s_h + offs_p[:, None] * stride_s_p
                   + offs_n[None, :] * stride_s_n)
    dstates_tile = (dstates_ptr + b * stride_ds_b + h * stride_ds_h + offs_p[:, None] * stride_ds_p
                    + offs_n[None, :] * stride_ds_n)
    ddA_ptr += b * stride_ddA_b + h * stride_ddA_h + tile * stride_ddA_tile

    gradient = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)  # of the state after the last chunk: none given
    tl.store(dstates_tile + (nchunks - 1) * stride_ds_c, gradient.to(dstates_ptr.dtype.element_ty), mask=in_tile)
    for step in range(nchunks - 1):  # chunks nchunks - 1 down to 1
        c = nchunks - 1 - step
        decay = tl.exp(tl.load(dA_cumsum_ptr + c * stride_dA_c + (CHUNK - 1) * stride_dA_k))
        entering = tl.load(states_tile + c * stride_s_c, mask=in_tile, other=0.0)
        tl.store(ddA_ptr + c * stride_ddA_c, tl.sum(entering * gradient) * decay)
        own = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        start = c * CHUNK
        if UNROLL_CHUNK:  # the chunk's products written out, so that the walk is the loop the compiler pipelines
            for k in tl.static_range(0, CHUNK, BLOCK_K):
                own += _own_term_part(dy_ptr, C_ptr, dA_cumsum_ptr + c * stride_dA_c, start, k, offs_p, offs_n,
                                      offs_k, seqlen, headdim, dstate, stride_dy_l, stride_dy_p, stride_C_l,
                                      stride_C_n, stride_dA_k, DOT_PRECISION, CHUNK)
        else:
            for k in range(0, tl.minimum(CHUNK, seqlen - start), BLOCK_K):
                own += _own_term_part(dy_ptr, C_ptr, dA_cumsum_ptr + c * stride_dA_c, start, k, offs_p, offs_n,
                                      offs_k, seqlen, headdim, dstate, stride_dy_l, stride_dy_p, stride_C_l,
                                      stride_C_n, stride_dA_k, DOT_PRECISION, CHUNK)
        gradient = decay * gradient + own
        tl.store(dstates_tile + (c - 1) * stride_ds_c, gradient.to(dstates_ptr.dtype.element_ty), mask=in_tile)
    tl.store(ddA_ptr, 0.0)  # the first chunk's decay reaches no state: nothing enters the sequence


def entering_states_backward(C, dA_cumsum, dy, chunk_states, dtype):
    """The gradient of the state between chunks, walked back from the last chunk, for an SSD pass with no initial or
    final state and no documents: C (b, l, g, n), dA_cumsum (b, h, c, k) float32 (mamba-ssm's chunk cumsum, chunks
    of k tokens), dy (b, l, h, p), chunk_states (b, c, h, p, n) float32, the state entering each chunk (the first
    zero). Returns dstates (b, c, h, p, n) in `dtype`, the gradient of the state each chunk's own inputs leave (that
    of the state entering the next chunk; zero for the last), as `_state_passing_bwd` gives it to mamba-ssm's
    `_chunk_scan_chunk_state_bwd_dx` and `_chunk_state_bwd_db`; and ddA_chunk (b, h, c) float32, the gradient of
    each chunk's total log decay through the passing (zero for the first)."""
    _check(C, dA_cumsum, dy, chunk_states)
    return launch_entering_states_backward(C, dA_cumsum, dy, chunk_states, dtype,
                                           **launch_settings(dy.shape[0], dy.shape[2]))


def launch_entering_states_backward(C, dA_cumsum, dy, chunk_states, dtype, block_p, block_n, block_k, num_warps,
                                    num_stages, unroll_chunk=False):
    """The kernel with explicit tiles and launch (`entering_states_backward` checks the inputs and picks them):
    one program per (tile of block_p x block_n of the state, sequence, head). With `unroll_chunk`, each chunk's
    products are unrolled (chunk / block_k of them), which leaves the walk over the chunks as the loop that the
    compiler pipelines (num_stages), loading the next chunk's tokens while this one's are multiplied."""
    batch, seqlen, heads, headdim = dy.shape
    chunks, chunk = dA_cumsum.shape[2:]
    dstate = C.shape[3]
    tiles = triton.cdiv(headdim, block_p) * triton.cdiv(dstate, block_n)
    dstates = torch.empty(chunk_states.shape, device=dy.device, dtype=dtype)
    ddA_tiles = torch.empty(batch, heads, chunks, tiles, device=dy.device, dtype=torch.float32)
    with on_device_of(dy):
        _entering_states_backward_kernel[(tiles, batch, heads)](
            dy, C, dA_cumsum, chunk_states, dstates, ddA_tiles, seqlen, chunks, headdim, dstate,
            heads // C.shape[2], *dy.stride(), *C.stride(), *dA_cumsum.stride(), *chunk_states.stride(),
            *dstates.stride(), *ddA_tiles.stride(),
            DOT_PRECISION="ieee" if dy.dtype == torch.float32 else "tf32", CHUNK=chunk, BLOCK_P=block_p,
            BLOCK_N=block_n, BLOCK_K=block_k, UNROLL_CHUNK=unroll_chunk, num_warps=num_warps, num_stages=num_stages,
        )
    return dstates, ddA_tiles.sum(dim=-1)


def _check(C, dA_cumsum, dy, chunk_states) -> None:
    batch, seqlen, heads, headdim = dy.shape
    chunks, chunk = dA_cumsum.shape[2:]
    if C.dim() != 4 or C.shape[:2] != (batch, seqlen) or heads % C.shape[2]:
        raise ValueError(f"C must be (batch, length, groups, state) with groups dividing dy's {heads} heads, got "
                         f"{tuple(C.shape)} for dy {tuple(dy.shape)}")
    if dA_cumsum.shape[:2] != (batch, heads) or chunks != triton.cdiv(seqlen, chunk):
        raise ValueError(f"dA_cumsum must be (batch, heads, chunks, chunk) covering {seqlen} positions, got "
                         f"{tuple(dA_cumsum.shape)}")
    if chunk_states.shape != (batch, chunks, heads, headdim, C.shape[3]):
        raise ValueError(f"chunk_states must be {(batch, chunks, heads, headdim, C.shape[3])}, got "
                         f"{tuple(chunk_states.shape)}")
    if dA_cumsum.dtype != torch.float32 or chunk_states.dtype != torch.float32:
        raise TypeError(f"dA_cumsum and chunk_states must be float32, got {dA_cumsum.dtype} and {chunk_states.dtype}")


# The tiles and launch of `chunk_inputs_backward`: a 1.3B head's 64 channels in one tile (so that ddt needs no sum
# across programs), 64 of a chunk's positions a program (two programs per chunk of 128), 64 positions t per product
# over the chunk, the state of 128 in one product, 4 warps, 2 stages: the fastest of 16 settings summed over 16 x 1K,
# 4 x 4K, 2 x 8K and 1 x 16K, 0.48-0.56 ms against mamba-ssm's 0.63-0.79 (H200, results/ssd_backward_dx.json).
LAUNCH_CHUNK_INPUTS = dict(block_m=64, block_p=64, block_k=64, block_n=128, num_warps=4, num_stages=2)


def chunk_inputs_backward_reference(x, dt_chunks, dA_cumsum, B, CB, dy, dstates, D=None, dx=None):
    """`chunk_inputs_backward` in PyTorch (same arguments, same results, the same roundings)."""
    _check_chunk_inputs(x, dt_chunks, dA_cumsum, B, CB, dy, dstates, D, dx)
    batch, seqlen, heads, _ = x.shape
    chunks, chunk = dt_chunks.shape[2:]
    per_group = heads // B.shape[2]
    chunked = lambda t: _in_chunks(t, chunk)  # noqa: E731
    a = dA_cumsum.float()  # (b, h, c, k)
    causal = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=x.device))  # [t, s]: t >= s
    decay = torch.exp(torch.clamp(a[..., :, None] - a[..., None, :], max=0))  # (b, h, c, t, s)
    CB_heads = CB.float().repeat_interleave(per_group, dim=2).transpose(1, 2)  # (b, h, c, t, s)
    scores = (CB_heads * decay).masked_fill(~causal, 0).to(dy.dtype).float()
    within = torch.einsum("bhcts,bcthp->bcshp", scores, chunked(dy).float())
    B_heads = chunked(B).repeat_interleave(per_group, dim=3).float()  # (b, c, s, h, n)
    from_state = torch.einsum("bcshn,bchpn->bcshp", B_heads, dstates.to(B.dtype).float())
    to_end = torch.exp(torch.clamp(a[..., -1:] - a, max=0)).permute(0, 2, 3, 1)[..., None]  # (b, c, s, h, 1)
    bracket = from_state * to_end + within  # (b, c, s, h, p)
    x_chunks = chunked(x).float()
    ddt = torch.einsum("bcshp,bcshp->bhcs", bracket, x_chunks)
    grad = (bracket * dt_chunks.float().permute(0, 2, 3, 1)[..., None]).flatten(1, 2)[:, :seqlen]  # (b, l, h, p)
    dD = None
    if D is not None:
        grad = grad + dy.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
        dD = (dy.float() * x.float()).sum(dim=(0, 1))  # (h, p)
        dD = (dD.sum(dim=-1) if D.dim() == 1 else dD).to(D.dtype)
    if dx is None:
        dx = torch.empty_like(x)
    dx.copy_(grad)
    return dx, ddt, dD


@triton.jit
def _chunk_inputs_backward_kernel(
    x_ptr, dt_ptr, dA_cumsum_ptr, B_ptr, CB_ptr, dy_ptr, dstates_ptr, D_ptr, dx_ptr, ddt_ptr, dD_ptr,
    seqlen, nchunks, headdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_k,
    stride_dA_b, stride_dA_h, stride_dA_c, stride_dA_k,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_CB_b, stride_CB_c, stride_CB_g, stride_CB_t, stride_CB_s,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_ds_b, stride_ds_c, stride_ds_h, stride_ds_p, stride_ds_n,
    stride_D_h, stride_D_p,
    stride_dx_b, stride_dx_l, stride_dx_h, stride_dx_p,
    stride_ddt_tile, stride_ddt_b, stride_ddt_h, stride_ddt_c, stride_ddt_k,
    stride_dD_b, stride_dD_c, stride_dD_m, stride_dD_h, stride_dD_p,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The heads of one chunk run side by side: they read the same CB (its group's) and neighbouring columns of x, dy.
    tile, h, bc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tiles_p = tl.cdiv(headdim, BLOCK_P)
    m_tile, p_tile = tile // tiles_p, tile % tiles_p
    b, c = bc // nchunks, bc % nchunks
    start = c * CHUNK
    limit = tl.minimum(CHUNK, seqlen - start)  # the chunk's positions inside the sequence
    g = h // heads_per_group
    x_ptr += b * stride_x_b + start * stride_x_l + h * stride_x_h
    dy_ptr += b * stride_dy_b + start * stride_dy_l + h * stride_dy_h
    dx_ptr += b * stride_dx_b + start * stride_dx_l + h * stride_dx_h
    B_ptr += b * stride_B_b + start * stride_B_l + g * stride_B_g
    CB_ptr += b * stride_CB_b + c * stride_CB_c + g * stride_CB_g
    dt_ptr += b * stride_dt_b + h * stride_dt_h + c * stride_dt_c
    dA_cumsum_ptr += b * stride_dA_b + h * stride_dA_h + c * stride_dA_c
    dstates_ptr += b * stride_ds_b + c * stride_ds_c + h * stride_ds_h

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # the positions s this program owns
    offs_p = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    rows, cols = offs_m < limit, offs_p < headdim
    a_m = tl.load(dA_cumsum_ptr + offs_m * stride_dA_k, mask=rows, other=0.0)
    a_last = tl.load(dA_cumsum_ptr + (CHUNK - 1) * stride_dA_k)  # constant past the sequence's end: its dt is 0

    bracket = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for n in range(0, dstate, BLOCK_N):  # through the state leaving the chunk
        B_tile = tl.load(B_ptr + offs_m[:, None] * stride_B_l + (n + offs_n)[None, :] * stride_B_n,
                         mask=rows[:, None] & (n + offs_n < dstate)[None, :], other=0.0)  # (M, N)
        dstates = tl.load(dstates_ptr + (n + offs_n)[:, None] * stride_ds_n + offs_p[None, :] * stride_ds_p,
                          mask=(n + offs_n < dstate)[:, None] & cols[None, :], other=0.0)  # (N, P)
        bracket += tl.dot(B_tile, dstates.to(B_tile.dtype), input_precision=DOT_PRECISION)
    bracket *= tl.exp(tl.minimum(a_last - a_m, 0.0))[:, None]
    for k in range(m_tile * BLOCK_M, limit, BLOCK_K):  # through the chunk's outputs at t >= s
        t = k + offs_k
        inside = t < limit
        CB = tl.load(CB_ptr + t[None, :] * stride_CB_t + offs_m[:, None] * stride_CB_s,
                     mask=inside[None, :] & (offs_m < CHUNK)[:, None], other=0.0)  # (M, K): CB[t, s]
        a_k = tl.load(dA_cumsum_ptr + t * stride_dA_k, mask=inside, other=0.0)
        scores = CB * tl.exp(tl.minimum(a_k[None, :] - a_m[:, None], 0.0))
        scores = tl.where((t[None, :] >= offs_m[:, None]) & inside[None, :], scores, 0.0)
        dy = tl.load(dy_ptr + t[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p,
                     mask=inside[:, None] & cols[None, :], other=0.0)  # (K, P)
        bracket += tl.dot(scores.to(dy.dtype), dy, input_precision=DOT_PRECISION)

    tile_mask = rows[:, None] & cols[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p, mask=tile_mask,
                other=0.0).to(tl.float32)
    # This tile's channels' part of ddt (the whole of it for a head of up to BLOCK_P channels), zero past the
    # sequence's end (x is), as mamba-ssm leaves it.
    tl.store(ddt_ptr + p_tile * stride_ddt_tile + b * stride_ddt_b + h * stride_ddt_h + c * stride_ddt_c
             + offs_m * stride_ddt_k, tl.sum(bracket * x, axis=1), mask=offs_m < CHUNK)
    dt_m = tl.load(dt_ptr + offs_m * stride_dt_k, mask=rows, other=0.0)
    dx = bracket * dt_m[:, None]
    if HAS_D:
        dy_own = tl.load(dy_ptr + offs_m[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p, mask=tile_mask,
                         other=0.0).to(tl.float32)  # (M, P): the outputs at the positions s themselves
        dD_ptr += b * stride_dD_b + c * stride_dD_c + m_tile * stride_dD_m + h * stride_dD_h
        if D_HAS_HDIM:
            D = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=cols, other=0.0).to(tl.float32)
            dx += dy_own * D[None, :]
            tl.store(dD_ptr + offs_p * stride_dD_p, tl.sum(dy_own * x, axis=0), mask=cols)
        else:
            dx += dy_own * tl.load(D_ptr + h * stride_D_h).to(tl.float32)
            tl.store(dD_ptr + p_tile * stride_dD_p, tl.sum(dy_own * x))
    tl.store(dx_ptr + offs_m[:, None] * stride_dx_l + offs_p[None, :] * stride_dx_p, dx.to(dx_ptr.dtype.element_ty),
             mask=tile_mask)


def chunk_inputs_backward(x, dt_chunks, dA_cumsum, B, CB, dy, dstates, D=None, dx=None):
    """The SSD backward's gradient of x, and of dt and D through x's path, given dstates, what mamba-ssm's
    `_chunk_scan_chunk_state_bwd_dx` computes for a pass without documents (no seq_idx). x, dy (b, l, h, p);
    dt_chunks and dA_cumsum (b, h, c, k) float32 (mamba-ssm's chunk cumsum: dt after its softplus and limits, chunks of
    k positions); B (b, l, g, n); CB (b, c, g, k, k) float32, C_t . B_s at [t, s] (`_bmm_chunk_fwd`); dstates
    (b, c, h, p, n), the gradient of the state each chunk leaves (`entering_states_backward`'s); D None, (h,) or (h, p).
    Writes dx into `dx` (b, l, h, p) where given, in its dtype and strides (a new tensor like x otherwise); returns
    (dx, ddt (b, h, c, k) float32, zero past the sequence's end, dD in D's shape and dtype or None)."""
    _check_chunk_inputs(x, dt_chunks, dA_cumsum, B, CB, dy, dstates, D, dx)
    headdim, dstate = x.shape[3], B.shape[3]
    launch = dict(LAUNCH_CHUNK_INPUTS)  # the tiles no wider than a small head or state needs
    launch["block_p"] = min(launch["block_p"], max(16, triton.next_power_of_2(headdim)))
    launch["block_n"] = min(launch["block_n"], max(16, triton.next_power_of_2(dstate)))
    return launch_chunk_inputs_backward(x, dt_chunks, dA_cumsum, B, CB, dy, dstates, D, dx, **launch)


def launch_chunk_inputs_backward(x, dt_chunks, dA_cumsum, B, CB, dy, dstates, D, dx, block_m, block_p, block_k,
                                 block_n, num_warps, num_stages):
    """The kernel with explicit tiles and launch (`chunk_inputs_backward` checks the inputs and picks them): one
    program per (block_m of a chunk's positions x block_p of a head's channels, head, sequence x chunk), through the
    chunk's later positions block_k at a time (pipelined over num_stages) and the state block_n at a time. Where a
    head's channels take several tiles, their parts of ddt are summed after."""
    batch, seqlen, heads, headdim = x.shape
    chunks, chunk = dt_chunks.shape[2:]
    m_tiles, p_tiles = triton.cdiv(chunk, block_m), triton.cdiv(headdim, block_p)
    if dx is None:
        dx = torch.empty_like(x)
    ddt_parts = torch.empty(p_tiles, batch, heads, chunks, chunk, device=x.device, dtype=torch.float32)
    per_channel = D is not None and D.dim() == 2
    dD_parts = torch.empty(batch, chunks, m_tiles, heads, headdim if per_channel else p_tiles, device=x.device,
                           dtype=torch.float32)  # written only with D
    D_strides = (0, 0) if D is None else (D.stride(0), D.stride(1) if per_channel else 0)
    # Without D, dD_parts stands in for it, never read: Triton's interpreter takes no None for a pointer.
    with on_device_of(x):
        _chunk_inputs_backward_kernel[(m_tiles * p_tiles, heads, batch * chunks)](
            x, dt_chunks, dA_cumsum, B, CB, dy, dstates, dD_parts if D is None else D, dx, ddt_parts, dD_parts,
            seqlen, chunks, headdim, B.shape[3], heads // B.shape[2],
            *x.stride(), *dt_chunks.stride(), *dA_cumsum.stride(), *B.stride(), *CB.stride(), *dy.stride(),
            *dstates.stride(), *D_strides, *dx.stride(), *ddt_parts.stride(), *dD_parts.stride(),
            HAS_D=D is not None, D_HAS_HDIM=per_channel,
            DOT_PRECISION="ieee" if dy.dtype == torch.float32 else "tf32", CHUNK=chunk, BLOCK_M=block_m,
            BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
        )
    ddt = ddt_parts[0] if p_tiles == 1 else ddt_parts.sum(dim=0)  # (b, h, c, k)
    dD = None
    if D is not None:
        dD = dD_parts.sum(dim=(0, 1, 2))  # (h, p or p_tiles)
        dD = (dD if per_channel else dD.sum(dim=-1)).to(D.dtype)
    return dx, ddt, dD


def _in_chunks(t, chunk):
    """(b, l, ., .) -> (b, c, k, ., .): the positions in chunks of k, zeros past the sequence's end."""
    chunks = triton.cdiv(t.shape[1], chunk)
    return F.pad(t, (0, 0, 0, 0, 0, chunks * chunk - t.shape[1])).unflatten(1, (chunks, chunk))


def _check_chunked(x, dt_chunks, dA_cumsum, dy, CB, groups) -> None:
    """What the kernels that read a chunk's pairs of positions share: x and dy (b, l, h, p); dt_chunks and dA_cumsum
    (b, h, c, k) float32, c chunks of k covering the l positions; CB (b, c, g, k, k) float32, g dividing h."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, heads, head_dim), got {tuple(x.shape)}")
    batch, seqlen, heads, headdim = x.shape
    if dy.shape != x.shape:
        raise ValueError(f"dy must be x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dt_chunks.dim() != 4 or dt_chunks.shape[:2] != (batch, heads):
        raise ValueError(f"dt_chunks must be (batch, heads, chunks, chunk) = ({batch}, {heads}, ...), got "
                         f"{tuple(dt_chunks.shape)}")
    chunks, chunk = dt_chunks.shape[2:]
    if chunks != triton.cdiv(seqlen, chunk):
        raise ValueError(f"dt_chunks' {chunks} chunks of {chunk} must cover x's {seqlen} positions")
    if dA_cumsum.shape != dt_chunks.shape:
        raise ValueError(f"dA_cumsum must be dt_chunks' shape {tuple(dt_chunks.shape)}, got {tuple(dA_cumsum.shape)}")
    if groups < 1 or heads % groups:
        raise ValueError(f"ngroups must divide x's {heads} heads, got {groups}")
    if CB.shape != (batch, chunks, groups, chunk, chunk):
        raise ValueError(f"CB must be {(batch, chunks, groups, chunk, chunk)}, got {tuple(CB.shape)}")
    for name, tensor in dict(dt_chunks=dt_chunks, dA_cumsum=dA_cumsum, CB=CB).items():
        if tensor.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {tensor.dtype}")


def _check_chunk_inputs(x, dt_chunks, dA_cumsum, B, CB, dy, dstates, D, dx) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, heads, head_dim), got {tuple(x.shape)}")
    batch, seqlen, heads, headdim = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen) or heads % B.shape[2]:
        raise ValueError(f"B must be (batch, length, groups, state) with groups dividing x's {heads} heads, got "
                         f"{tuple(B.shape)} for x {tuple(x.shape)}")
    _check_chunked(x, dt_chunks, dA_cumsum, dy, CB, B.shape[2])
    if dx is not None and dx.shape != x.shape:
        raise ValueError(f"dx must be x's shape {tuple(x.shape)}, got {tuple(dx.shape)}")
    chunks, dstate = dt_chunks.shape[2], B.shape[3]
    if dstates.shape != (batch, chunks, heads, headdim, dstate):
        raise ValueError(f"dstates must be {(batch, chunks, heads, headdim, dstate)}, got {tuple(dstates.shape)}")
    if D is not None and D.shape not in ((heads,), (heads, headdim)):
        raise ValueError(f"D must be ({heads},) or ({heads}, {headdim}), got {tuple(D.shape)}")


# The launch of `chunk_pairs_backward`: 32 of a chunk's positions t a program (four programs a chunk of 128), every
# head of its group in one program (no partial sums of dCB), 4 warps, 2 stages over the heads. Not yet timed on a GPU
# (benchmarks/ssd_backward_pairs.py sweeps it): chosen for the 1.3B step's 128 chunks of 16K tokens, where it gives 512
# programs, about four for each of an H100's 132 multiprocessors, each holding three 32 x 128 float32 tiles (its dCB,
# CB, and one head's pairs: 96 registers a thread of 4 warps), and four partial rows of ddA per head to sum after, as
# mamba-ssm's stable kernel has with its rows of 32.
LAUNCH_CHUNK_PAIRS = dict(block_m=32, head_splits=1, num_warps=4, num_stages=2)


def chunk_pairs_backward_reference(x, dt_chunks, dA_cumsum, dy, CB, ngroups):
    """`chunk_pairs_backward` in PyTorch (same arguments, same results), every chunk's pairs at once."""
    _check_chunked(x, dt_chunks, dA_cumsum, dy, CB, ngroups)
    heads, chunk = x.shape[2], dt_chunks.shape[3]
    a = dA_cumsum.float()  # (b, h, c, k)
    decay = torch.exp(torch.clamp(a[..., :, None] - a[..., None, :], max=0))  # (b, h, c, t, s)
    pairs = torch.einsum("bcthp,bcshp->bhcts", _in_chunks(dy.float(), chunk), _in_chunks(x.float(), chunk))
    pairs = pairs * dt_chunks[..., None, :] * decay
    pairs = pairs.tril()  # the pairs s <= t
    dCB = pairs.unflatten(1, (ngroups, heads // ngroups)).sum(dim=2).transpose(1, 2)  # (b, c, g, t, s)
    within = (pairs * CB.repeat_interleave(heads // ngroups, dim=2).transpose(1, 2)).tril(-1)  # (b, h, c, t, s)
    # Position j collects the pairs s < j <= t: over t >= j, the running sum over s of each row, up to s = j - 1.
    ddA = F.pad(within.cumsum(dim=-1).tril(-1).sum(dim=-2)[..., :-1], (1, 0))  # (b, h, c, k)
    return dCB, ddA


@triton.jit
def _chunk_pairs_backward_kernel(
    x_ptr, dt_ptr, dA_cumsum_ptr, dy_ptr, CB_ptr, dCB_ptr, ddA_ptr,
    seqlen, nchunks, headdim, heads_per_group, heads_per_split, splits,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_k,
    stride_dA_b, stride_dA_h, stride_dA_c, stride_dA_k,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_CB_b, stride_CB_c, stride_CB_g, stride_CB_t, stride_CB_s,
    stride_dCB_split, stride_dCB_b, stride_dCB_c, stride_dCB_g, stride_dCB_t, stride_dCB_s,
    stride_ddA_tile, stride_ddA_b, stride_ddA_h, stride_ddA_c, stride_ddA_k,
    DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # The row tiles of one chunk run side by side: they read the same x, each up to its last position.
    m_tile, bc, group_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, c = bc // nchunks, bc % nchunks
    g, split = group_split // splits, group_split % splits
    start = c * CHUNK
    limit = tl.minimum(CHUNK, seqlen - start)  # the chunk's positions inside the sequence
    first_head = g * heads_per_group + split * heads_per_split
    x_ptr += b * stride_x_b + start * stride_x_l + first_head * stride_x_h
    dy_ptr += b * stride_dy_b + start * stride_dy_l + first_head * stride_dy_h
    dt_ptr += b * stride_dt_b + first_head * stride_dt_h + c * stride_dt_c
    dA_cumsum_ptr += b * stride_dA_b + first_head * stride_dA_h + c * stride_dA_c
    ddA_ptr += m_tile * stride_ddA_tile + b * stride_ddA_b + first_head * stride_ddA_h + c * stride_ddA_c

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # the positions t (the outputs') this program owns
    offs_s = tl.arange(0, BLOCK_S)  # the positions s (the inputs') of the whole chunk
    offs_p = tl.arange(0, BLOCK_P)
    rows = offs_m < limit
    cols = offs_s < tl.minimum(limit, (m_tile + 1) * BLOCK_M)  # no later s than the tile's last t
    in_chunk_m, in_chunk_s = offs_m < CHUNK, offs_s < CHUNK
    CB = tl.load(CB_ptr + b * stride_CB_b + c * stride_CB_c + g * stride_CB_g + offs_m[:, None] * stride_CB_t
                 + offs_s[None, :] * stride_CB_s, mask=rows[:, None] & cols[None, :], other=0.0)  # (M, S)
    strictly_later = offs_m[:, None] > offs_s[None, :]  # the pairs whose decay a later position's increment enters

    dCB = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
    for _ in range(tl.minimum(heads_per_split, heads_per_group - split * heads_per_split)):
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p,
                     mask=rows[:, None] & (offs_p < headdim)[None, :], other=0.0)  # (M, P)
        x = tl.load(x_ptr + offs_s[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
                    mask=(offs_p < headdim)[:, None] & cols[None, :], other=0.0)  # (P, S)
        dt_s = tl.load(dt_ptr + offs_s * stride_dt_k, mask=in_chunk_s, other=0.0)
        a_m = tl.load(dA_cumsum_ptr + offs_m * stride_dA_k, mask=in_chunk_m, other=0.0)
        a_s = tl.load(dA_cumsum_ptr + offs_s * stride_dA_k, mask=in_chunk_s, other=0.0)
        pairs = tl.dot(dy, x, input_precision=DOT_PRECISION) * dt_s[None, :]
        pairs *= tl.exp(tl.minimum(a_m[:, None] - a_s[None, :], 0.0))  # (M, S): zero where t or s is masked
        dCB += pairs
        # Position j = s + 1 collects the pairs s' <= s < t: this tile's rows' running sums over s', summed over t.
        within = tl.where(strictly_later, pairs * CB, 0.0)
        ddA = tl.sum(tl.where(strictly_later, tl.cumsum(within, axis=1), 0.0), axis=0)  # (S,)
        tl.store(ddA_ptr + (offs_s + 1) * stride_ddA_k, ddA, mask=offs_s + 1 < CHUNK)
        tl.store(ddA_ptr, 0.0)  # the first position's increment is in every pair's a_t and a_s alike
        x_ptr += stride_x_h
        dy_ptr += stride_dy_h
        dt_ptr += stride_dt_h
        dA_cumsum_ptr += stride_dA_h
        ddA_ptr += stride_ddA_h
    tl.store(dCB_ptr + split * stride_dCB_split + b * stride_dCB_b + c * stride_dCB_c + g * stride_dCB_g
             + offs_m[:, None] * stride_dCB_t + offs_s[None, :] * stride_dCB_s,
             tl.where(offs_m[:, None] >= offs_s[None, :], dCB, 0.0), mask=in_chunk_m[:, None] & in_chunk_s[None, :])


def chunk_pairs_backward(x, dt_chunks, dA_cumsum, dy, CB, ngroups):
    """The two parts of the SSD backward that take the product of the outputs' gradient with the inputs at every pair
    of a chunk's positions, (dy_t . x_s) dt_s exp(a_t - a_s) for s <= t (a = dA_cumsum, the exponent clamped to at
    most 0), from one product: what mamba-ssm's `_chunk_scan_bwd_dcb(x, dt_chunks, dA_cumsum, dy, ngroups=ngroups)`
    and `_chunk_scan_bwd_ddAcs_stable(x, dt_chunks, dA_cumsum, dy, CB)` compute, for a pass without documents (no
    seq_idx). x, dy (b, l, h, p); dt_chunks and dA_cumsum (b, h, c, k) float32 (mamba-ssm's chunk cumsum, chunks of k
    positions, zero and constant past the sequence's end); CB (b, c, g, k, k) float32, C_t . B_s at [t, s], g =
    ngroups. Returns dCB (b, c, g, k, k) float32, those products summed over each group's heads (zero above the
    diagonal), and ddA (b, h, c, k) float32, the gradient of each position's log-decay increment dt A through the
    chunk's own outputs: position j collects the products times CB over the pairs s < j <= t (zero at j = 0).

    The same products and roundings as mamba-ssm's (x and dy in their dtype, the products accumulated in float32,
    exact in float32 where mamba-ssm's are TF32); the float32 sums differ in order, and the product with CB and with
    the decay in order (each one rounding)."""
    _check_chunked(x, dt_chunks, dA_cumsum, dy, CB, ngroups)
    launch = dict(LAUNCH_CHUNK_PAIRS)
    launch["block_m"] = min(launch["block_m"], max(16, triton.next_power_of_2(dt_chunks.shape[3])))
    return launch_chunk_pairs_backward(x, dt_chunks, dA_cumsum, dy, CB, ngroups, **launch)


def launch_chunk_pairs_backward(x, dt_chunks, dA_cumsum, dy, CB, ngroups, block_m, head_splits, num_warps,
                                num_stages):
    """The kernel with explicit tiles and launch (`chunk_pairs_backward` checks the inputs and picks them): one program
    per (block_m of a chunk's positions t, sequence x chunk, group x split of its heads), over every position s of the
    chunk at once, through its heads one at a time (pipelined over num_stages). Each program writes its rows' part of
    ddA for every position of its heads, and its heads' part of dCB; where a chunk takes several row tiles or a group's
    heads several splits (head_splits), those parts are summed after."""
    batch, seqlen, heads, headdim = x.shape
    chunks, chunk = dt_chunks.shape[2:]
    heads_per_group = heads // ngroups
    heads_per_split = triton.cdiv(heads_per_group, head_splits)
    splits = triton.cdiv(heads_per_group, heads_per_split)  # none empty
    m_tiles = triton.cdiv(chunk, block_m)
    dCB_parts = torch.empty(splits, batch, chunks, ngroups, chunk, chunk, device=x.device, dtype=torch.float32)
    ddA_parts = torch.empty(m_tiles, batch, heads, chunks, chunk, device=x.device, dtype=torch.float32)
    with on_device_of(x):
        _chunk_pairs_backward_kernel[(m_tiles, batch * chunks, ngroups * splits)](
            x, dt_chunks, dA_cumsum, dy, CB, dCB_parts, ddA_parts, seqlen, chunks, headdim, heads_per_group,
            heads_per_split, splits, *x.stride(), *dt_chunks.stride(), *dA_cumsum.stride(), *dy.stride(),
            *CB.stride(), *dCB_parts.stride(), *ddA_parts.stride(),
            DOT_PRECISION="ieee" if dy.dtype == torch.float32 else "tf32", CHUNK=chunk, BLOCK_M=block_m,
            BLOCK_S=max(16, triton.next_power_of_2(chunk)), BLOCK_P=max(16, triton.next_power_of_2(headdim)),
            num_warps=num_warps, num_stages=num_stages,
        )
    dCB = dCB_parts[0] if splits == 1 else dCB_parts.sum(dim=0)  # (b, c, g, k, k)
    ddA = ddA_parts[0] if m_tiles == 1 else ddA_parts.sum(dim=0)  # (b, h, c, k)
    return dCB, ddA


__all__ = ["LAUNCH_CHUNK_INPUTS", "LAUNCH_CHUNK_PAIRS", "chunk_inputs_backward", "chunk_inputs_backward_reference",
           "chunk_pairs_backward", "chunk_pairs_backward_reference", "entering_states_backward",
           "entering_states_backward_reference", "launch_chunk_inputs_backward", "launch_chunk_pairs_backward",
           "launch_entering_states_backward", "launch_settings"]
