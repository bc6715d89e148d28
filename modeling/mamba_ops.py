"""The fused operations of a Mamba-2 mixer, each as a pure-PyTorch reference with the signature of the
kernel that replaces it on CUDA:

| operation                  | kernel                                                           |
|----------------------------|------------------------------------------------------------------|
| `mamba_chunk_scan_combined`| `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`    |
| `causal_conv1d_fn`         | `causal_conv1d.causal_conv1d_fn`                                 |
| `rmsnorm_fn` (gated)       | `mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn`                |
| `chunk_state`              | `mamba_ssm.ops.triton.ssd_chunk_state.chunk_state`               |
| `chunk_scan_from_states`   | `mamba_ssm.ops.triton.ssd_chunk_scan.chunk_scan`                 |
| `state_passing`            | `mamba_ssm.ops.triton.ssd_state_passing.state_passing`           |

In training, a mixer pass with no padding and no state in or out runs a fourth: the three above and out_proj as one
autograd function (`mamba_split_conv1d_scan`: `mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined`),
whose backward writes the gradient of in_proj's output in one buffer (not the concatenation of its parts') and
recomputes the convolution rather than keeping it.

For inference with at least as many (sequence, head) pairs as the GPU has multiprocessors, or one sequence long
enough to be cut into segments walked in parallel, the SSD takes our own single-pass Triton kernel instead
(`ssd_triton.ssd_forward`, same signature), which is faster there; mamba-ssm's for training and elsewhere.

`kernel_policy.resolve_kernel_policy` makes the choice once per forward: `kernel_ops()` on CUDA when kernels are
wanted and the packages import, `TORCH_OPS` otherwise. Both compute in float32 and return the input dtype. The kernel
packages are imported lazily, inside `try`, so that importing this module never fails without them.
"""

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[..., i, j] = sum(x[..., j+1 : i+1]) for j <= i and -inf above the diagonal.

    Built from a masked cumulative sum rather than a difference of two cumulative sums, which loses precision."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)  # (..., T, T): x[..., i, j] = x_i
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0)
    segsum = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return segsum.masked_fill(~lower, -math.inf)


