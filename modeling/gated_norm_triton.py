"""The gated RMSNorm's backward (Triton), in place of mamba-ssm's `_layer_norm_bwd` in the training pass's backward
(`training_mixer.MixerTrainingPass`).

The mixer's output is normed = rmsnorm(y * silu(z)) * weight (norm after the gate, as our models use) or
rmsnorm(y) * weight * silu(z) (norm before it), each group of `group_size` channels normalised by its own
rstd = 1 / sqrt(mean(x^2) + eps), kept by the forward (mamba-ssm's `_layer_norm_fwd`). Its backward reads the gradient
of the output, y, z, rstd and the weight and writes the gradients of y and z (z's into in_proj's gradient, a strided
view), the weight's gradient and, for out_proj's weight gradient, the recomputed output.

In a 1.3B training step on an H100 (16,384 rows of 4,096 channels, bf16, one group) mamba-ssm's kernel took 0.377 ms
a call, 40 calls and 15 ms a step, where the 805 MB it moves (three tensors read, three written) take about
0.25 ms at the card's bandwidth. It launches one program of 8 warps per multiprocessor, each walking its rows one at
a time: load the row, reduce it (a barrier across the warps), store three rows, and only then load the next. With a
quarter of a row's bytes in flight per multiprocessor for most of that walk, the loads wait on memory latency; more
programs per multiprocessor gained at most 16% (benchmarks/gated_norm_backward.py). Its other costs are small: it
reads the weight once per program, and its weight gradient is one float32 partial row per program, summed after.

Here each program also walks a contiguous share of the rows with a whole group's channels in registers and sums its
part of the weight's gradient in float32 registers (one partial row per program, then `.sum(0)`), but:

- the walk is a pipelined loop (`tl.range(..., num_stages)`): the next tiles' loads are issued (asynchronous copies
  to shared memory) while this one is reduced and stored, so the memory system always has rows in flight;
- a tile may hold several rows (`rows_per_tile`), whose reductions run side by side, and several programs may share
  a multiprocessor (`programs_per_multiprocessor`), where their registers allow (for rows of 4,096 they did not, as
  compiled: `DEFAULT_LAUNCH`); the benchmark's sweep times them.

The math is mamba-ssm's: float32 inside, dy, dz and the output in their tensors' dtypes, the weight's gradient summed
in float32 and cast to the weight's dtype. On an H200 at 16,384 x 4,096 ours took 0.318 ms against mamba-ssm's 0.454
(its own kernel under 16 warps: 0.335), within a bf16 rounding of its outputs (results/gated_norm_backward.md);
`training_mixer`'s backward calls it.
"""

from typing import NamedTuple

import torch

from .cuda_device import on_device_of

try:  # a dependency of mamba-ssm; without it, the reference
    import triton
    import triton.language as tl
except ImportError:
    triton = None


class NormLaunch(NamedTuple):
    """How the backward kernel is launched: rows per tile (its BLOCK_M; the tile's width is a whole group, rounded up
    to a power of 2), programs per multiprocessor (which set the rows per program: the rows split evenly over them, in
    whole tiles), warps per program and pipeline stages of the loop over a program's tiles."""

    rows_per_tile: int
    programs_per_multiprocessor: int
    num_warps: int
    num_stages: int


# One row of 4,096 a tile over 16 warps (8 float32 values of a tensor per thread), one program per multiprocessor,
# three stages: the next two rows (48 KB) load into shared memory while one is reduced and stored. Compiled for sm_90
# here (Triton 3.9, no GPU, the 1.3B launch's alignments): 122 registers, no spills, every load of the loop an
# asynchronous copy. 8 warps took 176-204 registers (so one program per multiprocessor either way); tiles of two or
# more rows, or 4 warps a row, spilled. On an H200: 0.318 ms, within 2% of the fastest of 36 settings
# (results/gated_norm_backward.md).
DEFAULT_LAUNCH = NormLaunch(rows_per_tile=1, programs_per_multiprocessor=1, num_warps=16, num_stages=3)


