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


__all__ = ["entering_states_backward", "entering_states_backward_reference", "launch_entering_states_backward",
           "launch_settings"]