def mamba_chunk_scan_combined_reference(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, dt_softplus=False,
    dt_limit=(0.0, float("inf")), return_final_states=False,
):
    """Chunked SSD ("SSD minimal"): y_t = sum_{s<=t} C_t^T (prod_{s<r<=t} exp(dt_r A)) B_s dt_s x_s + D x_t.

    x: (b, l, h, p), dt: (b, l, h), A: (h,), B and C: (b, l, g, n), D: (h,) or (h, p), z: (b, l, h, p),
    initial_states: (b, h, p, n), seq_idx: (b, l) int, the document of each position of rows that pack several
    (non-decreasing along a row): the sum then runs over the positions s of t's own document only, and the initial
    state enters the first document only. Returns y (b, l, h, p) in x's dtype, and the final state (b, h, p, n) in
    float32 when asked. Work and memory are linear in l: the quadratic part is confined to chunks of `chunk_size`.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    out_dtype = x.dtype
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    # Heads share B and C within a group: C_t . B_s is computed once per group, and the heads' decays and inputs
    # are laid out (group, head within the group).
    per_group = nheads // ngroups

    # Pad to whole chunks: a padded step has dt = 0, so it neither decays the state nor adds to it.
    pad = -seqlen % chunk_size
    x_dt = x * dt[..., None]
    if pad:
        x_dt, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x_dt, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nchunks = (seqlen + pad) // chunk_size
    chunked = lambda t: t.reshape(batch, nchunks, chunk_size, *t.shape[2:])  # noqa: E731
    x_dt, B, C = chunked(x_dt), chunked(B), chunked(C)  # (b, c, q, h, p), (b, c, q, g, n)
    x_dt = x_dt.unflatten(3, (ngroups, per_group))  # (b, c, q, g, r, p)
    A_dt = (chunked(dt) * A.float()).permute(0, 3, 1, 2)  # (b, h, c, q)
    A_cumsum = torch.cumsum(A_dt, dim=-1)
    by_group = lambda t: t.unflatten(1, (ngroups, per_group))  # noqa: E731  (b, h, ...) -> (b, g, r, ...)
    # Documents (a padded position belongs to the last one): what the masks below keep within one.
    docs = None if seq_idx is None else chunked(F.pad(seq_idx[:, None].float(), (0, pad), mode="replicate")[:, 0])

    # 1. Within each chunk: the quadratic (attention-like) form.
    decay_within = torch.exp(segment_sum(A_dt))  # (b, h, c, q, q)
    if docs is not None:
        decay_within = decay_within * (docs[..., :, None] == docs[..., None, :])[:, None]
    scores = torch.einsum("bclgn,bcsgn->bgcls", C, B)[:, :, None] * by_group(decay_within)  # (b, g, r, c, q, q)
    y = torch.einsum("bgrcls,bcsgrp->bclgrp", scores, x_dt)

    # 2. The state each chunk adds, as seen at its end (from the positions of the document it ends in).
    decay_to_end = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # (b, h, c, q)
    if docs is not None:
        decay_to_end = decay_to_end * (docs == docs[..., -1:])[:, None]
    x_decayed = x_dt * by_group(decay_to_end).permute(0, 3, 4, 1, 2)[..., None]  # (b, c, q, g, r, p)
    chunk_states = torch.einsum("bclgn,bclgrp->bcgrpn", B, x_decayed).flatten(2, 3)  # (b, c, h, p, n)

    # 3. Carry the state across chunks: a recurrence with one step per chunk (not per token). Written as one product
    #    instead, it would need a (chunks x chunks) decay matrix, and memory would grow quadratically with length. A
    #    chunk that ends in another document than the one before it starts from nothing.
    chunk_decay = torch.exp(A_cumsum[..., -1])  # (b, h, c): the decay over each whole chunk
    if docs is not None:
        ended_before = torch.cat([docs[:, :1, 0], docs[:, :-1, -1]], dim=1)  # (b, c): the document entering each
        chunk_decay = chunk_decay * (ended_before == docs[..., -1])[:, None]
    state = torch.zeros_like(chunk_states[:, 0]) if initial_states is None else initial_states.float()  # (b, h, p, n)
    entering = []
    for chunk in range(nchunks):
        entering.append(state)
        state = state * chunk_decay[:, :, chunk, None, None] + chunk_states[:, chunk]
    states, final_state = torch.stack(entering, dim=1), state  # (b, c, h, p, n), (b, h, p, n)

    # 4. What the state entering each chunk contributes to its outputs (in the document it belongs to).
    y_from_state = torch.einsum("bclgn,bcgrpn->bclgrp", C, states.unflatten(2, (ngroups, per_group)))
    decay_from_start = by_group(torch.exp(A_cumsum)).permute(0, 3, 4, 1, 2)  # (b, c, q, g, r)
    if docs is not None:
        decay_from_start = decay_from_start * (docs == ended_before[..., None])[..., None, None]
    y = (y + y_from_state * decay_from_start[..., None]).flatten(3, 4)  # (b, c, q, h, p)

    y = y.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    if D is not None:
        D = D.float()
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(out_dtype)
    return (y, final_state) if return_final_states else y


def chunk_state_reference(B, x, dt, dA_cumsum, states_in_fp32=True):
    """The state each chunk leaves when it starts from zero: B (b, l, g, n), x (b, l, h, p), and per chunk of
    k = dt.shape[-1] positions dt (b, h, c, k) and dA_cumsum (b, h, c, k), the running sum of dt * A inside the chunk.
    states[b, c, h, p, n] = sum over the chunk's positions s of exp(dA_cumsum[.., -1] - dA_cumsum[.., s]) dt[s]
    x[s, h, p] B[s, g(h), n]; a last chunk past l reads zeros. -> (b, c, h, p, n), float32 (B's dtype without
    `states_in_fp32`)."""
    batch, seqlen, heads, head_dim = x.shape
    groups, chunks, chunk, out_dtype = B.shape[2], dt.shape[2], dt.shape[3], B.dtype
    pad = chunks * chunk - seqlen
    if pad < 0:
        raise ValueError(f"dt's {chunks} chunks of {chunk} positions do not cover the {seqlen} positions of x")
    x = F.pad(x.float(), (0, 0, 0, 0, 0, pad)).unflatten(1, (chunks, chunk))  # (b, c, k, h, p)
    B = F.pad(B.float(), (0, 0, 0, 0, 0, pad)).unflatten(1, (chunks, chunk))  # (b, c, k, g, n)
    B = B.repeat_interleave(heads // groups, dim=3)  # (b, c, k, h, n)
    dA_cumsum = dA_cumsum.float()
    weight = torch.exp(dA_cumsum[..., -1:] - dA_cumsum) * dt.float()  # (b, h, c, k)
    states = torch.einsum("bhck,bckhp,bckhn->bchpn", weight, x, B)
    return states if states_in_fp32 else states.to(out_dtype)


def chunk_scan_from_states_reference(B, C, x, dt, dA_cumsum, prev_states, D=None, z=None):
    """The SSD's output given the state entering each chunk, prev_states (b, c, h, p, n): each chunk of
    k = dt.shape[-1] positions read from its own entering state. B and C (b, l, g, n), x (b, l, h, p) with l = c * k;
    dt and dA_cumsum (b, h, c, k) as in `chunk_state_reference`. y_t = C_t exp(dA_cumsum_t) prev_state
    + sum over the chunk's s <= t of C_t B_s exp(dA_cumsum_t - dA_cumsum_s) dt_s x_s, then + D x_t and * silu(z_t).
    -> (b, l, h, p) in x's dtype."""
    batch, seqlen, heads, head_dim = x.shape
    groups, chunks, chunk = B.shape[2], dt.shape[2], dt.shape[3]
    if seqlen != chunks * chunk:
        raise ValueError(f"x has {seqlen} positions, not dt's {chunks} chunks of {chunk}")
    B, C = (t.float().unflatten(1, (chunks, chunk)).repeat_interleave(heads // groups, dim=3) for t in (B, C))
    dA_cumsum = dA_cumsum.float()  # (b, h, c, k)
    causal = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=x.device))
    # decay[b, h, c, t, s] = exp(dA_t - dA_s) for s <= t, zero above the diagonal (masked before exp: no overflow).
    decay = torch.exp((dA_cumsum[..., :, None] - dA_cumsum[..., None, :]).masked_fill(~causal, -math.inf))
    scores = torch.einsum("bcthn,bcshn->bhcts", C, B) * decay * dt.float()[..., None, :]
    y = torch.einsum("bhcts,bcshp->bcthp", scores, x.float().unflatten(1, (chunks, chunk)))
    from_states = torch.einsum("bcthn,bchpn->bcthp", C, prev_states.float())
    y = (y + from_states * torch.exp(dA_cumsum).permute(0, 2, 3, 1)[..., None]).flatten(1, 2)  # (b, l, h, p)
    if D is not None:
        y = y + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def state_passing_reference(states, dA_chunk_cumsum, initial_states=None):
    """The SSD's pass from chunk to chunk: from the state each chunk leaves when it starts from zero, states
    (b, c, h, d), and each chunk's total log decay (the sum of dt * A over it), dA_chunk_cumsum (b, h, c), the state
    entering each chunk, out (b, c, h, d): h_0 = initial_states (b, h, d) or zeros, h_{k+1} = exp(dA_k) h_k + states_k;
    and the state after the last, final_states (b, h, d). Both float32, from one product over the chunks' decay
    matrix (the initial state enters as a chunk of its own, before the first)."""
    states = states.float()
    initial = states.new_zeros(states[:, 0].shape) if initial_states is None else initial_states.float()
    states = torch.cat([initial[:, None], states], dim=1)  # (b, c + 1, h, d)
    # decay[b, h, i, j] = exp(sum of the log decays of chunks j+1..i): how the state left by chunk j reaches i's end.
    decay = torch.exp(segment_sum(F.pad(dA_chunk_cumsum.float(), (1, 0))))  # (b, h, c + 1, c + 1)
    leaving = torch.einsum("bhij,bjhd->bihd", decay, states)  # the state after each chunk
    return leaving[:, :-1], leaving[:, -1]


