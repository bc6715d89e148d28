"""The depthwise causal convolution's backward (Triton), channels last, in place of causal-conv1d's
`causal_conv1d_bwd_function` in the training pass's backward (`training_mixer.MixerTrainingPass`).

The mixer convolves xBC, a column slice of in_proj's output (b, l, conv_dim) with unit channel stride, by a weight
(conv_dim, width) and a bias, then (with the silu activation) applies silu:

    pre[t, c] = bias[c] + sum_k w[c, k] x[t - (width - 1) + k, c]   (zero before the sequence's start)
    out = silu(pre), or pre without the activation.

Its backward recomputes pre from x and, with dpre = dout * silu'(pre) (dout without the activation), gives

    dx[t, c] = sum_k w[c, k] dpre[t + (width - 1) - k, c]   (zero past the end),
    dw[c, k] = sum_t dpre[t, c] x[t - (width - 1) + k, c],   dbias[c] = sum_t dpre[t, c],

dx written into a strided slice of in_proj's gradient. In a 1.3B training step on an H100 (4 x 4096 tokens, bf16,
conv_dim 4352, width 4, silu) causal-conv1d's channels-last backward kernel took 0.24 ms a call (40 calls, 9.7 ms a
step), where the bytes it must move (read x and dout, write dx: about 430 MB) take about 0.13-0.15 ms.

Here each program takes `block_t` positions of `block_c` channels of one sequence and walks them one position at a
time: it keeps the last three rows of x and of dpre in registers, so that each row of x and dout is read once (plus
three rows of halo before and after the tile) and silu computed once per position, where a tile of positions computed
at once would read each row several times over, shifted, and recompute silu at each shift. The next position's rows
of x and dout load while this one is computed (a prefetch one step ahead, written out: compiled for sm_90, Triton's
pipeliner turned none of this loop's loads into asynchronous copies). A width under 4 is the same walk with the taps
before the weight's first zero. Each program sums its positions' part of dw and dbias in float32 registers and writes
it as one partial row (no atomics, no zeroed buffers), summed after by `.sum(0)`. Sequences are independent: packed
documents (seq_idx) and initial or final states are not taken.

The math is causal-conv1d's: float32 inside, dx in its tensor's dtype, dw and dbias summed in float32 and returned in
the weight's and the bias's dtypes (as `causal_conv1d_bwd_function` casts them). On an H100 at 4 x 4096 x 4352 ours took
0.265 ms against causal-conv1d's 0.284, dx within a bf16 step of its (results/conv1d_backward.md). A candidate:
`training_mixer` still calls causal-conv1d's kernel until a whole training step with ours has run on a GPU (the gain,
about 0.8 ms of a 330 ms step, is not worth an untimed change to training's default).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .cuda_device import on_device_of

try:  # a dependency of mamba-ssm; without it, the reference
    import triton
    import triton.language as tl
except ImportError:
    triton = None

WINDOW = 4  # the rows of x and dpre the kernel keeps: the widest convolution it takes (causal-conv1d's too)


class ConvLaunch(NamedTuple):
    """How the backward kernel is launched: positions (`block_t`) and channels (`block_c`, a power of 2) a program,
    warps per program and the pipeline stages asked of Triton for its walk over its positions (`tl.range`)."""

    block_t: int
    block_c: int
    num_warps: int
    num_stages: int


# 256 channels over two warps: 4 bf16 channels a thread, one 8-byte load of x and of dout a position (4352 = 17 x 256,
# no partial block). Compiled for sm_90 here (Triton 3.9, no GPU, the 1.3B launch's alignments): 96 registers, no
# spills, so 10 programs a multiprocessor; 256 positions a program make 1,088 programs at 16K positions a step, one
# wave on 132 multiprocessors, with 3 halo rows (1%) and partial rows of dw (64 of 4352 x 4 float32, 4.5 MB) summed
# after. Each warp has two positions' rows in flight (the prefetch), about 17 KB a multiprocessor, near an H100's
# bandwidth times its memory latency (about 20 KB). One warp a program takes 176 registers (8 channels a thread,
# 16-byte loads), four take 56 (2 channels); stages are 1: the loop's loads stayed synchronous under 2-4 in the compile,
# the sweep times them anyway. On an H100 every setting of 256 positions took 0.26-0.27 ms (1.6 TB/s, the walk along
# the positions its bound), this one 0.265 (results/conv1d_backward.md).
DEFAULT_LAUNCH = ConvLaunch(block_t=256, block_c=256, num_warps=2, num_stages=1)


def _overlapping_rows(t: torch.Tensor) -> bool:
    """Whether two of the (b, l) rows of `t` (channels contiguous) share memory: its outer dimensions, by stride, must
    each step over the whole of the one inside."""
    extent = t.shape[-1]
    for stride, size in sorted((st, s) for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s > 1):
        if stride < extent:
            return True
        extent = stride * size
    return False


def _check(x, weight, bias, dout, dx) -> None:
    """ValueError naming the argument of a shape, stride or width the kernel (and so the reference) does not take,
    TypeError for its dtype."""
    named = dict(x=x, weight=weight, bias=bias, dout=dout, dx=dx)
    for name, tensor in named.items():
        if tensor is not None and not tensor.is_floating_point():
            raise TypeError(f"{name} must be of a floating dtype, got {tensor.dtype}")
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} must be on x's device ({x.device}), got {tensor.device}")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, length, channels), got {tuple(x.shape)}")
    channels = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != channels or not 2 <= weight.shape[1] <= WINDOW:
        raise ValueError(f"weight must be ({channels}, width) with width 2 to {WINDOW}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias must be ({channels},), got {tuple(bias.shape)}")
    for name, tensor in (("dout", dout), ("dx", dx)):
        if tensor is not None and tensor.shape != x.shape:
            raise ValueError(f"{name} must be x's shape {tuple(x.shape)}, got {tuple(tensor.shape)}")
    for name, tensor in (("x", x), ("dout", dout), ("dx", dx)):
        if tensor is not None and tensor.stride(-1) != 1 and channels > 1:
            raise ValueError(f"{name} must have contiguous channels (stride 1), got strides {tensor.stride()}")
    if dout.dtype != x.dtype:
        raise TypeError(f"dout must be x's dtype ({x.dtype}), got {dout.dtype}")
    if dx is not None and dx.dtype != x.dtype:
        raise TypeError(f"dx must be x's dtype ({x.dtype}), got {dx.dtype}")
    if dx is not None and _overlapping_rows(dx):
        raise ValueError(f"dx's rows overlap (shape {tuple(dx.shape)}, strides {dx.stride()})")


def _new_dx(x: torch.Tensor, dx):
    """dx where given, else a new contiguous (b, l, c) tensor of x's dtype."""
    return torch.empty(x.shape, device=x.device, dtype=x.dtype) if dx is None else dx


