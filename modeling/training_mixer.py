"""The Mamba-2 mixer's training pass on CUDA, from in_proj's output to out_proj's, with a backward that reads what its
forward kept instead of computing it again.

It computes what mamba-ssm's `mamba_split_conv1d_scan_combined` computes (`mamba_split_conv1d_scan_reference`'s
signature): act(causal conv1d) over xBC, the SSD, the gated RMSNorm and out_proj. mamba-ssm's function keeps in_proj's
output and the SSD's output only, so its backward runs the convolution again, and inside the SSD's backward the
running decays, every chunk's state and their passing along the sequence (in a 1.3B training step on an H100, about
14 ms of 375 went to those and 4.4 to the convolution: benchmarks/results/profile_train_4k_at_7b80f40.json). Here:

- forward: causal-conv1d's kernel; our single-pass SSD (`ssd_triton`), which writes the state entering every chunk
  as it walks past (mamba-ssm's three forward kernels pass those states through memory); mamba-ssm's gated norm;
  out_proj. It keeps the convolution's output and the chunk states (about 0.5 GiB a direction at 16K tokens of a
  1.3B model);
- backward: out_proj's gradient; the norm's by our kernel (`gated_norm_triton`: its output recomputed for out_proj's
  weight, as mamba-ssm does, 0.32 against mamba-ssm's 0.45 ms at 16K x 4096 on an H200); the SSD's from the kept
  states (`ssd_backward_from_states`): our kernels for the gradient of the states between chunks, walked back along
  the sequence in one pass (where mamba-ssm writes every chunk's own term and reads it back), and for x's gradient
  with dt's and D's through it (`ssd_backward_triton.chunk_inputs_backward`, the same numbers as mamba-ssm's
  `_chunk_scan_chunk_state_bwd_dx` in 0.7-0.9 of its time), mamba-ssm's kernels for the rest; the convolution's from
  causal-conv1d's.

`mamba_ops.kernel_ops(split_conv1d_scan=True, training_pass=True)` sends a pass here where our SSD kernel is the
faster one and it can keep its states (`takes`: no documents packed in a row, a chunk that is a whole number of its
chunks); everything else takes mamba-ssm's function. A 1.3B forward and backward at 4 x 4K took 344.4 against
372.5 ms and 48.9 against 33.3 GiB on an H100 (benchmarks/results/training_fusions_walk.md: the same loss to 4e-5),
so it is training's default (`kernel_policy._mamba_ops`); tests/test_gpu_kernels.py compares its outputs and
gradients with mamba-ssm's function's.
"""

from typing import Optional

import torch
import torch.nn.functional as F

try:  # mamba_ops.kernel_ops imports this module only where mamba-ssm and causal-conv1d import
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_fwd
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_bwd, _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_scan import (_chunk_scan_bwd_dC, _chunk_scan_bwd_dcb,
                                                     _chunk_scan_bwd_ddAcs_stable)
    from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_bwd, _chunk_cumsum_fwd, _chunk_state_bwd_db
except ImportError as error:
    raise ImportError("diffuapriel_hf.modeling.training_mixer needs mamba-ssm and causal-conv1d") from error

from .gated_norm_triton import gated_rms_norm_backward
from .ssd_backward_triton import chunk_inputs_backward, entering_states_backward
from .ssd_triton import CHUNK, ssd_forward


def takes(chunk_size: int, seq_idx: Optional[torch.Tensor]) -> bool:
    """Whether `split_conv1d_scan` computes this pass: no documents packed in the rows, and the chunk states at a whole
    number of our kernel's chunks. (Where causal-conv1d's kernel applies, widths and activation, is its caller's
    check, made before either mixer function is chosen: `mamba_ops._split_conv1d_scan_via_kernel`.)"""
    return seq_idx is None and chunk_size % CHUNK == 0