def causal_conv1d_reference(x, weight, bias=None, seq_idx=None, activation=None):
    """Depthwise causal convolution. x: (b, d, l), weight: (d, w), bias: (d,) -> (b, d, l) in x's dtype. seq_idx:
    (b, l) int, the document of each position of rows that pack several: an output reads its own document's inputs
    only (zeros before the document's start, as before a sequence's)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    seqlen, width = x.shape[-1], weight.shape[-1]
    if seq_idx is None:
        out = F.conv1d(x.float(), weight.float()[:, None, :], None if bias is None else bias.float(),
                       padding=width - 1, groups=x.shape[1])[..., :seqlen]
    else:  # tap k reads the input k positions back where it lies in the same document
        out = torch.zeros_like(x, dtype=torch.float32) if bias is None else bias.float()[:, None].expand_as(x).clone()
        for back in range(width):
            shifted = F.pad(x.float(), (back, 0))[..., :seqlen]
            same = seq_idx == F.pad(seq_idx, (back, 0), value=-1)[..., :seqlen]  # (b, l)
            out = out + weight.float()[:, width - 1 - back, None] * shifted * same[:, None]
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def rmsnorm_reference(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """RMSNorm over groups of `group_size` channels, gated by silu(z) before (or after) normalising."""
    out_dtype = x.dtype
    x = x.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    group_size = x.shape[-1] if group_size is None else group_size
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    x = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    x = x * weight.float()
    if bias is not None:
        x = x + bias.float()
    if z is not None and norm_before_gate:
        x = x * F.silu(z.float())
    return x.to(out_dtype)


def _reverse_time(x: torch.Tensor) -> torch.Tensor:
    batch, length = x.shape[:2]
    order = torch.arange(length - 1, -1, -1, device=x.device)
    if batch == 1 or x.stride(0) != length * x.stride(1):  # one sequence, or batch and time not one axis of rows
        return x.index_select(1, order)
    # Several sequences as rows of (batch x time, ...): on CUDA, index_select's vectorised gather over rows, which it
    # takes for one sequence but not for several along dim 1 (a 1.3B training step on an H100: 0.044 ms a call at
    # 1 x 16K against 0.113 at 4 x 4K, benchmarks/results/profile_train_16k.json, profile_train_4k_waits.json).
    rows = (torch.arange(0, batch * length, length, device=x.device)[:, None] + order).flatten()
    return x.flatten(0, 1).index_select(0, rows).unflatten(0, (batch, length))


class _ReverseTime(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reverse_time(x)

    @staticmethod
    def backward(ctx, grad):
        return _reverse_time(grad)


def reverse_time(x: torch.Tensor) -> torch.Tensor:
    """x reversed along its time axis (dim 1), as `x.flip(1)`, through a gather: on CUDA about twice as fast as
    `torch.flip`'s kernel (0.09 vs 0.17 ms for 32K x 2048 bf16 on an H200). The reversal is its own gradient, so the
    backward is a gather too (deterministic, unlike index_select's own scatter-add backward)."""
    return _ReverseTime.apply(x)


def _split_conv1d_scan_from(chunk_scan, causal_conv1d, rmsnorm):
    """`mamba_split_conv1d_scan` computed by these three operations, one after another."""

    def split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, seq_idx=None,
                          dt_limit=(0.0, float("inf")), activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6,
                          outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True):
        nheads = A.shape[0]
        dim = nheads * headdim
        state_size = (conv1d_weight.shape[0] - dim) // (2 * ngroups)
        z, xBC, dt = zxbcdt.split([dim, conv1d_weight.shape[0], nheads], dim=-1)
        xBC = causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx, activation=activation)
        x, B, C = xBC.transpose(1, 2).split([dim, ngroups * state_size, ngroups * state_size], dim=-1)
        y = chunk_scan(
            x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, state_size)),
            C.unflatten(-1, (ngroups, state_size)), chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx,
            dt_softplus=True, dt_limit=dt_limit,
        )  # (b, l, h, p)
        y = rmsnorm(y.flatten(-2), rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                    norm_before_gate=norm_before_gate)
        return F.linear(y, outproj_weight, outproj_bias)

    return split_conv1d_scan