def _check(dout, y, z, weight, rstd, group_size, recompute_output, dy, dz, out) -> int:
    """ValueError naming the argument that the kernel (and so the reference) does not take; returns the group size."""
    if y.dim() != 2 or dout.shape != y.shape:
        raise ValueError(f"y and dout must be (rows, width) of one shape, got y {tuple(y.shape)}, "
                         f"dout {tuple(dout.shape)}")
    rows, width = y.shape
    group_size = width if group_size is None else group_size
    if group_size <= 0 or width % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the width ({width})")
    named = dict(dout=dout, y=y, z=z, weight=weight, dy=dy, dz=dz, out=out)
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be of a floating dtype, got {tensor.dtype}")
        if tensor.device != y.device:
            raise ValueError(f"{name} must be on y's device ({y.device}), got {tensor.device}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have contiguous channels (stride 1), got strides {tensor.stride()}")
    if z is not None and z.shape != y.shape:
        raise ValueError(f"z must be y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
    if weight.shape != (width,):
        raise ValueError(f"weight must be ({width},), got {tuple(weight.shape)}")
    if rstd.shape != (width // group_size * rows,) or rstd.dtype != torch.float32 or not rstd.is_contiguous():
        raise ValueError(f"rstd must be contiguous float32 ({width // group_size * rows},) (groups x rows, as "
                         f"mamba-ssm's _layer_norm_fwd keeps it), got {tuple(rstd.shape)} {rstd.dtype}")
    if rstd.device != y.device:
        raise ValueError(f"rstd must be on y's device ({y.device}), got {rstd.device}")
    if dz is not None and z is None:
        raise ValueError("dz given without z: there is no gate to differentiate")
    if out is not None and not recompute_output:
        raise ValueError("out given with recompute_output=False")
    for name, tensor, like in (("dy", dy, y), ("dz", dz, z), ("out", out, y)):
        if tensor is None:
            continue
        if tensor.shape != like.shape or tensor.dtype != like.dtype:
            raise ValueError(f"{name} must be {tuple(like.shape)} {like.dtype}, got {tuple(tensor.shape)} "
                             f"{tensor.dtype}")
        if rows > 1 and tensor.stride(0) < width:
            raise ValueError(f"{name}'s rows overlap (row stride {tensor.stride(0)} < width {width})")
    return group_size


def _outputs(y, z, recompute_output, dy, dz, out):
    """The tensors to write: those given, else new ones of y's (z's) shape and dtype."""
    dy = torch.empty_like(y) if dy is None else dy
    if z is not None and dz is None:
        dz = torch.empty_like(z)
    if recompute_output and out is None:
        out = torch.empty_like(y)
    return dy, dz, out


def gated_rms_norm_backward_reference(dout, y, z, weight, rstd, *, group_size=None, norm_before_gate=True,
                                      recompute_output=False, dy=None, dz=None, out=None):
    """`gated_rms_norm_backward` in PyTorch (float32 inside): same arguments, same returns."""
    group_size = _check(dout, y, z, weight, rstd, group_size, recompute_output, dy, dz, out)
    rows, width = y.shape
    groups = width // group_size
    as_groups = lambda t: t.float().unflatten(-1, (groups, group_size))  # noqa: E731  (rows, groups, group_size)
    d_normed, x = as_groups(dout), as_groups(y)
    weight_groups = weight.float().view(groups, group_size)
    rstd_groups = rstd.view(groups, rows).t().unsqueeze(-1)  # (rows, groups, 1)
    if z is not None:
        gate = as_groups(z)
        sigmoid = torch.sigmoid(gate)
        silu, dsilu = gate * sigmoid, sigmoid * (1 + gate * (1 - sigmoid))
    gated_first = z is not None and not norm_before_gate
    xhat = (x * silu if gated_first else x) * rstd_groups
    normed = xhat * weight_groups
    d_gate = None
    if z is not None and norm_before_gate:
        output, d_gate = normed * silu, d_normed * normed * dsilu
        d_normed = d_normed * silu
    else:
        output = normed
    d_weight = (d_normed * xhat).sum(0).flatten().to(weight.dtype)
    g = d_normed * weight_groups
    dx = (g - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd_groups
    if gated_first:
        d_gate, dx = dx * x * dsilu, dx * silu
    dy, dz, out = _outputs(y, z, recompute_output, dy, dz, out)
    dy.copy_(dx.flatten(1))
    if dz is not None:
        dz.copy_(d_gate.flatten(1))
    if out is not None:
        out.copy_(output.flatten(1))
    return dy, d_weight, dz, out


def gated_rms_norm_backward(dout, y, z, weight, rstd, *, group_size=None, norm_before_gate=True,
                            recompute_output=False, dy=None, dz=None, out=None):
    """The gradients of normed = rmsnorm(y * silu(z)) * weight (norm_before_gate=False) or rmsnorm(y) * weight *
    silu(z) (True; without z, rmsnorm(y) * weight), each group of `group_size` channels (default: the whole row) by
    its own rstd. dout, y, z (rows, width), their channels contiguous, rows at any stride (z a view of in_proj's
    output); weight (width,); rstd (groups * rows,) float32 as mamba-ssm's `_layer_norm_fwd` keeps it (group g's row
    r at g * rows + r). dy, dz (and out, with recompute_output) are written where given (views of wider tensors
    allowed), else new. Returns (dy, dweight, dz or None without z, the recomputed output or None); dweight in the
    weight's dtype. On CUDA with Triton by `launch_gated_rms_norm_backward` (`DEFAULT_LAUNCH`), else by the
    reference."""
    if triton is None or not y.is_cuda:
        return gated_rms_norm_backward_reference(
            dout, y, z, weight, rstd, group_size=group_size, norm_before_gate=norm_before_gate,
            recompute_output=recompute_output, dy=dy, dz=dz, out=out)
    group_size = _check(dout, y, z, weight, rstd, group_size, recompute_output, dy, dz, out)
    return launch_gated_rms_norm_backward(dout, y, z, weight, rstd, group_size=group_size,
                                          norm_before_gate=norm_before_gate, recompute_output=recompute_output,
                                          dy=dy, dz=dz, out=out)


def launch_gated_rms_norm_backward(dout, y, z, weight, rstd, *, group_size=None, norm_before_gate=True,
                                   recompute_output=False, dy=None, dz=None, out=None, launch=DEFAULT_LAUNCH):
    """The kernel under `launch` (a `NormLaunch`), without the checks (the benchmark's sweep and the interpreter
    tests call it; on the CPU, under Triton's interpreter, one multiprocessor). Arguments and returns as
    `gated_rms_norm_backward`'s."""
    rows, width = y.shape
    group_size = width if group_size is None else group_size
    groups = width // group_size
    dy, dz, out = _outputs(y, z, recompute_output, dy, dz, out)
    if rows == 0:
        return dy, torch.zeros_like(weight), dz, out
    multiprocessors = torch.cuda.get_device_properties(y.device).multi_processor_count if y.is_cuda else 1
    rows_per_tile = launch.rows_per_tile
    # The programs of each group: as many as the launch asks for over all groups, at most one per tile; each takes
    # consecutive rows in whole tiles, so that only the last program's last tile is partial.
    programs = max(1, min(triton.cdiv(rows, rows_per_tile),
                          triton.cdiv(launch.programs_per_multiprocessor * multiprocessors, groups)))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), rows_per_tile) * rows_per_tile
    programs = triton.cdiv(rows, rows_per_program)
    d_weight_parts = torch.empty(programs, width, device=y.device, dtype=torch.float32)
    # Triton's interpreter takes no None for a pointer: without z (or without the output), y stands in, never read.
    with on_device_of(y):
        _gated_rms_norm_backward_kernel[(programs, groups)](
            dout, y, y if z is None else z, weight, rstd, dy, y if dz is None else dz, y if out is None else out,
            d_weight_parts, rows, group_size, rows_per_program, dout.stride(0), y.stride(0),
            0 if z is None else z.stride(0), dy.stride(0), 0 if dz is None else dz.stride(0),
            0 if out is None else out.stride(0), HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate,
            RECOMPUTE_OUTPUT=recompute_output, BLOCK_M=rows_per_tile, BLOCK_N=triton.next_power_of_2(group_size),
            NUM_STAGES=launch.num_stages, num_warps=launch.num_warps,
        )
    return dy, d_weight_parts.sum(0).to(weight.dtype), dz, out


__all__ = ["DEFAULT_LAUNCH", "NormLaunch", "gated_rms_norm_backward", "gated_rms_norm_backward_reference",
           "launch_gated_rms_norm_backward"]

if triton is not None:

    @triton.jit
    def _gated_rms_norm_backward_kernel(
            dout_ptr, y_ptr, z_ptr, weight_ptr, rstd_ptr, dy_ptr, dz_ptr, out_ptr, d_weight_parts_ptr, rows,
            group_size, rows_per_program, dout_stride, y_stride, z_stride, dy_stride, dz_stride, out_stride,
            HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, RECOMPUTE_OUTPUT: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
        # Program (p, g) walks rows [p * rows_per_program, ...) of group g, BLOCK_M rows a tile. For a row, with
        # x = y * silu(z) (gate first) or y, xhat = x * rstd and dn the gradient reaching xhat * weight
        # (dout, or dout * silu(z) with the gate after the norm):
        #   dx = rstd * (dn * w - xhat * mean(dn * w * xhat)),   dweight += dn * xhat,
        # and z's gradient through silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))).
        program, group = tl.program_id(0), tl.program_id(1)
        width = group_size * tl.num_programs(1)
        in_group = tl.arange(0, BLOCK_N)
        inside = in_group < group_size
        columns = (group * group_size + in_group)[None, :]  # (1, BLOCK_N)
        weight = tl.load(weight_ptr + columns, mask=inside[None, :], other=0.0).to(tl.float32)
        d_weight = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # reduced over the tile's rows once, at the end
        first_row = program * rows_per_program
        end_row = tl.minimum(first_row + rows_per_program, rows)
        for start in tl.range(first_row, end_row, BLOCK_M, num_stages=NUM_STAGES):
            row = start + tl.arange(0, BLOCK_M)[:, None]  # (BLOCK_M, 1)
            in_rows = row < end_row
            valid = in_rows & inside[None, :]
            row = row.to(tl.int64)  # rows x in_proj's stride pass 2**31 at long sequences
            d_normed = tl.load(dout_ptr + row * dout_stride + columns, mask=valid, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * y_stride + columns, mask=valid, other=0.0).to(tl.float32)
            # A row past the end gets rstd 0: its xhat, dx and weight gradient are 0.
            rstd = tl.load(rstd_ptr + group * rows + row, mask=in_rows, other=0.0)
            if HAS_Z:
                z = tl.load(z_ptr + row * z_stride + columns, mask=valid, other=0.0).to(tl.float32)
                sigmoid = tl.sigmoid(z)
                silu = z * sigmoid
                dsilu = sigmoid * (1 + z * (1 - sigmoid))
            if HAS_Z and not NORM_BEFORE_GATE:
                xhat = y * silu * rstd
            else:
                xhat = y * rstd
            normed = xhat * weight
            if HAS_Z and NORM_BEFORE_GATE:
                if RECOMPUTE_OUTPUT:
                    tl.store(out_ptr + row * out_stride + columns, (normed * silu).to(out_ptr.dtype.element_ty),
                             mask=valid)
                d_gate = d_normed * normed * dsilu
                tl.store(dz_ptr + row * dz_stride + columns, d_gate.to(dz_ptr.dtype.element_ty), mask=valid)
                d_normed = d_normed * silu
            elif RECOMPUTE_OUTPUT:
                tl.store(out_ptr + row * out_stride + columns, normed.to(out_ptr.dtype.element_ty), mask=valid)
            d_weight += d_normed * xhat
            g = d_normed * weight
            dx = (g - xhat * (tl.sum(g * xhat, axis=1) / group_size)[:, None]) * rstd
            if HAS_Z and not NORM_BEFORE_GATE:
                d_gate = dx * y * dsilu
                tl.store(dz_ptr + row * dz_stride + columns, d_gate.to(dz_ptr.dtype.element_ty), mask=valid)
                dx = dx * silu
            tl.store(dy_ptr + row * dy_stride + columns, dx.to(dy_ptr.dtype.element_ty), mask=valid)
        tl.store(d_weight_parts_ptr + program * width + columns, tl.sum(d_weight, axis=0)[None, :],
                 mask=inside[None, :])