def ssd_backward_from_states(dy, x, dt, A, B, C, D, dt_bias, dt_limit, chunk_size, dt_chunks, dA_cumsum,
                             chunk_states, dx, ddt, dB, dC):
    """The SSD's gradients by mamba-ssm's backward kernels (the states' and x's gradients by ours), from the forward's
    chunk states instead of their recomputation. dy, x: (b, l, h, p); dt (b, l, h) before the softplus; B, C
    (b, l, g, n); per chunk of `chunk_size`: dt_chunks and dA_cumsum (b, h, c, chunk) (mamba-ssm's chunk cumsum),
    chunk_states (b, c, h, p, n) float32, the state entering each chunk. Writes dx, ddt, dB and dC into the tensors
    given; returns (dA, dD, ddt_bias)."""
    ngroups = B.shape[2]
    CB = _bmm_chunk_fwd(C, B, chunk_size, output_dtype=torch.float32)
    # The gradient of each chunk's entering state from the outputs inside it, then passed back along the sequence.
    dstates, ddA_chunk_total = entering_states_backward(C, dA_cumsum, dy, chunk_states, dtype=x.dtype)
    _, ddt_from_inputs, dD = chunk_inputs_backward(x, dt_chunks, dA_cumsum, B, CB, dy, dstates, D=D, dx=dx)
    dB_from_states, ddA_next = _chunk_state_bwd_db(x, dt_chunks, dA_cumsum, dstates, B=B, ngroups=ngroups)
    dC_from_states, ddA_prev = _chunk_scan_bwd_dC(chunk_states, dA_cumsum, dy, C=C, ngroups=ngroups)
    dCB = _chunk_scan_bwd_dcb(x, dt_chunks, dA_cumsum, dy, ngroups=ngroups).to(CB.dtype)
    _bmm_chunk_bwd(C, dCB, residual=dB_from_states, out=dB)
    _bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_from_states, out=dC)
    # The running decays' gradient: within chunks, plus each chunk's total, summed from the end of its chunk back.
    ddA_prev[..., -1] += ddA_chunk_total
    ddA = _chunk_scan_bwd_ddAcs_stable(x, dt_chunks, dA_cumsum, dy, CB)
    ddA += ddA_next + ddA_prev.flip(-1).cumsum(dim=-1).flip(-1)
    _, dA, ddt_bias = _chunk_cumsum_bwd(ddA, ddt_from_inputs, dt, A, dt_bias=dt_bias, dt_softplus=True,
                                        dt_limit=dt_limit, ddt=ddt)
    return dA, dD, ddt_bias