def causal_conv1d_backward_reference(x, weight, bias, dout, silu, dx=None):
    """`causal_conv1d_backward` in PyTorch (float32 inside): same arguments, same returns."""
    _check(x, weight, bias, dout, dx)
    channels, width = weight.shape
    length = x.shape[1]
    x_f = x.float().transpose(1, 2)  # (b, c, l)
    taps = weight.float()[:, None, :]  # (c, 1, width)
    pre = F.conv1d(x_f, taps, None if bias is None else bias.float(), padding=width - 1, groups=channels)
    pre = pre[..., :length]
    dpre = dout.float().transpose(1, 2)  # (b, c, l)
    if silu:
        sigmoid = torch.sigmoid(pre)
        dpre = dpre * sigmoid * (1 + pre * (1 - sigmoid))
    # dx[t] = sum_k w[k] dpre[t + width - 1 - k]: a convolution of dpre padded after, by the taps reversed.
    dx_f = F.conv1d(F.pad(dpre, (0, width - 1)), taps.flip(-1), groups=channels)  # (b, c, l)
    x_padded = F.pad(x_f, (width - 1, 0))
    dweight = torch.stack([(dpre * x_padded[..., k:k + length]).sum((0, 2)) for k in range(width)], dim=1)
    dx = _new_dx(x, dx)
    dx.copy_(dx_f.transpose(1, 2))
    dbias = None if bias is None else dpre.sum((0, 2)).to(bias.dtype)
    return dx, dweight.to(weight.dtype), dbias


def causal_conv1d_backward(x, weight, bias, dout, silu, dx=None):
    """The gradients of out = act(causal depthwise conv1d(x) + bias), act silu where `silu` else none: x, dout and dx
    (b, l, channels), their channels contiguous, rows at any strides (x a view of in_proj's output, dx one of its
    gradient, as causal-conv1d reads their (b, channels, l) transposes); weight (channels, width), width 2 to 4; bias
    (channels,) or None. dx is written where given, else new. Returns (dx, dweight, dbias or None without a bias),
    dweight and dbias in the weight's and the bias's dtypes. On CUDA with Triton by `launch_causal_conv1d_backward`
    (`DEFAULT_LAUNCH`), else by the reference."""
    if triton is None or not x.is_cuda:
        return causal_conv1d_backward_reference(x, weight, bias, dout, silu, dx)
    _check(x, weight, bias, dout, dx)
    return launch_causal_conv1d_backward(x, weight, bias, dout, silu, dx)


