# Generated from src/diffuapriel_hf/fused_elementwise.py by `python -m diffuapriel_hf.hub bundle modeling`: do not edit.
# Hub remote code of DiffuApriel: loads with trust_remote_code=True where diffuapriel_hf is not installed.
"""Two memory-bound operations of a block, each one Triton kernel on CUDA for inference, with its PyTorch reference:

| operation                 | reference                  | used by                                              |
|---------------------------|----------------------------|------------------------------------------------------|
| `add_time_reversed(a, b)` | `a + reverse_time(b)`      | the bidirectional mixer, to sum its two directions   |
| `silu_mul(gate, up)`      | `F.silu(gate) * up`        | the SwiGLU MLP                                       |

Unfused, each is two kernels with an intermediate tensor between them (the reversed copy, the activation); fused,
each reads its inputs once and writes its output once. At 64K tokens x 2048 channels in bf16 on an H200: 0.212 vs
0.360 ms and 0.208 vs 0.332 ms per call (benchmarks/results/elementwise_fusion.json).

The kernels have no backward: they run where no gradient is needed, on contiguous CUDA tensors of one shape and
dtype, and the references run everywhere else (CPU, training, Triton not installed).
"""

import torch
import torch.nn.functional as F

from .mamba_ops import reverse_time

try:  # installed with mamba-ssm (and by PyTorch's CUDA wheels); without it, the references
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 4096  # elements per program


def add_time_reversed_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b reversed along the time axis (dim 1), for (B, L, D) tensors."""
    return a + reverse_time(b)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _fused(*tensors: torch.Tensor) -> bool:
    """Whether the kernel applies: Triton installed, contiguous CUDA tensors of one shape and dtype, no gradient."""
    first = tensors[0]
    return (
        triton is not None
        and first.is_cuda
        and all(t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    )


def add_time_reversed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b reversed along the time axis (dim 1), for (B, L, D) tensors: one kernel where `_fused`, else the
    reference."""
    if a.dim() != 3 or not _fused(a, b):
        return add_time_reversed_reference(a, b)
    return launch_add_time_reversed(a, b)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in float32 and rounded once: one kernel where `_fused`, else the reference."""
    if not _fused(gate, up):
        return silu_mul_reference(gate, up)
    return launch_silu_mul(gate, up)


def launch_add_time_reversed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The kernel of `add_time_reversed`, without the checks (the interpreter tests call it on CPU tensors)."""
    out = torch.empty_like(a)
    _add_time_reversed_kernel[(triton.cdiv(a.numel(), BLOCK),)](a, b, out, a.numel(), a.shape[1], a.shape[2],
                                                                 BLOCK=BLOCK)
    return out


def launch_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The kernel of `silu_mul`, without the checks."""
    out = torch.empty_like(gate)
    _silu_mul_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), BLOCK=BLOCK)
    return out


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
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        gate = tl.load(gate_ptr + offsets, mask=inside).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=inside).to(tl.float32)
        tl.store(out_ptr + offsets, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=inside)