class MixerTrainingPass(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, dt_limit, activation,
                rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate):
        batch, seqlen, _ = zxbcdt.shape
        nheads, conv_dim = A.shape[0], conv1d_weight.shape[0]
        dim = nheads * headdim
        dstate = (conv_dim - dim) // (2 * ngroups)
        z, xBC, dt = zxbcdt.split([dim, conv_dim, nheads], dim=-1)
        silu = activation is not None
        # causal-conv1d reads xBC's (b, conv_dim, l) view in place, channels last, and writes its output so.
        xBC_conv = causal_conv1d_fwd_function(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, None, None, None,
                                              silu).transpose(1, 2)  # (b, l, conv_dim)
        x, B, C = xBC_conv.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
        dt_args = dict(dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit)
        y, chunk_states = ssd_forward(x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
                                      C.unflatten(-1, (ngroups, dstate)), chunk_size, D=D, return_chunk_states=True,
                                      **dt_args)  # (b, l, h, p), (b, c, h, p, n)
        dA_cumsum, dt_chunks = _chunk_cumsum_fwd(dt, A, chunk_size, **dt_args)  # (b, h, c, chunk) each
        y = y.view(batch * seqlen, dim)
        normed, _, rstd = _layer_norm_fwd(y, rmsnorm_weight, None, rmsnorm_eps, z.view(batch * seqlen, dim),
                                          group_size=dim // ngroups, norm_before_gate=norm_before_gate,
                                          is_rms_norm=True)
        if torch.is_autocast_enabled("cuda"):  # out_proj in the autocast dtype, as an nn.Linear would run
            dtype = torch.get_autocast_dtype("cuda")
            normed, outproj_weight = normed.to(dtype), outproj_weight.to(dtype)
            outproj_bias = None if outproj_bias is None else outproj_bias.to(dtype)
        out = F.linear(normed.view(batch, seqlen, dim), outproj_weight, outproj_bias)
        ctx.save_for_backward(zxbcdt, conv1d_weight, conv1d_bias, xBC_conv, y, A, D, dt_bias, dt_chunks, dA_cumsum,
                              chunk_states, rmsnorm_weight, rstd, outproj_weight, outproj_bias)
        ctx.sizes = (nheads, headdim, ngroups, dstate, chunk_size)
        ctx.options = (dt_limit, silu, rmsnorm_eps, norm_before_gate)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        (zxbcdt, conv1d_weight, conv1d_bias, xBC_conv, y, A, D, dt_bias, dt_chunks, dA_cumsum, chunk_states,
         rmsnorm_weight, rstd, outproj_weight, outproj_bias) = ctx.saved_tensors
        nheads, headdim, ngroups, dstate, chunk_size = ctx.sizes
        dt_limit, silu, rmsnorm_eps, norm_before_gate = ctx.options
        batch, seqlen, _ = zxbcdt.shape
        dim, conv_dim = nheads * headdim, conv1d_weight.shape[0]
        z, xBC, dt = zxbcdt.split([dim, conv_dim, nheads], dim=-1)
        dzxbcdt = torch.empty_like(zxbcdt)
        dz, dxBC_given, ddt = dzxbcdt.split([dim, conv_dim, nheads], dim=-1)
        dxBC = torch.empty_like(xBC_conv)  # the gradient of the convolution's output
        dx, dB, dC = dxBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)

        dnormed = F.linear(dout, outproj_weight.t()).view(batch * seqlen, dim)
        dy, drmsnorm_weight, _, normed = gated_rms_norm_backward(
            dnormed, y, z.view(batch * seqlen, dim), rmsnorm_weight, rstd, group_size=dim // ngroups,
            norm_before_gate=norm_before_gate, recompute_output=True, dz=dz.view(batch * seqlen, dim),
        )
        doutproj_weight = dout.reshape(-1, dout.shape[-1]).t() @ normed.to(dout.dtype)
        doutproj_bias = None if outproj_bias is None else dout.sum(dim=(0, 1))

        x, B, C = xBC_conv.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
        as_groups = lambda t: t.unflatten(-1, (ngroups, dstate))  # noqa: E731
        dA, dD, ddt_bias = ssd_backward_from_states(
            dy.view(batch, seqlen, nheads, headdim), x.unflatten(-1, (nheads, headdim)), dt, A, as_groups(B),
            as_groups(C), D, dt_bias, dt_limit, chunk_size, dt_chunks, dA_cumsum, chunk_states,
            dx.unflatten(-1, (nheads, headdim)), ddt, as_groups(dB), as_groups(dC),
        )
        # Written in place into in_proj's gradient, channels last as xBC was read.
        _, dconv1d_weight, dconv1d_bias, _ = causal_conv1d_bwd_function(
            xBC.transpose(1, 2), conv1d_weight, conv1d_bias, dxBC.transpose(1, 2), None, None, None,
            dxBC_given.transpose(1, 2), False, silu,
        )
        return (dzxbcdt, dconv1d_weight, dconv1d_bias, ddt_bias, dA, dD, None, None, None, drmsnorm_weight, None,
                doutproj_weight, doutproj_bias, None, None, None)


def split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, seq_idx=None,
                      dt_limit=(0.0, float("inf")), activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6,
                      outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True):
    """`mamba_split_conv1d_scan_reference` by `MixerTrainingPass`, for the passes that `takes` accepts."""
    if not takes(chunk_size, seq_idx):
        given = "given" if seq_idx is not None else "None"
        raise ValueError(f"this mixer pass takes no seq_idx and a chunk_size that is a multiple of {CHUNK}: got "
                         f"chunk_size={chunk_size}, seq_idx {given}")
    return MixerTrainingPass.apply(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, tuple(dt_limit),
                                   activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim,
                                   ngroups, norm_before_gate)


__all__ = ["MixerTrainingPass", "split_conv1d_scan", "ssd_backward_from_states", "takes"]