mamba_split_conv1d_scan_reference = _split_conv1d_scan_from(
    mamba_chunk_scan_combined_reference, causal_conv1d_reference, rmsnorm_reference
)
mamba_split_conv1d_scan_reference.__doc__ = """A Mamba-2 mixer from in_proj's output to out_proj's, as one function.
zxbcdt: (b, l, dim + conv_dim + h), in_proj's output: the gate z, the convolution's input xBC (x, B and C) and dt.
act(causal conv1d(xBC)) gives x (b, l, dim = h * headdim), B and C (b, l, ngroups * n); the SSD with
dt = clamp(softplus(dt + dt_bias), dt_limit) and D; the gated RMSNorm (`rmsnorm_weight`, groups of dim / ngroups
channels, silu(z) before or after normalising); out_proj (`outproj_weight` (out_dim, dim), `outproj_bias`). seq_idx
(b, l) int: the convolution and the scan restart at each document. -> (b, l, out_dim) in zxbcdt's dtype."""


@dataclass(frozen=True)
class MambaOps:
    """One implementation of each fused operation; `name` says which. `split_conv1d_scan`, where set, computes a
    whole mixer pass without padding or states (`mamba_split_conv1d_scan_reference`'s signature); None: the mixer
    calls the others itself. `chunk_size`, where set, is the chunk this SSD runs in whatever the model's
    `mamba_chunk_size` (the chunk orders the SSD's sums, it does not change the result); None: the model's."""

    name: str
    chunk_scan: Callable
    causal_conv1d: Callable
    rmsnorm: Callable
    state_passing: Callable
    chunk_state: Callable
    chunk_scan_from_states: Callable
    split_conv1d_scan: Optional[Callable] = None
    chunk_size: Optional[int] = None