def launch_causal_conv1d_backward(x, weight, bias, dout, silu, dx=None, launch=DEFAULT_LAUNCH):
    """The kernel under `launch` (a `ConvLaunch`), without the checks (the benchmark's sweep and the interpreter tests
    call it). Arguments and returns as `causal_conv1d_backward`'s."""
    batch, length, channels = x.shape
    width = weight.shape[1]
    dx = _new_dx(x, dx)
    if dx.numel() == 0:
        dbias = None if bias is None else torch.zeros_like(bias)
        return dx, torch.zeros_like(weight), dbias
    time_blocks = triton.cdiv(length, launch.block_t)
    parts = batch * time_blocks  # one partial row of dw and dbias per program of a channel block
    dweight_parts = torch.empty(parts, channels, width, device=x.device, dtype=torch.float32)
    dbias_parts = None if bias is None else torch.empty(parts, channels, device=x.device, dtype=torch.float32)
    # Triton's interpreter takes no None for a pointer: without a bias, the weight stands in, never read.
    with on_device_of(x):
        _causal_conv1d_backward_kernel[(time_blocks, triton.cdiv(channels, launch.block_c), batch)](
            x, weight, weight if bias is None else bias, dout, dx, dweight_parts,
            dweight_parts if bias is None else dbias_parts, length, channels, x.stride(0), x.stride(1),
            dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1), weight.stride(0), weight.stride(1),
            PAD=WINDOW - width, HAS_BIAS=bias is not None, SILU=bool(silu), BLOCK_T=launch.block_t,
            BLOCK_C=launch.block_c, NUM_STAGES=launch.num_stages, num_warps=launch.num_warps,
        )
    dbias = None if bias is None else dbias_parts.sum(0).to(bias.dtype)
    return dx, dweight_parts.sum(0).to(weight.dtype), dbias


__all__ = ["DEFAULT_LAUNCH", "ConvLaunch", "causal_conv1d_backward", "causal_conv1d_backward_reference",
           "launch_causal_conv1d_backward"]

