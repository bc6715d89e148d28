"""The memory-bound operations around a block's mixer and MLP, each one Triton kernel on CUDA, with its PyTorch
reference:

| operation                                    | reference                                       | used by            |
|----------------------------------------------|-------------------------------------------------|--------------------|
| `add_time_reversed(a, b)`                    | `a + reverse_time(b)`                           | the bidirectional  |
|                                              |                                                 | mixer's output     |
| `both_reading_orders(x)` (its backward)      | `(x, reverse_time(x))`: backward, autograd's    | the bidirectional  |
|                                              | `grad + reverse_time(grad_reversed)`            | mixer's input      |
| `add_rms_norm(residual, update, norm, b, s)` | `h = residual + s * (update + reverse_time(b))` | the block, after   |
|                                              | `return h, norm(h)`                             | its mixer          |
| `swiglu(gate, up)`                           | `F.silu(gate) * up`                             | the SwiGLU MLP     |
| `swiglu_of_product(gate_up)`                 | `swiglu(*gate_up.chunk(2, -1))`                 | the SwiGLU MLP, its|
|                                              |                                                 | gate and up as one |
|                                              |                                                 | product            |
| `rotary(query, key, cos, sin)`               | `x * cos + rotate_half(x) * sin`, for x = query | attention's queries|
|                                              | and key                                         | and keys           |

Unfused, each is several kernels with intermediate tensors between them (the reversed copy, the direction sum, the
residual stream read again by the norm, the activation); fused, each reads its inputs once and writes its outputs
once. Timings against the unfused forms are in benchmarks/results/elementwise_fusion.json (the rotary embedding's in
benchmarks/results/training_fusions_rotary.json).

Each function takes `use_kernel`, the choice of `kernel_policy.KernelPolicy` (on CUDA with Triton installed): with it,
the kernel runs where it applies (tensors of one shape and dtype, laid out as it reads them), and the reference
everywhere else. The residual add + norm and the SwiGLU of one product have a backward kernel of their own
(`AddRMSNorm`, `SwiGLUOfProduct`), and so has the rotary embedding (`Rotary`, whose backward is the same kernel turning
the other way), so training runs them too; the mixer's two reading orders are a copy whose backward is the direction
sum's kernel (`BothReadingOrders`); the direction sum and `swiglu` of two tensors have no backward and take no tensor
needing a gradient (the reference carries it). The kernels compute in float32 and round once, where
the references round after each operation.
"""

import torch
import torch.nn.functional as F

from .cuda_device import on_device_of
from .mamba_ops import is_plain_module, needs_gradient, reverse_time

try:  # installed with mamba-ssm (and by PyTorch's CUDA wheels); without it, the references
    import triton
    import triton.language as tl
except ImportError:
    triton = None
TRITON_INSTALLED = triton is not None

BLOCK = 4096  # elements per program of the elementwise kernels
MAX_NORM_WIDTH = 8192  # the norm kernel holds one row in registers
BACKWARD_PROGRAMS = 1024  # the norm's backward: at most this many programs, each summing its rows' weight gradient