# The reference's chunk: its quadratic part, several passes over (chunk x chunk) decays per head, costs more than the
# states it saves from 64 on. On a 2-core CPU, forward + backward of the 8M presets' mixer at 8 x 512 tokens took 107 ms
# in chunks of 64 against 235 in chunks of 128 (32: 110), diffuapriel-240m's at 2 x 1024 314 against 380 (32: 816),
# and a diffuapriel-8m training step at 8 x 512 2.5 s against 3.7 s (benchmarks/results/reference_chunk_size_cpu.json).
TORCH_OPS = MambaOps("torch", mamba_chunk_scan_combined_reference, causal_conv1d_reference, rmsnorm_reference,
                     state_passing_reference, chunk_state_reference, chunk_scan_from_states_reference, chunk_size=64)


def _conv_kernel_takes(width: int, activation) -> bool:
    """Whether causal-conv1d's kernel computes a convolution of this width and activation (2 to 4, silu or none)."""
    return 2 <= width <= 4 and activation in (None, "silu", "swish")


def _causal_conv1d_via_kernel(kernel):
    """causal-conv1d's kernel where it applies (width 2 to 4, silu or no activation), the reference elsewhere.

    The kernel reads x (b, d, l) in place either channels-first (l contiguous) or channels-last (d contiguous, as the
    transpose of a (b, l, d) row slice is); channels-last needs d and the row stride to be multiples of 8, so any
    other channels-last view is copied to channels-first. Documents packed in a row (`seq_idx`) need channels-last:
    another layout is copied to it, and channels that it cannot take (d not a multiple of 8) take the reference. Its
    output has x's layout and dtype; the weight and bias may be float32 under a bfloat16 input (autocast)."""

    def causal_conv1d(x, weight, bias=None, seq_idx=None, activation=None):
        if not _conv_kernel_takes(weight.shape[-1], activation) or (seq_idx is not None and x.shape[1] % 8):
            return causal_conv1d_reference(x, weight, bias, seq_idx, activation)
        channels_last = x.stride(1) == 1 and x.stride(2) > 1
        misaligned = channels_last and (x.shape[1] % 8 or x.stride(2) % 8 or x.stride(0) % 8)
        if seq_idx is not None:
            if not channels_last or misaligned:
                x = x.transpose(1, 2).contiguous().transpose(1, 2)
            return kernel(x, weight, bias, seq_idx.to(torch.int32).contiguous(), activation=activation)
        if misaligned:
            x = x.contiguous()
        return kernel(x, weight, bias, activation=activation)

    return causal_conv1d