if triton is not None:

    @triton.jit
    def _tap(taps, tap_stride, in_channels, K: tl.constexpr, PAD: tl.constexpr):
        """Tap K of the four-tap window: the weight's tap K - PAD, zero before its first."""
        if K >= PAD:
            tap = tl.load(taps + (K - PAD) * tap_stride, mask=in_channels, other=0.0).to(tl.float32)
        else:
            tap = tl.zeros(in_channels.shape, dtype=tl.float32)
        return tap

    @triton.jit
    def _store_tap(parts, dw, in_channels, K: tl.constexpr, PAD: tl.constexpr):
        """Store the window's tap K's gradient as the weight's tap K - PAD's (none before its first)."""
        if K >= PAD:
            tl.store(parts + K - PAD, dw, mask=in_channels)

    @triton.jit
    def _channels_where(channel, channels, condition):
        """The block's channels in range where `condition` (a scalar) holds, none where not: one comparison a
        channel (and Triton's interpreter takes no scalar and vector masks combined)."""
        return channel < tl.where(condition, channels, 0)

    @triton.jit
    def _causal_conv1d_backward_kernel(
            x_ptr, weight_ptr, bias_ptr, dout_ptr, dx_ptr, dweight_parts_ptr, dbias_parts_ptr, length, channels,
            x_batch_stride, x_row_stride, dout_batch_stride, dout_row_stride, dx_batch_stride, dx_row_stride,
            weight_channel_stride, weight_tap_stride, PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
            SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr):
        # Program (i, j, b) takes positions [i * BLOCK_T, ...) of channel block j of sequence b, as a convolution of
        # four taps w0..w3 (the weight's taps after PAD zeros). Walking s from the tile's first position to 3 past
        # its last, with x1..x3 the rows of x at s - 1..s - 3 and dp1..dp3 those of dpre:
        #   pre(s) = bias + w0 x3 + w1 x2 + w2 x1 + w3 x(s),  dp0 = dout(s) silu'(pre(s)),
        #   dx(s - 3) = w0 dp0 + w1 dp1 + w2 dp2 + w3 dp3,    dw_k += dp0 x(s - 3 + k) for s in the tile.
        time_block, channel_block, sequence = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        channel = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        in_channels = channel < channels
        taps = weight_ptr + channel * weight_channel_stride
        w0 = _tap(taps, weight_tap_stride, in_channels, 0, PAD)
        w1 = _tap(taps, weight_tap_stride, in_channels, 1, PAD)
        w2 = _tap(taps, weight_tap_stride, in_channels, 2, PAD)
        w3 = _tap(taps, weight_tap_stride, in_channels, 3, PAD)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + channel, mask=in_channels, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
        first = time_block * BLOCK_T
        rows = tl.minimum(length - first, BLOCK_T)  # the tile's positions in the sequence
        # The tile's first row's addresses in 64 bits (a batch of in_proj's rows passes 2**31 elements), the walk's
        # offsets from them in 32.
        sequence, start = sequence.to(tl.int64), time_block.to(tl.int64) * BLOCK_T
        x_ptrs = x_ptr + sequence * x_batch_stride + start * x_row_stride + channel
        dout_ptrs = dout_ptr + sequence * dout_batch_stride + start * dout_row_stride + channel
        dx_ptrs = dx_ptr + sequence * dx_batch_stride + start * dx_row_stride + channel
        # The halo: x's three rows before the tile (zero before the sequence's start). dpre's are never read: the dx
        # rows that would read them lie before the tile, not stored.
        x3 = tl.load(x_ptrs - 3 * x_row_stride, mask=_channels_where(channel, channels, first >= 3),
                     other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs - 2 * x_row_stride, mask=_channels_where(channel, channels, first >= 2),
                     other=0.0).to(tl.float32)
        x1 = tl.load(x_ptrs - x_row_stride, mask=_channels_where(channel, channels, first >= 1),
                     other=0.0).to(tl.float32)
        dp1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dp2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dp3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dw0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dw1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dw2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dw3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
        # Each row's x and dout are loaded one step ahead, so that they arrive while the step before is computed.
        # Past the sequence's end they are 0, and so is dpre.
        inside = _channels_where(channel, channels, length > first)
        x_next = tl.load(x_ptrs, mask=inside, other=0.0)
        dout_next = tl.load(dout_ptrs, mask=inside, other=0.0)
        for step in tl.range(0, BLOCK_T + 3, num_stages=NUM_STAGES):  # position first + step
            x0, dp0 = x_next.to(tl.float32), dout_next.to(tl.float32)
            inside = _channels_where(channel, channels, (step + 1 < length - first) & (step + 1 < BLOCK_T + 3))
            x_next = tl.load(x_ptrs + (step + 1) * x_row_stride, mask=inside, other=0.0)
            dout_next = tl.load(dout_ptrs + (step + 1) * dout_row_stride, mask=inside, other=0.0)
            if SILU:
                pre = bias + w0 * x3 + w1 * x2 + w2 * x1 + w3 * x0
                sigmoid = tl.sigmoid(pre)
                dp0 = dp0 * sigmoid * (1 + pre * (1 - sigmoid))
            # The rows after the tile's (its halo) are the next tile's to sum into dw and dbias.
            own = tl.where(step < rows, dp0, 0.0)
            dw0 += own * x3
            dw1 += own * x2
            dw2 += own * x1
            dw3 += own * x0
            dbias += own
            dx = w0 * dp0 + w1 * dp1 + w2 * dp2 + w3 * dp3
            stored = _channels_where(channel, channels, (step >= 3) & (step - 3 < rows))
            tl.store(dx_ptrs + (step - 3) * dx_row_stride, dx.to(dx_ptr.dtype.element_ty), mask=stored)
            x3, x2, x1 = x2, x1, x0
            dp3, dp2, dp1 = dp2, dp1, dp0
        part = sequence * tl.num_programs(0) + time_block
        width = 4 - PAD
        parts = dweight_parts_ptr + (part * channels + channel) * width  # (BLOCK_C,) rows of (channels, width)
        _store_tap(parts, dw0, in_channels, 0, PAD)
        _store_tap(parts, dw1, in_channels, 1, PAD)
        _store_tap(parts, dw2, in_channels, 2, PAD)
        _store_tap(parts, dw3, in_channels, 3, PAD)
        if HAS_BIAS:
            tl.store(dbias_parts_ptr + part * channels + channel, dbias, mask=in_channels)