def add_time_reversed_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b reversed along the time axis (dim 1), for (B, L, D) tensors."""
    return a + reverse_time(b)


def add_rms_norm_reference(residual, update, norm, time_reversed=None, scale=1.0, norm_kwargs=None):
    """hidden = residual + scale * (update + reverse_time(time_reversed)) for (B, L, D) tensors (time_reversed may
    be None), and norm(hidden, **norm_kwargs): the residual stream after a mixer, and the next norm's output."""
    if time_reversed is not None:
        update = add_time_reversed_reference(update, time_reversed)
    if scale != 1.0:
        update = update * scale
    hidden = residual + update
    return hidden, norm(hidden, **(norm_kwargs or {}))


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for tensors of one shape."""
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1], the halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(query, key, cos, sin):
    """The rotary embedding of query (B, H, L, d) and key (B, Hkv, L, d) at angles whose cos and sin are (B, L, d)."""
    cos, sin = cos[:, None], sin[:, None]
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


def _fused(*tensors: torch.Tensor, differentiable: bool = False) -> bool:
    """Whether a kernel applies: tensors of one shape and dtype, each contiguous, none needing a gradient unless the
    kernel has a backward (`differentiable`)."""
    first = tensors[0]
    return (
        all(t.is_contiguous() for t in tensors)
        and all(t.shape == first.shape and t.dtype == first.dtype for t in tensors)
        and (differentiable or not needs_gradient(*tensors))
    )


def _row_stride(t: torch.Tensor):
    """The distance between the rows (last axis) of t if that axis is contiguous and the rows evenly spaced, as in a
    contiguous tensor or a column slice of one; else None."""
    if t.dim() < 2 or t.stride(-1) != 1:
        return None
    expected = row_stride = t.stride(-2)
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size > 1 and stride != expected:
            return None
        expected *= size
    return row_stride


def add_time_reversed(a: torch.Tensor, b: torch.Tensor, use_kernel: bool = False) -> torch.Tensor:
    """a + b reversed along the time axis (dim 1), for (B, L, D) tensors: one kernel where `use_kernel` and
    `_fused`, else the reference."""
    if not use_kernel or a.dim() != 3 or not _fused(a, b):
        return add_time_reversed_reference(a, b)
    return launch_add_time_reversed(a, b)


def both_reading_orders(x: torch.Tensor, use_kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, x reversed along the time axis): the inputs of a bidirectional mixer's two directions, for (B, L, D)
    tensors. Where a gradient is needed, `use_kernel` and `_fused`, as `BothReadingOrders`, whose backward sums the
    two gradients in one kernel (`add_time_reversed`), where autograd would reverse one and add them: two kernels and
    a tensor between them, at every bidirectional layer of a training step."""
    if not use_kernel or x.dim() != 3 or not needs_gradient(x) or not _fused(x, differentiable=True):
        return x, reverse_time(x)
    return BothReadingOrders.apply(x)