def needs_gradient(*tensors) -> bool:
    """Whether autograd must see an operation on these tensors (None entries are skipped): the forward-only kernels
    (`ssd_triton`, `fused_ops`) run only where it need not."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def is_plain_module(module: nn.Module, cls: type) -> bool:
    """Whether `module` is exactly a `cls` with nothing around it: not a subclass (a LoRA or quantised layer), no
    accelerate hook (which loads offloaded weights when the module is called), no forward hooks. A kernel may read the
    weights of a plain module directly; any other module must be called."""
    return (type(module) is cls and getattr(module, "_hf_hook", None) is None and not module._forward_hooks
            and not module._forward_pre_hooks)


def _chunk_scan_via_kernels(mamba_chunk_scan_combined, ssd_forward, single_pass_is_faster):
    """The SSD on CUDA: our `ssd_triton.ssd_forward` (one pass, the state carried in registers) for inference where
    `single_pass_is_faster(batch, nheads, seqlen, device)`, from a zero or a given state, handing on the one it leaves
    when asked; mamba-ssm's `mamba_chunk_scan_combined` elsewhere, when a gradient is needed, or for what ours does
    not compute (a gate z, documents packed in a row)."""

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                   dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
        kwargs = dict(D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, dt_softplus=dt_softplus,
                      dt_limit=dt_limit, return_final_states=return_final_states)
        if seq_idx is not None:
            return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, seq_idx=seq_idx.to(torch.int32), **kwargs)
        if (needs_gradient(x, dt, A, B, C, D, dt_bias, initial_states) or z is not None
                or not single_pass_is_faster(x.shape[0], x.shape[2], x.shape[1], x.device)):
            return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, **kwargs)
        return ssd_forward(x, dt, A, B, C, chunk_size, **kwargs)

    return chunk_scan


def _split_conv1d_scan_via_kernel(kernel, parts: Callable, training_pass=None, training_pass_takes=None,
                                  single_pass_is_faster=None):
    """Where causal-conv1d's kernel applies (installed, width 2 to 4, silu or no activation, channels and in_proj's
    width multiples of 8 so that it reads the slice in place): `training_pass` (`training_mixer.split_conv1d_scan`:
    our single-pass SSD forward, a backward from the states it kept) for the passes it takes (`training_pass_takes`)
    where `single_pass_is_faster(batch, nheads, seqlen, device)`, else `kernel`, mamba-ssm's
    `mamba_split_conv1d_scan_combined`. Elsewhere `parts`: the same computation by the other operations, one after
    another."""

    def split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, seq_idx=None, **kwargs):
        activation = kwargs.get("activation", "silu")
        if (kernel is None or not _conv_kernel_takes(conv1d_weight.shape[-1], activation)
                or conv1d_weight.shape[0] % 8 or zxbcdt.shape[-1] % 8):
            return parts(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, seq_idx=seq_idx, **kwargs)
        if (training_pass is not None
                and training_pass_takes(chunk_size, seq_idx)
                and single_pass_is_faster(zxbcdt.shape[0], A.shape[0], zxbcdt.shape[1], zxbcdt.device)):
            return training_pass(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, **kwargs)
        seq_idx = None if seq_idx is None else seq_idx.to(torch.int32)
        return kernel(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, seq_idx=seq_idx, **kwargs)

    return split_conv1d_scan


def _training_pass() -> tuple:
    """`training_mixer`'s (split_conv1d_scan, takes), or (None, None) where the installed mamba-ssm lacks the backward
    kernels it calls (they are mamba-ssm's internals, as of 2.3): mamba-ssm's own fused function then trains."""
    try:
        from .training_mixer import split_conv1d_scan, takes
    except ImportError:
        return None, None
    return split_conv1d_scan, takes


@functools.cache
def kernel_ops(single_pass: Optional[bool] = None, split_conv1d_scan: bool = False,
               training_pass: bool = False) -> Optional[MambaOps]:
    """The CUDA kernels as `MambaOps`, or None when mamba-ssm is not installed. causal-conv1d is optional: without it
    the convolution takes the PyTorch reference (cuDNN's depthwise convolution) and the rest stays on kernels.
    `single_pass` forces the SSD's choice between our single-pass kernel and mamba-ssm's for the calls either can take
    (None: `ssd_triton.single_pass_is_faster` decides; benchmarks/ssd_dispatch.py measures both). With
    `split_conv1d_scan`, whole mixer passes run as one function (`MambaOps.split_conv1d_scan`): mamba-ssm's fused
    mixer function, or with `training_pass` `training_mixer`'s where it takes the pass and our single-pass SSD is the
    faster one (training's default: `kernel_policy._mamba_ops`)."""
    try:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.ssd_chunk_scan import chunk_scan as chunk_scan_from_states
        from mamba_ssm.ops.triton.ssd_chunk_state import chunk_state
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
        from mamba_ssm.ops.triton.ssd_state_passing import state_passing

        from .ssd_triton import single_pass_is_faster, ssd_forward
    except (ImportError, OSError):  # not installed, or built for another torch / CUDA
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except (ImportError, OSError):
        conv, fused_mixer, kept_states_pass = causal_conv1d_reference, None, (None, None)
    else:
        conv, fused_mixer = _causal_conv1d_via_kernel(causal_conv1d_fn), mamba_split_conv1d_scan_combined
        kept_states_pass = _training_pass() if training_pass else (None, None)
    rule = single_pass_is_faster if single_pass is None else (lambda *sizes: single_pass)
    chunk_scan = _chunk_scan_via_kernels(mamba_chunk_scan_combined, ssd_forward, rule)
    name = "kernels" if single_pass is None else f"kernels (single-pass SSD {'always' if single_pass else 'never'})"
    if not split_conv1d_scan:
        return MambaOps(name, chunk_scan, conv, rmsnorm_fn, state_passing, chunk_state, chunk_scan_from_states)
    mixer = _split_conv1d_scan_via_kernel(fused_mixer, _split_conv1d_scan_from(chunk_scan, conv, rmsnorm_fn),
                                          *kept_states_pass, rule)
    name += ", training pass" if kept_states_pass[0] is not None else ", fused mixer"
    return MambaOps(name, chunk_scan, conv, rmsnorm_fn, state_passing, chunk_state, chunk_scan_from_states, mixer)


__all__ = [
    "MambaOps",
    "TORCH_OPS",
    "causal_conv1d_reference",
    "chunk_scan_from_states_reference",
    "chunk_state_reference",
    "is_plain_module",
    "kernel_ops",
    "mamba_chunk_scan_combined_reference",
    "mamba_split_conv1d_scan_reference",
    "needs_gradient",
    "reverse_time",
    "rmsnorm_reference",
    "segment_sum",
    "state_passing_reference",
]