class BothReadingOrders(torch.autograd.Function):
    """`both_reading_orders` for training: the reversed copy forward; backward, the first output's gradient plus the
    second's reversed, one kernel where both are given and laid out for it."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)  # an output that nothing read gives its gradient as None, not zeros
        return x.view_as(x), reverse_time(x)

    @staticmethod
    def backward(ctx, grad, grad_reversed):
        if grad is None or grad_reversed is None:
            return grad if grad_reversed is None else reverse_time(grad_reversed)
        return add_time_reversed(grad, grad_reversed, use_kernel=True)


def add_rms_norm(residual, update, norm, time_reversed=None, scale=1.0, use_kernel=False, norm_kwargs=None):
    """`add_rms_norm_reference` as one kernel where `use_kernel` and `_fused` (norm's weight included, of the same
    dtype, rows of at most MAX_NORM_WIDTH), else the reference; where a gradient is needed, as `AddRMSNorm`, whose
    backward is one kernel too. `norm` is an RMSNorm module: its `weight` and `variance_epsilon`, read directly only
    where it is plain (`is_plain_module`); a hooked one (offloaded) is called by the reference, with `norm_kwargs`."""
    tensors = [residual, update] + ([] if time_reversed is None else [time_reversed])
    if (not use_kernel or residual.dim() != 3 or residual.shape[-1] > MAX_NORM_WIDTH
            or not _fused(*tensors, differentiable=True) or not is_plain_module(norm, type(norm))
            or not _fused(norm.weight, differentiable=True) or norm.weight.dtype != residual.dtype):
        return add_rms_norm_reference(residual, update, norm, time_reversed, scale, norm_kwargs)
    if needs_gradient(*tensors, norm.weight):
        return AddRMSNorm.apply(residual, update, time_reversed, norm.weight, norm.variance_epsilon, scale)
    return launch_add_rms_norm(residual, update, norm.weight, norm.variance_epsilon, time_reversed, scale)


class AddRMSNorm(torch.autograd.Function):
    """`add_rms_norm_reference` for training: the forward kernel, which also keeps each row's 1 / rms, and a backward
    kernel that gives the gradients of the residual, the update and the time-reversed update (written reversed) in one
    pass, with the weight's gradient summed from each program's partial sum."""

    @staticmethod
    def forward(ctx, residual, update, time_reversed, weight, eps, scale):
        hidden, normed, rstd = launch_add_rms_norm(residual, update, weight, eps, time_reversed, scale, keep_rstd=True)
        ctx.save_for_backward(hidden, weight, rstd)
        ctx.scale, ctx.mirrored = scale, time_reversed is not None
        return hidden, normed

    @staticmethod
    def backward(ctx, d_hidden, d_normed):
        hidden, weight, rstd = ctx.saved_tensors
        d_residual, d_update, d_mirrored, d_weight = launch_add_rms_norm_backward(
            hidden, weight, rstd, d_hidden.contiguous(), d_normed.contiguous(), ctx.scale, ctx.mirrored
        )
        return d_residual, d_update, d_mirrored, d_weight, None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, use_kernel: bool = False) -> torch.Tensor:
    """`swiglu_reference`: one kernel where `use_kernel` and `_fused`, else the reference."""
    if not use_kernel or not _fused(gate, up):
        return swiglu_reference(gate, up)
    return launch_swiglu(gate, up)


def swiglu_of_product(gate_up: torch.Tensor, use_kernel: bool = False) -> torch.Tensor:
    """`swiglu` of the two halves of one product's output, gate_up (..., 2 * W) -> (..., W): one kernel where
    `use_kernel` and gate_up is contiguous; where a gradient is needed, as `SwiGLUOfProduct`, whose backward writes
    the gradient of gate_up in one buffer (the halves' own gradients would be concatenated by a copy); else the
    reference."""
    gate, up = gate_up.chunk(2, dim=-1)
    if not use_kernel or not _fused(gate_up, differentiable=True):
        return swiglu_reference(gate, up)
    if needs_gradient(gate_up):
        return SwiGLUOfProduct.apply(gate_up)
    return launch_swiglu(gate, up)


class SwiGLUOfProduct(torch.autograd.Function):
    """`swiglu_of_product` for training: the forward kernel, and a backward kernel that recomputes silu(gate) from
    the kept gate_up (no activation is kept) and writes both halves' gradients in one pass."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return launch_swiglu(*gate_up.chunk(2, dim=-1))

    @staticmethod
    def backward(ctx, d_out):
        (gate_up,) = ctx.saved_tensors
        return launch_swiglu_backward(gate_up, d_out.contiguous())


def rotary(query, key, cos, sin, use_kernel: bool = False):
    """`rotary_reference` as one kernel where `use_kernel` and query and key are the heads of projections laid out
    (B, L, heads, d) and seen (B, heads, L, d), as the attention makes them, with cos and sin (B, L, d) of one float
    dtype whose last axis is contiguous; where a gradient is needed, as `Rotary`; else the reference. Returned as the
    reference returns them, (B, heads, L, d) views of (B, L, heads, d) tensors of the reference's dtype."""
    query_rows, key_rows = query.transpose(1, 2), key.transpose(1, 2)  # (B, L, heads, d)
    if (not use_kernel or not query_rows.is_contiguous() or not key_rows.is_contiguous()
            or query.dtype != key.dtype or cos.dtype != sin.dtype or cos.shape != sin.shape
            or cos.shape != (query.shape[0], query.shape[2], query.shape[3]) or key.shape[2:] != query.shape[2:]
            or cos.stride(-1) != 1 or sin.stride() != cos.stride() or needs_gradient(cos, sin)):
        return rotary_reference(query, key, cos, sin)
    if needs_gradient(query, key):
        query_rows, key_rows = Rotary.apply(query_rows, key_rows, cos, sin)
    else:
        query_rows, key_rows = launch_rotary(query_rows, key_rows, cos, sin)
    return query_rows.transpose(1, 2), key_rows.transpose(1, 2)


class Rotary(torch.autograd.Function):
    """`rotary` for training, on (B, L, heads, d) rows: the rotation's gradient is the rotation by the opposite angles,
    the same kernel (`inverse`) on the outputs' gradients."""

    @staticmethod
    def forward(ctx, query_rows, key_rows, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.input_dtype = query_rows.dtype
        return launch_rotary(query_rows, key_rows, cos, sin)

    @staticmethod
    def backward(ctx, d_query, d_key):
        cos, sin = ctx.saved_tensors
        d_query, d_key = launch_rotary(d_query.contiguous(), d_key.contiguous(), cos, sin, inverse=True,
                                       out_dtype=ctx.input_dtype)
        return d_query, d_key, None, None


def launch_add_time_reversed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The kernel of `add_time_reversed`, without the checks (the interpreter tests call it on CPU tensors)."""
    out = torch.empty_like(a)
    with on_device_of(a):
        _add_time_reversed_kernel[(triton.cdiv(a.numel(), BLOCK),)](
            a, b, out, a.numel(), a.shape[1], a.shape[2], BLOCK=BLOCK)
    return out


def _norm_warps(block: int) -> int:
    """Warps for a norm kernel's program over one row of `block` columns: one per 256 columns, 1 to 8."""
    return min(max(block // 256, 1), 8)


def launch_add_rms_norm(residual, update, weight, eps, time_reversed=None, scale=1.0, keep_rstd=False):
    """The kernel of `add_rms_norm`, without the checks: one program per row (token). With `keep_rstd`, also returns
    each row's 1 / rms (float32, (B * L,)), which the backward reads."""
    hidden, normed = torch.empty_like(residual), torch.empty_like(residual)
    rows, width = residual.shape[0] * residual.shape[1], residual.shape[-1]
    rstd = torch.empty(rows if keep_rstd else 1, device=residual.device, dtype=torch.float32)
    block = triton.next_power_of_2(width)
    mirrored = update if time_reversed is None else time_reversed  # not read without HAS_MIRRORED
    with on_device_of(residual):
        _add_rms_norm_kernel[(rows,)](
            residual, update, mirrored, weight, hidden, normed, rstd, residual.shape[1], width, eps, scale,
            HAS_MIRRORED=time_reversed is not None, KEEP_RSTD=keep_rstd, BLOCK=block,
            num_warps=_norm_warps(block),
        )
    return (hidden, normed, rstd) if keep_rstd else (hidden, normed)


def launch_add_rms_norm_backward(hidden, weight, rstd, d_hidden, d_normed, scale, mirrored: bool):
    """The backward kernel of `AddRMSNorm`: (d_residual, d_update, d_time_reversed or None, d_weight) from the
    forward's hidden (B, L, W), weight, rstd and the gradients of its two outputs (contiguous). Programs take
    `rows_per_program` consecutive rows each and write their partial sums of the weight's gradient, summed here."""
    rows, width = hidden.shape[0] * hidden.shape[1], hidden.shape[-1]
    rows_per_program = triton.cdiv(rows, BACKWARD_PROGRAMS)
    programs = triton.cdiv(rows, rows_per_program)
    d_residual, d_update = torch.empty_like(hidden), torch.empty_like(hidden)
    d_mirrored = torch.empty_like(hidden) if mirrored else None
    d_weight_parts = torch.empty(programs, width, device=hidden.device, dtype=torch.float32)
    block = triton.next_power_of_2(width)
    with on_device_of(hidden):
        _add_rms_norm_backward_kernel[(programs,)](
            hidden, weight, rstd, d_hidden, d_normed, d_residual, d_update,
            d_update if d_mirrored is None else d_mirrored, d_weight_parts, rows, hidden.shape[1], width, scale,
            rows_per_program, HAS_MIRRORED=mirrored, BLOCK=block, num_warps=_norm_warps(block),
        )
    return d_residual, d_update, d_mirrored, d_weight_parts.sum(0).to(weight.dtype)


def launch_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The kernel of `swiglu` and `swiglu_of_product`, without the checks: gate and up contiguous, or the two halves
    of one contiguous product's output; out contiguous."""
    width = gate.shape[-1]
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    with on_device_of(gate):
        _swiglu_kernel[(triton.cdiv(out.numel(), BLOCK),)](
            gate, up, out, out.numel(), width, _row_stride(gate), BLOCK=BLOCK)
    return out


def launch_swiglu_backward(gate_up: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
    """The backward kernel of `SwiGLUOfProduct`: the gradient of contiguous gate_up (..., 2 * W) from that of the
    output, d_out (..., W), contiguous."""
    d_gate_up = torch.empty_like(gate_up)
    grid = (triton.cdiv(d_out.numel(), BLOCK),)
    with on_device_of(gate_up):
        _swiglu_backward_kernel[grid](gate_up, d_out, d_gate_up, d_out.numel(), d_out.shape[-1], BLOCK=BLOCK)
    return d_gate_up


def launch_rotary(query_rows, key_rows, cos, sin, inverse: bool = False, out_dtype=None):
    """The kernel of `rotary`, without the checks: query_rows (B, L, H, d) and key_rows (B, L, Hkv, d) contiguous, cos
    and sin (B, L, d) with the same strides, the last contiguous. One program per (b, t) rotates all its heads. With
    `inverse`, by the opposite angles (the transpose of the rotation, which `Rotary`'s backward applies). The outputs
    are of `out_dtype`, by default the reference's: that of query and cos promoted (float32 for bf16 projections and
    float32 angles, as under autocast)."""
    batch, seqlen, heads, head_dim = query_rows.shape
    out_dtype = out_dtype or torch.promote_types(query_rows.dtype, cos.dtype)
    query_out = torch.empty_like(query_rows, dtype=out_dtype)
    key_out = torch.empty_like(key_rows, dtype=out_dtype)
    if batch * seqlen == 0:
        return query_out, key_out
    with on_device_of(query_rows):
        _rotary_kernel[(batch * seqlen,)](
            query_rows, key_rows, cos, sin, query_out, key_out, seqlen, cos.stride(0), cos.stride(1), heads,
            key_rows.shape[2], head_dim // 2, INVERSE=inverse, QUERY_HEADS=triton.next_power_of_2(heads),
            KEY_HEADS=triton.next_power_of_2(key_rows.shape[2]), HALF=triton.next_power_of_2(head_dim // 2),
        )
    return query_out, key_out


__all__ = [
    "AddRMSNorm",
    "BothReadingOrders",
    "Rotary",
    "SwiGLUOfProduct",
    "TRITON_INSTALLED",
    "add_rms_norm",
    "add_rms_norm_reference",
    "add_time_reversed",
    "add_time_reversed_reference",
    "both_reading_orders",
    "launch_add_rms_norm",
    "launch_add_rms_norm_backward",
    "launch_add_time_reversed",
    "launch_rotary",
    "launch_swiglu",
    "launch_swiglu_backward",
    "rotary",
    "rotary_reference",
    "rotate_half",
    "swiglu",
    "swiglu_of_product",
    "swiglu_reference",
]

if triton is not None:

    @triton.jit
    def _add_time_reversed_kernel(a_ptr, b_ptr, out_ptr, numel, seqlen, width, BLOCK: tl.constexpr):
        # out[n, t, c] = a[n, t, c] + b[n, seqlen - 1 - t, c] for contiguous (N, seqlen, width) tensors.
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        position = (offsets // width) % seqlen
        mirrored = offsets + (seqlen - 1 - 2 * position) * width
        a = tl.load(a_ptr + offsets, mask=inside)
        b = tl.load(b_ptr + mirrored, mask=inside)
        tl.store(out_ptr + offsets, a + b, mask=inside)

    @triton.jit
    def _add_rms_norm_kernel(residual_ptr, update_ptr, mirrored_ptr, weight_ptr, hidden_ptr, normed_ptr, rstd_ptr,
                             seqlen, width, eps, scale, HAS_MIRRORED: tl.constexpr, KEEP_RSTD: tl.constexpr,
                             BLOCK: tl.constexpr):
        # Row r = n * seqlen + t of contiguous (N, seqlen, width) tensors:
        # hidden[r] = residual[r] + scale * (update[r] + mirrored[n * seqlen + seqlen - 1 - t]),
        # normed[r] = hidden[r] / rms(hidden[r]) * weight, the norm of hidden as stored (rounded), as the reference;
        # rstd[r] = 1 / rms(hidden[r]) with KEEP_RSTD.
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        update = tl.load(update_ptr + row * width + columns, mask=inside, other=0.0).to(tl.float32)
        if HAS_MIRRORED:
            mirrored_row = row + seqlen - 1 - 2 * (row % seqlen)
            update += tl.load(mirrored_ptr + mirrored_row * width + columns, mask=inside, other=0.0).to(tl.float32)
        residual = tl.load(residual_ptr + row * width + columns, mask=inside, other=0.0).to(tl.float32)
        hidden = (residual + scale * update).to(hidden_ptr.dtype.element_ty)
        tl.store(hidden_ptr + row * width + columns, hidden, mask=inside)
        hidden = hidden.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(hidden * hidden, axis=0) / width + eps)
        if KEEP_RSTD:
            tl.store(rstd_ptr + row, rstd)
        weight = tl.load(weight_ptr + columns, mask=inside, other=0.0).to(tl.float32)
        tl.store(normed_ptr + row * width + columns, (hidden * rstd * weight).to(normed_ptr.dtype.element_ty),
                 mask=inside)

    @triton.jit
    def _add_rms_norm_backward_kernel(hidden_ptr, weight_ptr, rstd_ptr, d_hidden_ptr, d_normed_ptr, d_residual_ptr,
                                      d_update_ptr, d_mirrored_ptr, d_weight_parts_ptr, rows, seqlen, width, scale,
                                      rows_per_program, HAS_MIRRORED: tl.constexpr, BLOCK: tl.constexpr):
        # For each row r of this program, with x = hidden[r] * rstd[r] and g = d_normed[r] * weight:
        # d_residual[r] = d_hidden[r] + rstd[r] * (g - x * mean(g * x)), the gradient of hidden as a whole;
        # d_update[r] = scale * d_residual[r], also written to row r's mirror in d_mirrored (HAS_MIRRORED);
        # d_weight_parts[program] = the sum over its rows of d_normed[r] * x.
        program = tl.program_id(0)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        weight = tl.load(weight_ptr + columns, mask=inside, other=0.0).to(tl.float32)
        d_weight = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, rows_per_program):
            row = program.to(tl.int64) * rows_per_program + i
            valid = columns < tl.where(row < rows, width, 0)  # no column of a row past the end
            offsets = row * width + columns
            x = tl.load(hidden_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + tl.minimum(row, rows - 1))  # a row past the end is masked out everywhere else
            x = x * rstd
            d_normed = tl.load(d_normed_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            g = d_normed * weight
            d_hidden = rstd * (g - x * (tl.sum(g * x, axis=0) / width))
            d_hidden += tl.load(d_hidden_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            d_weight += d_normed * x
            tl.store(d_residual_ptr + offsets, d_hidden.to(d_residual_ptr.dtype.element_ty), mask=valid)
            d_update = (d_hidden * scale).to(d_update_ptr.dtype.element_ty)
            tl.store(d_update_ptr + offsets, d_update, mask=valid)
            if HAS_MIRRORED:
                mirrored_row = row + seqlen - 1 - 2 * (row % seqlen)
                tl.store(d_mirrored_ptr + mirrored_row * width + columns, d_update, mask=valid)
        tl.store(d_weight_parts_ptr + program * width + columns, d_weight, mask=inside)

    @triton.jit
    def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, numel, width, row_stride, BLOCK: tl.constexpr):
        # out[r, c] = silu(gate[r, c]) * up[r, c] for contiguous (rows, width) out, and gate and up whose rows lie
        # row_stride elements apart (width when contiguous, 2 * width for the halves of one product's output).
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        in_offsets = (offsets // width) * row_stride + offsets % width
        gate = tl.load(gate_ptr + in_offsets, mask=inside).to(tl.float32)
        up = tl.load(up_ptr + in_offsets, mask=inside).to(tl.float32)
        tl.store(out_ptr + offsets, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _swiglu_backward_kernel(gate_up_ptr, d_out_ptr, d_gate_up_ptr, numel, width, BLOCK: tl.constexpr):
        # For out[r, c] = silu(g) * u with g = gate_up[r, c], u = gate_up[r, width + c] (contiguous (rows, 2 * width))
        # and d = d_out[r, c] (contiguous (rows, width)): d_gate_up[r, c] = d * u * silu'(g), where
        # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))), and d_gate_up[r, width + c] = d * silu(g).
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        gate_offsets = (offsets // width) * 2 * width + offsets % width
        gate = tl.load(gate_up_ptr + gate_offsets, mask=inside).to(tl.float32)
        up = tl.load(gate_up_ptr + gate_offsets + width, mask=inside).to(tl.float32)
        d_out = tl.load(d_out_ptr + offsets, mask=inside).to(tl.float32)
        sigmoid = tl.sigmoid(gate)
        d_gate = d_out * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        tl.store(d_gate_up_ptr + gate_offsets, d_gate.to(d_gate_up_ptr.dtype.element_ty), mask=inside)
        tl.store(d_gate_up_ptr + gate_offsets + width, (d_out * gate * sigmoid).to(d_gate_up_ptr.dtype.element_ty),
                 mask=inside)

    @triton.jit
    def _rotate_rows(in_ptr, out_ptr, row, heads, half, c1, c2, s1, s2, INVERSE: tl.constexpr, HEADS: tl.constexpr,
                     HALF: tl.constexpr):
        # Row `row` (heads, 2 * half) of a contiguous (rows, heads, 2 * half) tensor, halves x1 and x2 of each head:
        # out = [x1 c1 - x2 s1, x2 c2 + x1 s2], or with INVERSE the transpose, [x1 c1 + x2 s2, x2 c2 - x1 s1].
        head = tl.arange(0, HEADS)[:, None]
        column = tl.arange(0, HALF)[None, :]
        inside = (head < heads) & (column < half)
        offsets = row * heads * 2 * half + head * 2 * half + column
        x1 = tl.load(in_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(in_ptr + offsets + half, mask=inside, other=0.0).to(tl.float32)
        if INVERSE:
            y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
        else:
            y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        tl.store(out_ptr + offsets, y1.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(out_ptr + offsets + half, y2.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rotary_kernel(query_ptr, key_ptr, cos_ptr, sin_ptr, query_out_ptr, key_out_ptr, seqlen, angle_stride_batch,
                       angle_stride_time, query_heads, key_heads, half, INVERSE: tl.constexpr,
                       QUERY_HEADS: tl.constexpr, KEY_HEADS: tl.constexpr, HALF: tl.constexpr):
        # Program r = b * seqlen + t: the angles of (b, t), read once, turn every query and key head of that row.
        row = tl.program_id(0).to(tl.int64)
        column = tl.arange(0, HALF)[None, :]
        angles = (row // seqlen) * angle_stride_batch + (row % seqlen) * angle_stride_time + column
        inside = column < half
        c1 = tl.load(cos_ptr + angles, mask=inside, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + angles + half, mask=inside, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + angles, mask=inside, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + angles + half, mask=inside, other=0.0).to(tl.float32)
        _rotate_rows(query_ptr, query_out_ptr, row, query_heads, half, c1, c2, s1, s2, INVERSE, QUERY_HEADS, HALF)
        _rotate_rows(key_ptr, key_out_ptr, row, key_heads, half, c1, c2, s1, s2, INVERSE, KEY_HEADS, HALF)
