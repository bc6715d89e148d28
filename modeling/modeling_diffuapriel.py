"""DiffuApriel: a masked diffusion language model whose denoiser is a stack of bidirectional Mamba-2 blocks,
optionally interleaved with bidirectional attention blocks (DiffuApriel-H), or all attention (DiffuTran).

Block (every layer): x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)), where the mixer is
  - `BidirectionalMamba2Mixer`: one Mamba-2 mixer reading left to right plus one reading right to left (the same
    SSD function on the reversed sequence), combined by addition;
  - `DiffuAprielAttention`: non-causal grouped-query attention with RoPE, through transformers' attention interface.
"""

import copy
import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .block_diffusion import (
    block_attention_mask,
    fold_blocks,
    num_blocks,
    two_stream_attention_mask,
    unfold_blocks,
)
from .cache import BlockContext, BlockDiffusionCache
from .cache_attention import cache_attention
from .configuration_diffuapriel import ATTENTION, MAMBA, DiffuAprielConfig
from .diffusion import INTEGER_DTYPES, labelled_positions, masked_diffusion_loss, negative_elbo, values_readable
from .fused_ops import add_rms_norm, add_time_reversed, both_reading_orders, rotary, swiglu, swiglu_of_product
from .generation import DiffusionGenerationMixin
from .kernel_policy import REFERENCE_POLICY, KernelPolicy, resolve_kernel_policy
from .likelihood import DEFAULT_ESTIMATOR, DEFAULT_NUM_SAMPLES, conditional_negative_elbo
from .mamba_ops import MambaOps, is_plain_module, reverse_time
from .pipeline_diffuapriel import CUSTOM_PIPELINES


class DiffuAprielRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states, kernels: KernelPolicy = REFERENCE_POLICY):
        if kernels.fused_rms_norm and hidden_states.dtype == self.weight.dtype:
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class MambaRMSNormGated(nn.Module):
    """The Mamba-2 output norm: RMSNorm over groups of `group_size` channels of hidden_states * silu(gate), as
    mamba-ssm's `RMSNormGated(norm_before_gate=False)`; computed by `ops.rmsnorm` (the kernel or its reference)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor, ops: MambaOps) -> torch.Tensor:
        return ops.rmsnorm(hidden_states, self.weight, None, z=gate, eps=self.variance_epsilon,
                           group_size=self.group_size, norm_before_gate=False)


class MixerOutput(NamedTuple):
    """What a block's mixer returns, for either kind. `update`: its update to the residual stream (B, L, D).
    `attention_weights`: the attention map (B, H, L, L) of an attention mixer whose implementation returns one, else
    None. `time_reversed`: a bidirectional Mamba mixer's right-to-left update, still in its reversed reading order
    (None otherwise), which the block adds in one fused pass with its residual and next norm; `scale` multiplies the
    directions' sum. `combined()` is the mixer's output alone."""

    update: torch.Tensor
    attention_weights: Optional[torch.Tensor] = None
    time_reversed: Optional[torch.Tensor] = None
    scale: float = 1.0

    def combined(self, kernels: KernelPolicy = REFERENCE_POLICY) -> torch.Tensor:
        if self.time_reversed is None:
            return self.update
        output = add_time_reversed(self.update, self.time_reversed, use_kernel=kernels.fused_elementwise)
        return output if self.scale == 1.0 else output * self.scale


class Mamba2Mixer(nn.Module):
    """One direction of a Mamba-2 mixer, its parameters laid out as in mamba-ssm and transformers' `Mamba2Mixer`
    (in_proj -> [gate z | conv input xBC | dt], depthwise conv1d, dt_bias, A_log, D, gated norm, out_proj), so that
    their checkpoints map onto it key for key. It reads its input left to right; `BidirectionalMamba2Mixer` gives the
    right-to-left one the reversed sequence."""

    def __init__(self, config: DiffuAprielConfig):
        super().__init__()
        self.intermediate_size = config.mamba_intermediate_size
        self.num_heads = config.mamba_n_heads
        self.head_dim = config.mamba_d_head
        self.n_groups = config.mamba_n_groups
        self.ssm_state_size = config.mamba_d_state
        self.chunk_size = config.mamba_chunk_size
        self.block_size = config.block_size
        self.dt_limit = tuple(config.mamba_dt_limit)
        self.activation = config.hidden_act
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.in_proj = nn.Linear(
            config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.mamba_proj_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=config.mamba_d_conv, groups=self.conv_dim,
            padding=config.mamba_d_conv - 1, bias=config.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = MambaRMSNormGated(self.intermediate_size, self.intermediate_size // self.n_groups,
                                      config.rms_norm_eps)
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.mamba_proj_bias)

    def forward(
        self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor], ops: MambaOps,
        initial_state: Optional[tuple[torch.Tensor, torch.Tensor]] = None, state_at: Optional[int] = None,
        block_states: Optional[int] = None, seq_idx: Optional[torch.Tensor] = None,
        entering_blocks: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ):
        """hidden_states: (B, L, D); padding_mask: (B, L) bool, True at real tokens, or None for no padding.
        `initial_state` continues a sequence whose earlier part left that state: (the convolution's inputs at the
        d_conv - 1 positions before (B, d_conv - 1, C), the SSM state (B, H, P, N) in float32). With
        `state_at` (0 to L), also returns the state before that position: what a pass over the tokens from there on
        continues from (at L, the state this part leaves). Only the scan is split there, so the output is the same.
        With `block_states` (a block size), also returns the state entering every block of that size, as
        (conv inputs (B, n, d_conv - 1, C), SSM states (B, n, H, P, N)): what each block of a block diffusion
        model's noised stream starts from (`block_diffusion.py`); given those as `entering_blocks`, each block of the
        pass reads its tokens from them (the noised stream's pass). `seq_idx` (B, L) int, the document of each position
        of rows that pack several: the convolution and the scan restart at every document's first position."""
        batch, seqlen, _ = hidden_states.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        chunk_size = self.chunk_size_for(seqlen, ops)
        zxbcdt = self.in_proj(hidden_states)  # (B, L, 2 * H * P + 2 * G * N + H)
        plain_pass = (padding_mask is None and initial_state is None and state_at is None and block_states is None
                      and entering_blocks is None)
        if plain_pass and self.runs_fused(ops):
            return self.fused(zxbcdt, ops, chunk_size, seq_idx)
        gate, xBC, dt = zxbcdt.split([self.intermediate_size, self.conv_dim, H], dim=-1)
        if padding_mask is not None:
            xBC = xBC * padding_mask[..., None].to(xBC.dtype)  # the convolution sees zeros at padding
        ssm_state = None
        if initial_state is not None:  # the convolution also reads the last inputs of the earlier part
            conv_state, ssm_state = initial_state
            xBC = torch.cat([conv_state.to(xBC.dtype), xBC], dim=1)
        if entering_blocks is None:
            conv_out = self.convolution(xBC, ops, seq_idx)[:, xBC.shape[1] - seqlen :]  # (B, L, C)
        else:  # each block's convolution also reads the inputs before it that the clean stream holds
            rows = torch.cat([entering_blocks[0].flatten(0, 1).to(xBC.dtype), fold_blocks(xBC, self.block_size)], 1)
            conv_out = unfold_blocks(self.convolution(rows, ops)[:, -self.block_size :], batch, seqlen)
        x, B, C = conv_out.split([self.intermediate_size, G * N, G * N], dim=-1)
        softplus_here = block_states is not None or entering_blocks is not None
        dt, dt_args = self.time_steps(dt, padding_mask, seq_idx, softplus_here=softplus_here)
        if entering_blocks is None:
            y, ssm_state = self.scan(x, dt, B, C, ssm_state, state_at, ops, chunk_size, dt_args)  # y: (B, L, H, P)
        else:
            y = self.scan_from_block_states(x, dt, B, C, entering_blocks[1], ops)
        output = self.out_proj(self.norm(y.reshape(batch, seqlen, self.intermediate_size), gate, ops))
        if block_states is not None:
            return output, self.states_entering_blocks(xBC, x, dt, B, initial_state, ops, block_states)
        if state_at is None:
            return output
        # The convolution's inputs at the `width` positions before `state_at` (zeros before the sequence).
        width, end = self.conv1d.kernel_size[0] - 1, xBC.shape[1] - seqlen + state_at
        conv_inputs = F.pad(xBC[:, :end], (0, 0, max(width - end, 0), 0))
        return output, (conv_inputs[:, conv_inputs.shape[1] - width :], ssm_state)

    def runs_fused(self, ops: MambaOps) -> bool:
        """Whether a pass without padding or states runs `ops.split_conv1d_scan` (training on CUDA): where the ops
        have it, and the modules whose weights it reads are plain (an adapter or a hook must be called)."""
        return (ops.split_conv1d_scan is not None and is_plain_module(self.conv1d, nn.Conv1d)
                and is_plain_module(self.norm, MambaRMSNormGated) and is_plain_module(self.out_proj, nn.Linear))

    def fused(self, zxbcdt: torch.Tensor, ops: MambaOps, chunk_size: int, seq_idx: Optional[torch.Tensor]):
        """The pass from in_proj's output (B, L, 2 * H * P + 2 * G * N + H) to out_proj's (B, L, D) as one
        function, the same computation as the rest of `forward`."""
        return ops.split_conv1d_scan(
            zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, -torch.exp(self.A_log.float()),
            self.D.float(), chunk_size, seq_idx=seq_idx, dt_limit=self.dt_limit, activation=self.activation,
            rmsnorm_weight=self.norm.weight, rmsnorm_eps=self.norm.variance_epsilon,
            outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias, headdim=self.head_dim,
            ngroups=self.n_groups, norm_before_gate=False,
        )

    def time_steps(self, dt: torch.Tensor, padding_mask: Optional[torch.Tensor], seq_idx: Optional[torch.Tensor],
                   softplus_here: bool) -> tuple[torch.Tensor, dict]:
        """dt (B, L, H) and the SSD call's dt arguments. dt = clamp(softplus(dt + dt_bias)) is computed inside the SSD
        call (no extra launches), or here when the padding must then be zeroed (no decay and no input at padding) or
        the caller needs it (`softplus_here`: the states entering blocks)."""
        if padding_mask is None and not softplus_here:
            dt_args = dict(dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        else:
            dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
            dt = dt if padding_mask is None else dt * padding_mask[..., None]
            dt_args = {}
        return dt, dt_args if seq_idx is None else dict(dt_args, seq_idx=seq_idx)

    def scan(self, x, dt, B, C, ssm_state, state_at: Optional[int], ops: MambaOps, chunk_size: int, dt_args: dict):
        """The SSD over x (B, L, H * P), B and C (B, L, G * N) from `ssm_state` (or zeros): (y (B, L, H, P), the state
        before position `state_at`, or `ssm_state` as given when `state_at` is None). Split at `state_at` only where
        it is inside the sequence: the output is the same."""
        batch, seqlen = x.shape[:2]
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size

        def part(positions: slice, entering_state, return_state: bool):  # y (B, l, H, P) [, the state it leaves]
            length = x[:, positions].shape[1]
            return ops.chunk_scan(
                x[:, positions].reshape(batch, length, H, P), dt[:, positions], -torch.exp(self.A_log.float()),
                B[:, positions].reshape(batch, length, G, N), C[:, positions].reshape(batch, length, G, N),
                chunk_size, D=self.D.float(), initial_states=entering_state, return_final_states=return_state,
                **dt_args,
            )

        if state_at is None or state_at == 0:
            if state_at == 0 and ssm_state is None:
                return part(slice(None), None, False), torch.zeros(batch, H, P, N, device=x.device,
                                                                   dtype=torch.float32)
            return part(slice(None), ssm_state, False), ssm_state
        if state_at == seqlen:
            return part(slice(None), ssm_state, True)
        before, ssm_state = part(slice(None, state_at), ssm_state, True)
        return torch.cat([before, part(slice(state_at, None), ssm_state, False)], dim=1), ssm_state

    def scan_from_block_states(self, x, dt, B, C, entering: torch.Tensor, ops: MambaOps) -> torch.Tensor:
        """The SSD over x (B, L, H * P), dt (B, L, H) after the softplus, B and C (B, L, G * N), each block of
        `block_size` tokens from its entering state (B, n, H, P, N), with blocks for the SSD's chunks: y (B, L, H, P).
        The last block is padded with dt = 0 (no input, no decay) and its padding's outputs dropped."""
        batch, seqlen = x.shape[:2]
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        dt, dA_cumsum = self.block_decays(dt, self.block_size)
        pad = dt.shape[2] * self.block_size - seqlen
        if pad:  # F.pad copies even when it pads nothing
            x, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (x, B, C))
        y = ops.chunk_scan_from_states(B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)), x.unflatten(-1, (H, P)), dt,
                                       dA_cumsum, entering, D=self.D.float())
        return y[:, :seqlen]

    def block_decays(self, dt: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """dt (B, L, H) after the softplus as the SSD's chunk arguments with blocks for chunks: dt (B, H, n, block),
        the last block padded with zeros, and the running sum of dt * A inside each block, dA_cumsum (same shape)."""
        blocks = fold_blocks(dt, block_size).unflatten(0, (dt.shape[0], -1)).permute(0, 3, 1, 2)
        return blocks, torch.cumsum(blocks * -torch.exp(self.A_log.float())[:, None, None], dim=-1)

    def chunk_size_for(self, seqlen: int, ops: MambaOps) -> int:
        """The SSD's chunk for a pass of `ops` over rows of `seqlen` tokens: the chunk `ops` runs in (`MambaOps.
        chunk_size`: the reference's) or `mamba_chunk_size`, or for shorter rows the smallest power of two of at least
        16 that holds them. A block model's passes fold every block into a row of its own, and both SSDs work in whole
        chunks (the reference pads each row to one, mamba-ssm's kernels tile one), so rows of 4 tokens in chunks of 256
        cost the work of 256 tokens each. The chunk does not change the result, only the order of a sum: 16 is the
        least tile of mamba-ssm's matrix products. A full-sequence model keeps its chunk for every length (its
        outputs, bit for bit, are what tests and saved generations pin)."""
        chunk_size = ops.chunk_size or self.chunk_size
        if self.block_size is None or seqlen >= chunk_size:
            return chunk_size
        return min(chunk_size, max(16, 1 << (seqlen - 1).bit_length()))

    def states_entering_blocks(self, xBC, x, dt, B, initial_state, ops, block_size: int):
        """The (conv inputs, SSM state) entering every block of `block_size` tokens of this pass, as `forward`'s
        `block_states` returns them. xBC: the convolution's inputs (B, w + L, C) when an initial state was given, else
        (B, L, C); x (B, L, H * P), dt (B, L, H) after the softplus, B (B, L, G * N)."""
        seqlen = x.shape[1]
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        width, blocks = self.conv1d.kernel_size[0] - 1, num_blocks(seqlen, block_size)
        if initial_state is None:  # zeros before the sequence
            xBC = F.pad(xBC, (0, 0, width, 0))
        conv_inputs = xBC.unfold(1, width, block_size)[:, :blocks].transpose(2, 3)  # (B, n, w, C)
        # The state each block leaves from a zero state, and its running decay: the SSD's chunk states with blocks
        # for chunks (no output computed), from which the states carried in follow.
        dt, dA_cumsum = self.block_decays(dt, block_size)  # (B, H, n, block) each
        local = ops.chunk_state(B.unflatten(-1, (G, N)), x.unflatten(-1, (H, P)), dt, dA_cumsum)  # (B, n, H, P, N)
        entering, _ = ops.state_passing(
            local.flatten(-2), dA_cumsum[..., -1], None if initial_state is None else initial_state[1].flatten(-2),
        )  # (B, n, H, P * N): blocks in place of the SSD's chunks
        return conv_inputs, entering.unflatten(-1, (P, N))

    def convolution(self, xBC: torch.Tensor, ops: MambaOps, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """act(causal depthwise conv1d(xBC)), (B, L, C) -> (B, L, C), restarting at each document of `seq_idx`: the
        kernel reads the weight of a plain `conv1d`; one wrapped by an offloading hook or an adapter is called, so that
        its weight is loaded or adapted (and cannot then restart inside a row)."""
        inputs = xBC.transpose(1, 2)  # (B, C, L), a view: causal-conv1d reads this channels-last layout in place
        if is_plain_module(self.conv1d, nn.Conv1d):
            output = ops.causal_conv1d(
                inputs, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx, activation=self.activation
            )
        elif seq_idx is not None:
            raise ValueError("rows packing several documents (seq_idx) need a plain conv1d: this one is wrapped (an "
                             "adapter or an offloading hook), whose forward cannot restart at a document's start")
        else:  # padded on both sides by d_conv - 1: the first L outputs are the causal ones
            output = ACT2FN[self.activation](self.conv1d(inputs)[..., : inputs.shape[-1]])
        return output.transpose(1, 2)


class BidirectionalMamba2Mixer(nn.Module):
    """Two Mamba-2 mixers over the same input, `left_to_right` and `right_to_left` (omitted when
    `config.bidirectional` is False); the second is the same computation on the reversed sequence, its output
    reversed back, and the two are added (or averaged).

    Each direction makes its own convolution and SSD calls on views of its own in_proj output. Measured on an H200
    (benchmarks/mixer_layout.py, bf16, 1.3B sizes), this beat stacking both directions into one convolution and one
    SSD call at every length once the launches are replayed from a CUDA graph (0.55 vs 0.69 ms at 2K tokens, 2.07 vs
    2.53 ms at 8K, 8.6 vs 10.1 ms at 32K): the stacking copies cost more than the launches they save.

    Padding never leaks: a padded position has zero input and a zero time step, so it neither adds to nor decays the
    state, in either direction, and its zero input is what the convolution sees past a sequence's ends."""

    def __init__(self, config: DiffuAprielConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.left_to_right = Mamba2Mixer(config)
        self.right_to_left = Mamba2Mixer(config) if config.bidirectional else None

    @property
    def direction_scale(self) -> float:
        """What the directions' sum is multiplied by: 1/2 averages them."""
        return 0.5 if self.right_to_left is not None and self.config.bidirectional_strategy == "mean" else 1.0

    def directions(self) -> list[Mamba2Mixer]:
        return [self.left_to_right] if self.right_to_left is None else [self.left_to_right, self.right_to_left]

    def forward(
        self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
        block_context: Optional[BlockContext] = None, two_stream: bool = False,
        past_key_values: Optional[BlockDiffusionCache] = None, seq_idx: Optional[torch.Tensor] = None,
        kernels: KernelPolicy = REFERENCE_POLICY, **kwargs,
    ) -> MixerOutput:
        # hidden_states: (B, L, D); padding_mask: (B, L) bool, True at real tokens, or None for no padding; seq_idx:
        # (B, L) the documents of packed rows, or None. The attention mixer's arguments (attention_mask,
        # position_embeddings) are in kwargs, unused here.
        left_to_right, right_to_left = self.direction_outputs(
            hidden_states, padding_mask, block_context, two_stream, kernels, past_key_values, seq_idx
        )
        return MixerOutput(left_to_right, time_reversed=right_to_left, scale=self.direction_scale)

    def direction_outputs(
        self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
        block_context: Optional[BlockContext] = None, two_stream: bool = False,
        kernels: KernelPolicy = REFERENCE_POLICY, cache: Optional[BlockDiffusionCache] = None,
        seq_idx: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The left-to-right output (B, L, D), and the right-to-left output in its own reading order, still reversed
        in time (None without a second direction): their sum, scaled by `direction_scale`, is the mixer's output,
        which the block fuses with its residual add and next norm."""
        ops = kernels.mamba
        if self.config.block_size is not None:
            return self.block_direction_outputs(hidden_states, padding_mask, ops, two_stream, cache,
                                                kernels.block_documents)
        in_order, reversed_order = (hidden_states, None) if self.right_to_left is None else (
            both_reading_orders(hidden_states, use_kernel=kernels.fused_reading_orders))
        inputs = [(self.left_to_right, in_order, padding_mask, seq_idx)]
        if self.right_to_left is not None:
            reversed_mask = None if padding_mask is None else reverse_time(padding_mask)
            # Documents numbered in the reversed reading order, so that they still count up along it.
            reversed_documents = None if seq_idx is None else seq_idx.max() - reverse_time(seq_idx)
            inputs.append((self.right_to_left, reversed_order, reversed_mask, reversed_documents))
        outputs, entering_states = [], []
        for index, (direction, inputs_in_reading_order, mask, documents) in enumerate(inputs):
            if block_context is None:
                outputs.append(direction(inputs_in_reading_order, mask, ops, seq_idx=documents))
            elif block_context.recorded:  # the window alone, continuing from the state recorded where it enters
                state = block_context.mamba_state(self.layer_idx, index)
                outputs.append(direction(inputs_in_reading_order, mask, ops, initial_state=state))
            else:  # the whole sequence, recording the state at which this direction enters the window
                entry = block_context.entry_position(index, hidden_states.shape[1])
                output, state = direction(inputs_in_reading_order, mask, ops, state_at=entry)
                outputs.append(output)
                entering_states.append(state)
        if entering_states:
            block_context.update_mamba_states(self.layer_idx, entering_states)
        return outputs[0], outputs[1] if len(outputs) == 2 else None

    def block_direction_outputs(
        self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor], ops: MambaOps, two_stream: bool,
        cache: Optional[BlockDiffusionCache] = None, blocks_as_documents: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`direction_outputs` of a block diffusion model: left to right over the whole sequence, right to left
        inside each block (its blocks as rows of their own, or with `blocks_as_documents` as documents of the whole
        row: `right_to_left_in_documents`). With `two_stream`, hidden_states is the noised stream followed by the
        clean one, (B, 2L, D): the clean stream is read as a single one is, and each noised block left to right from
        the state the clean stream enters that block with. With a `cache`, the left-to-right scan continues from the
        cached state (and a consuming pass hands it the state it leaves)."""
        batch, block_size = hidden_states.shape[0], self.config.block_size
        streams = hidden_states.chunk(2, dim=1) if two_stream else (hidden_states,)
        length = streams[0].shape[1]
        if padding_mask is None and length % block_size:  # each stream's last block is padded in the rows
            padding_mask = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.bool)
        masks = (None,) * len(streams) if padding_mask is None else padding_mask.chunk(len(streams), dim=1)
        if two_stream:
            (noised, clean), (noised_mask, clean_mask) = streams, masks
            clean_out, (conv_inputs, ssm_states) = self.left_to_right(clean, clean_mask, ops, block_states=block_size)
            noised_out = self.left_to_right(noised, noised_mask, ops, entering_blocks=(conv_inputs, ssm_states))
            left_to_right = torch.cat([noised_out, clean_out], dim=1)
        elif cache is not None:
            entering = cache.mamba_state(self.layer_idx)
            if cache.consuming:
                left_to_right, leaving = self.left_to_right(hidden_states, padding_mask, ops, initial_state=entering,
                                                            state_at=length)
                cache.update_mamba_state(self.layer_idx, leaving)
            else:
                left_to_right = self.left_to_right(hidden_states, padding_mask, ops, initial_state=entering)
        else:
            left_to_right = self.left_to_right(hidden_states, padding_mask, ops)
        if self.right_to_left is None:
            return left_to_right, None
        if blocks_as_documents and is_plain_module(self.right_to_left.conv1d, nn.Conv1d):
            return left_to_right, self.right_to_left_in_documents(streams, masks, ops)
        rows = _joined([fold_blocks(stream, block_size) for stream in streams])  # (S * B * n, block, D)
        row_masks = None if padding_mask is None else _joined([fold_blocks(m, block_size) for m in masks])
        rows = self.right_to_left(reverse_time(rows), None if row_masks is None else reverse_time(row_masks), ops)
        in_time_order = [unfold_blocks(part, batch, length) for part in reverse_time(rows).chunk(len(streams))]
        # MixerOutput.combined() takes the right-to-left output reversed in time over the whole sequence.
        return left_to_right, reverse_time(_joined(in_time_order, dim=1))

    def right_to_left_in_documents(self, streams: tuple, masks: tuple, ops: MambaOps) -> torch.Tensor:
        """The right-to-left output of a block model, each block read alone, from one pass over the streams' whole
        rows (side by side on the batch axis) in which every block is a document of its own: the scan and the
        convolution restart at each (mamba-ssm's seq_idx). The same output as rows of one block each, which
        mamba-ssm's training kernels take in chunks of the block size. Returned, as `block_direction_outputs`
        returns it, in the reading order of the whole (B, S * L) sequence reversed."""
        batch, length = streams[0].shape[:2]
        # int32, as the kernels read documents.
        block_index = torch.arange(length, device=streams[0].device, dtype=torch.int32) // self.config.block_size
        # Numbered along the reversed reading order, so that they count up along it.
        documents = (block_index[-1] - block_index.flip(0)).repeat(len(streams) * batch, 1)  # (S * B, L)
        rows = reverse_time(_joined(list(streams)))  # (S * B, L, D), each row reversed
        row_masks = None if masks[0] is None else reverse_time(_joined(list(masks)))
        output = self.right_to_left(rows, row_masks, ops, seq_idx=documents)
        # The time order [stream 0, stream 1] reversed is [stream 1 reversed, stream 0 reversed].
        return _joined(list(output.chunk(len(streams))[::-1]), dim=1)


def _joined(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat, without its copy of a single part (a block model's step has one stream: a launch a layer saved)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class DiffuAprielRotaryEmbedding(nn.Module):
    """The rotary position embedding. Its frequencies are computed in float32 in each forward, on the positions'
    device, not held in a buffer: `model.to(torch.bfloat16)` would round a buffer to 8 bits of mantissa, an angle
    error of 1.2 radians at position 1,000 for heads of 128, and the model cast in memory would then disagree with
    the same model saved and loaded in bfloat16 (tests/test_model_contract.py)."""

    def __init__(self, config: DiffuAprielConfig):
        super().__init__()
        self.config = config

    @staticmethod
    def compute_inv_freq(config: DiffuAprielConfig, device=None) -> torch.Tensor:
        dim = config.head_dim
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # position_ids: (B, L) -> cos, sin: (B, L, head_dim), computed in float32.
        freqs = position_ids.float()[..., None] * self.compute_inv_freq(self.config, position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention. query: (B, H, L, d), key/value: (B, Hkv, L, d); attention_mask: boolean (True =
    attend) or additive, broadcastable to (B, H, L, L)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, L, H, d)
    return output, weights


class DiffuAprielAttention(nn.Module):
    """Bidirectional grouped-query attention with RoPE."""

    def __init__(self, config: DiffuAprielConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self, hidden_states, position_embeddings, attention_mask=None, block_context=None, padding_mask=None,
        two_stream=False, past_key_values=None, seq_idx=None, kernels: KernelPolicy = REFERENCE_POLICY, **kwargs,
    ) -> MixerOutput:
        # hidden_states: (B, L, D); attention_mask: the keys' padding (or block structure) as transformers' attention
        # interface takes it. padding_mask, two_stream and seq_idx are the Mamba mixer's arguments (attention_mask
        # carries the padding, the blocks and the documents here), unused. The implementation is the config's
        # `attn_implementation`, but for passes against a BlockDiffusionCache where `kernels` chooses the cache's own.
        batch, seqlen, _ = hidden_states.shape
        # Head counts spelled out, not -1: an empty batch has no size to infer them from.
        query = self.q_proj(hidden_states).view(batch, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        kv_shape = (batch, seqlen, self.num_key_value_heads, self.head_dim)
        key = self.k_proj(hidden_states).view(kv_shape).transpose(1, 2)  # (B, Hkv, L, d)
        value = self.v_proj(hidden_states).view(kv_shape).transpose(1, 2)
        cos, sin = position_embeddings  # (B, L, d)
        query, key = rotary(query, key, cos, sin, use_kernel=kernels.fused_rotary)
        if block_context is not None:  # a window's queries attend to the recorded outside positions, then the window
            key, value = block_context.update(key, value, self.layer_idx)  # (B, Hkv, L, d)
        if past_key_values is not None:  # the cache's buffer: the kept keys of earlier blocks, then the pass's own
            key, value = past_key_values.update(key, value, self.layer_idx)  # (B, Hkv, V, d)

        if past_key_values is not None and kernels.cache_attention:
            # The cache's visibility rule read by the kernel itself, no mask (cache_attention.py).
            output, weights = cache_attention(query, key, value, past_key_values.key_valid,
                                              past_key_values.length_tensor, past_key_values.block_size,
                                              self.scaling), None
        else:
            attention_interface = eager_attention_forward
            # transformers' fused implementations reshape with -1, which an empty batch cannot resolve; the eager one
            # gives its empty output.
            if self.config._attn_implementation != "eager" and batch > 0:
                attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            output, weights = attention_interface(
                self, query, key, value, attention_mask,
                dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, is_causal=False,
                **kwargs,
            )
        output = output.reshape(batch, seqlen, self.num_heads * self.head_dim)  # (B, L, H * d)
        return MixerOutput(self.o_proj(output), attention_weights=weights)


class DiffuAprielMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: DiffuAprielConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.act_is_silu = config.hidden_act in ("silu", "swish")

    def forward(self, x, kernels: KernelPolicy = REFERENCE_POLICY):
        one_product_from = kernels.mlp_one_product_min_tokens
        if (self.act_is_silu and one_product_from is not None and x.numel() >= one_product_from * x.shape[-1]
                and all(is_plain_module(m, nn.Linear) and m.bias is None for m in (self.gate_proj, self.up_proj))):
            # gate and up as one product, read in halves by the SwiGLU kernel (whose backward writes the product's
            # gradient in one buffer).
            gate_up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))
            return self.down_proj(swiglu_of_product(gate_up, use_kernel=kernels.fused_swiglu))
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act_is_silu:
            return self.down_proj(swiglu(gate, up, use_kernel=kernels.fused_swiglu))
        return self.down_proj(self.act_fn(gate) * up)


class DiffuAprielBlock(GradientCheckpointingLayer):
    def __init__(self, config: DiffuAprielConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = DiffuAprielRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.layer_type == MAMBA:
            self.mixer = BidirectionalMamba2Mixer(config, layer_idx)
        else:
            self.mixer = DiffuAprielAttention(config, layer_idx)
        self.post_mixer_layernorm = self.mlp = None
        if config.intermediate_size > 0:
            self.post_mixer_layernorm = DiffuAprielRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = DiffuAprielMLP(config)

    def forward(
        self, hidden_states, padding_mask=None, attention_mask=None, position_embeddings=None, block_context=None,
        two_stream=False, past_key_values=None, seq_idx=None, kernels: KernelPolicy = REFERENCE_POLICY, **kwargs,
    ):
        residual = hidden_states
        mixed = self.mixer(
            self.input_layernorm(hidden_states, kernels), padding_mask=padding_mask, attention_mask=attention_mask,
            position_embeddings=position_embeddings, block_context=block_context, two_stream=two_stream,
            past_key_values=past_key_values, seq_idx=seq_idx, kernels=kernels, **kwargs,
        )
        if self.mlp is None:
            return residual + mixed.combined(kernels), mixed.attention_weights
        # The direction sum, the residual add and the MLP's norm: one pass over the residual stream with the kernels.
        hidden_states, normed = add_rms_norm(
            residual, mixed.update, self.post_mixer_layernorm, mixed.time_reversed, mixed.scale,
            use_kernel=kernels.fused_elementwise, norm_kwargs=dict(kernels=kernels),
        )
        return hidden_states + self.mlp(normed, kernels), mixed.attention_weights


class DiffuAprielPreTrainedModel(PreTrainedModel):
    config_class = DiffuAprielConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiffuAprielBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # What transformers' `capture_outputs` collects from `DiffuAprielModel.forward`: each block's output (after the
    # embeddings, the input of the first), and each attention map (index 1 of an attention mixer's `MixerOutput`).
    _can_record_outputs = {"hidden_states": DiffuAprielBlock, "attentions": DiffuAprielAttention}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' `from_pretrained`, but weights whose shapes do not match the config raise a `ValueError` that
        names each tensor and both shapes (transformers names them only in its logged load report), and so does a
        safetensors file that cannot be read (truncated, overwritten), naming the checkpoint.
        `ignore_mismatched_sizes=True` still re-initialises mismatched weights instead."""
        if kwargs.get("ignore_mismatched_sizes"):
            return cls._load(args, kwargs)
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = cls._load(args, {**kwargs, "ignore_mismatched_sizes": True, "output_loading_info": True})
        if loading_info["mismatched_keys"]:
            raise ValueError(
                "the checkpoint's weights do not match its config: "
                + "; ".join(
                    f"{key} has shape {tuple(found)} in the checkpoint but {tuple(expected)} in the model the config "
                    "describes"
                    for key, found, expected in sorted(loading_info["mismatched_keys"])
                )
            )
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def _load(cls, args, kwargs):
        try:
            return super().from_pretrained(*args, **kwargs)
        except SafetensorError as error:
            checkpoint = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(
                f"the weights of the checkpoint {str(checkpoint)!r} cannot be read: a safetensors file is corrupt or "
                f"truncated ({error})"
            ) from error

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' `resize_token_embeddings` (rows are kept or added at the end), refusing a size that would
        drop the row of a special token: the mask token's above all, the token every noised position holds."""
        if new_num_tokens is not None:
            size = new_num_tokens
            if pad_to_multiple_of:  # transformers rounds the size up
                size = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
            eos = self.config.eos_token_id if isinstance(self.config.eos_token_id, list) else [self.config.eos_token_id]
            special = [("mask_token_id", self.config.mask_token_id), ("pad_token_id", self.config.pad_token_id),
                       ("bos_token_id", self.config.bos_token_id)] + [("eos_token_id", token) for token in eos]
            for name, token in special:
                if token is not None and token >= size:
                    raise ValueError(f"resize_token_embeddings to {size} tokens would drop the row of {name}: "
                                     f"{name} is {token}, so the vocabulary needs at least {token + 1} tokens")
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def _init_weights(self, module):
        """Mamba-2's initialisation, as mamba-ssm and transformers' `Mamba2` give it, over transformers' defaults
        (normal(0, initializer_range) for the other projections and the embeddings, norms at one, biases at zero).
        Every draw goes through transformers' `initialization` functions, which leave a weight loaded by
        `from_pretrained` untouched, and a second call draws again rather than scaling what is there (the same
        distribution: idempotent).

        Each weight is drawn where it is held: transformers calls this only on modules that hold parameters of their
        own in a model defined outside it (the MLP and the attention hold none)."""
        if isinstance(module, nn.Conv1d):  # every convolution is a Mamba mixer's
            # PyTorch's Conv1d initialisation (kaiming-uniform, a = sqrt(5): uniform within 1/sqrt(d_conv), 14x the
            # spread of normal(0, 0.02) at d_conv = 4), as mamba-ssm and transformers' `Mamba2` start it; the bias at
            # zero as transformers' (mamba-ssm keeps PyTorch's uniform bias).
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and self._is_residual_projection(module):
            # PyTorch's Linear initialisation (kaiming-uniform, a = sqrt(5): uniform within 1/sqrt(fan_in)) divided by
            # sqrt(the stack's residual branches), as mamba-ssm's `rescale_prenorm_residual` (GPT-2's scheme) does for
            # its `out_proj` and `fc2`, so that the residual stream's variance at init does not grow with depth. Drawn
            # at the scaled bound in one call: no in-place scaling that a second call would repeat.
            bound = 1 / math.sqrt(module.in_features * residual_branches(self.config))
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)
        if isinstance(module, (DiffuAprielRMSNorm, MambaRMSNormGated)):
            init.ones_(module.weight)
        elif isinstance(module, Mamba2Mixer):
            # A = -[1..H], D = 1, dt log-uniform in [dt_min, dt_max] (stored as softplus^-1(dt) in dt_bias).
            config = self.config
            init.copy_(module.A_log, torch.log(torch.arange(1, module.num_heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            log_min = torch.log(torch.tensor(config.mamba_dt_min))
            log_max = torch.log(torch.tensor(config.mamba_dt_max))
            dt = torch.exp(torch.rand(module.num_heads) * (log_max - log_min) + log_min)
            dt = dt.clamp(min=config.mamba_dt_init_floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    def _is_residual_projection(self, linear: nn.Linear) -> bool:
        """Whether `linear` writes into the residual stream: a Mamba direction's `out_proj`, an attention mixer's
        `o_proj`, an MLP's `down_proj`."""
        return linear.out_features == self.config.hidden_size and any(
            getattr(parent, name) is linear
            for parent in self.modules()
            for kind, name in RESIDUAL_PROJECTIONS
            if isinstance(parent, kind)
        )


# The projections that write into the residual stream, by the module that holds them.
RESIDUAL_PROJECTIONS = ((Mamba2Mixer, "out_proj"), (DiffuAprielAttention, "o_proj"), (DiffuAprielMLP, "down_proj"))


def residual_branches(config: DiffuAprielConfig) -> int:
    """How many branches add into the residual stream over the whole stack (mamba-ssm's n_residuals_per_layer x
    n_layer, counted per layer): each Mamba direction whose output is summed (two in a bidirectional mixer with
    `bidirectional_strategy="add"`; one when unidirectional, or averaged: the mean of two has at most one branch's
    variance), one attention mixer, and the MLP where there is one."""
    mlp = 1 if config.intermediate_size > 0 else 0
    summed_directions = 2 if config.bidirectional and config.bidirectional_strategy == "add" else 1
    return sum((summed_directions if kind == MAMBA else 1) + mlp for kind in config.layer_types)


def _costs_no_sync(tensor: torch.Tensor) -> bool:
    """Whether a check may read `tensor`'s values: a CPU tensor (no device synchronisation) outside torch.compile.
    The forward reads no device memory to check values, so that an eager CUDA pass never waits for the device: the
    API boundaries check them (generate, the data collator, the loss)."""
    return tensor.device.type == "cpu" and values_readable(tensor)


def _check_inputs(config, input_ids, inputs_embeds, attention_mask):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(getattr(input_ids, "shape", ()))
            raise ValueError(f"input_ids must be a 2-D tensor (batch, length), got shape {shape}")
        if input_ids.dtype not in INTEGER_DTYPES:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and _costs_no_sync(input_ids):
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= config.vocab_size:
                raise ValueError(
                    f"input_ids holds token ids in [{low}, {high}], outside the vocabulary [0, {config.vocab_size})"
                )
        shape = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch, length, hidden_size={config.hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}"
            )
        if not inputs_embeds.is_floating_point():
            raise TypeError(f"inputs_embeds must be a floating point tensor, got {inputs_embeds.dtype}")
        shape = inputs_embeds.shape[:2]
    if shape[1] == 0:
        raise ValueError("the inputs hold no tokens: each sequence needs at least one position")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(shape):
            raise ValueError(
                f"attention_mask must have the shape of the inputs (batch, length) = {tuple(shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype != torch.bool and _costs_no_sync(attention_mask) and not bool(
            ((attention_mask == 0) | (attention_mask == 1)).all()
        ):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")


def _check_caches(config, hidden_states, attention_mask, block_context, two_stream, past_key_values) -> None:
    """Refuse cache and stream arguments that do not fit the model or each other."""
    if block_context is not None:
        if config.block_size is not None:
            raise ValueError("block_context (the approximate cache of full-sequence models) does not apply to a "
                             "block diffusion model (config.block_size), whose blocks never read later ones: use "
                             "past_key_values=BlockDiffusionCache(...)")
        if not isinstance(block_context, BlockContext):
            raise TypeError(f"block_context must be a BlockContext, got {type(block_context).__name__}")
        block_context.check_pass(*hidden_states.shape[:2], attention_mask)
    if past_key_values is not None:
        if not isinstance(past_key_values, BlockDiffusionCache):
            raise TypeError(f"past_key_values must be a BlockDiffusionCache, got {type(past_key_values).__name__}")
        if config.block_size != past_key_values.block_size or block_context is not None or two_stream:
            raise ValueError("past_key_values (a BlockDiffusionCache) needs a block diffusion model of its block size "
                             f"({past_key_values.block_size}; the model's is {config.block_size}), and no "
                             "block_context or two_stream")
    if two_stream and (config.block_size is None or hidden_states.shape[1] % 2 or block_context is not None):
        raise ValueError("two_stream needs a block diffusion model (config.block_size), inputs holding a noised "
                         "and a clean sequence of the same length, and no block_context")


def _packed_documents(config, hidden_states, position_ids, seq_idx, other_mode) -> Optional[tuple]:
    """(position_ids, seq_idx) of rows that pack several documents, each (B, L) and derived from the other when only
    one is given (a document starts where its positions restart at 0), or None when neither is given."""
    if position_ids is None and seq_idx is None:
        return None
    shape = tuple(hidden_states.shape[:2])
    for name, value in (("position_ids", position_ids), ("seq_idx", seq_idx)):
        if value is not None and (tuple(value.shape) != shape or value.dtype not in INTEGER_DTYPES):
            raise ValueError(f"{name} must be an integer tensor of the inputs' shape {shape}, got "
                             f"{value.dtype} {tuple(value.shape)}")
    if config.block_size is not None or other_mode:
        raise ValueError("packed rows (position_ids / seq_idx) are for full-sequence models, without block_context, "
                         "past_key_values or two_stream: a block diffusion model's blocks count from a row's start")
    if seq_idx is None:
        starts = position_ids == 0
        starts[:, 0] = True
        seq_idx = starts.int().cumsum(-1) - 1
    if position_ids is None:
        index = torch.arange(shape[1], device=seq_idx.device).expand(shape)
        starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True)
        position_ids = index - torch.cummax(torch.where(starts, index, 0), dim=-1).values
    return position_ids.long(), seq_idx.int()


def _document_attention_bias(config, inputs_embeds, key_padding, seq_idx):
    """The attention mask of packed rows: a query sees the keys of its own document (and no padding)."""
    return create_bidirectional_mask(
        config=config, inputs_embeds=inputs_embeds, attention_mask=key_padding,
        and_mask_function=lambda batch_idx, head_idx, q_idx, kv_idx: seq_idx[batch_idx, q_idx] == seq_idx[batch_idx,
                                                                                                           kv_idx],
    )


def _position_ids(padding_mask, batch: int, length: int, streams: int, device) -> torch.Tensor:
    """(B, streams * length) positions counting real tokens only, so that a left-padded sequence sees the positions it
    has alone; each stream of a two-stream pass counts from 0."""
    if padding_mask is None:
        return torch.arange(length, device=device).repeat(streams).expand(batch, streams * length)
    counts = padding_mask.long().unflatten(1, (streams, length)).cumsum(-1).flatten(1)
    return (counts - 1).clamp(min=0)


def _block_attention_bias(config, inputs_embeds, key_padding, two_stream: bool):
    """The attention mask of a block diffusion model: block-causal (`block_diffusion.block_attention_mask`), or BD3-LM's
    mask over a noised and a clean stream, and the padding on the keys."""
    if "flash" in config._attn_implementation:  # its kernels take padding only, no mask of this shape
        raise ValueError(
            f"attn_implementation={config._attn_implementation!r} cannot run a block diffusion model's block-causal "
            "attention: load it with attn_implementation='sdpa', 'eager' or 'flex_attention'"
        )
    length = inputs_embeds.shape[1] // 2 if two_stream else inputs_embeds.shape[1]
    mask_of = two_stream_attention_mask if two_stream else block_attention_mask
    allowed = mask_of(length, config.block_size, device=inputs_embeds.device)  # (Q, K) bool
    return create_bidirectional_mask(
        config=config, inputs_embeds=inputs_embeds, attention_mask=key_padding,
        and_mask_function=lambda batch_idx, head_idx, q_idx, kv_idx: allowed[q_idx, kv_idx],
    )


class DiffuAprielModel(DiffuAprielPreTrainedModel):
    """Embeddings, the blocks, the final norm -> `BaseModelOutput`."""

    def __init__(self, config: DiffuAprielConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DiffuAprielBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DiffuAprielRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DiffuAprielRotaryEmbedding(config) if ATTENTION in config.layer_types else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @capture_outputs
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        block_context: Optional[BlockContext] = None,
        two_stream: bool = False,
        past_key_values: Optional[BlockDiffusionCache] = None,
        use_cache: bool = False,
        position_ids: Optional[torch.LongTensor] = None,
        seq_idx: Optional[torch.Tensor] = None,
        kernels: Optional[KernelPolicy] = None,
        **kwargs,
    ) -> BaseModelOutput:
        r"""
        block_context: a `BlockContext`. Not recorded: the whole sequence, whose pass records what lies outside the
            window. Recorded: the window's tokens alone, with the recorded padding and positions (no attention_mask).
        two_stream: block diffusion training (a model with `config.block_size`): the inputs are a noised sequence
            followed by its clean one, (B, 2L), and `attention_mask` (B, 2L) the padding of both; each noised block
            reads itself and the clean blocks before it (`block_diffusion.py`).
        past_key_values: a block diffusion model's `BlockDiffusionCache`: the inputs are whole blocks that follow the
            tokens it consumed, read against it; `attention_mask` their padding. `use_cache=True` consumes them (the
            cache moves past them); otherwise the cache is read and left as it was.
        position_ids, seq_idx: (B, L), rows packing several documents: positions restarting at 0 in each (as from
            `DataCollatorWithFlattening`), documents' indices; either gives the other. No document reads another.
        kwargs: `output_hidden_states` and `output_attentions` (one map per attention layer, eager), collected by
            transformers' `capture_outputs`; `return_dict`; the rest goes to the attention implementation.
        kernels: the `KernelPolicy` of this pass (default: `resolve_kernel_policy` for the config and the device).
        """
        _check_inputs(self.config, input_ids, inputs_embeds, attention_mask)
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, D)
        _check_caches(self.config, hidden_states, attention_mask, block_context, two_stream, past_key_values)
        kernels = kernels or resolve_kernel_policy(self.config, hidden_states.device)
        if past_key_values is not None:
            past_key_values.begin_pass(_padding_mask(hidden_states, attention_mask, None, keep_ones=True), use_cache)
        layer_inputs = self._layer_inputs(hidden_states, attention_mask, block_context, two_stream, past_key_values,
                                          (position_ids, seq_idx), kernels)
        for layer in self.layers:
            hidden_states, _ = layer(hidden_states, **layer_inputs, kernels=kernels, **kwargs)
        if block_context is not None:
            block_context.mark_recorded()
        if past_key_values is not None:
            past_key_values.end_pass()
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states, kernels))

    def _layer_inputs(self, hidden_states, attention_mask, block_context, two_stream, cache, packing,
                      kernels: KernelPolicy) -> dict:
        """What every block takes besides the hidden states: the padding (B, L) bool, True at real tokens, or None
        when nothing is padded; the documents of packed rows (`seq_idx`); with attention layers, the rotary
        embeddings and the keys' padding (and documents) in the attention implementation's form. A pass recording a
        `BlockContext` records the padding and the window's positions. packing: the (position_ids, seq_idx) given."""
        batch, seqlen = hidden_states.shape[:2]
        other_mode = block_context is not None or cache is not None or two_stream
        documents = _packed_documents(self.config, hidden_states, *packing, other_mode)
        window_pass = block_context is not None and block_context.recorded
        # A cache pass keeps its padding in the cache (key_valid, positions); its layers take None where nothing is
        # padded, as other passes do.
        padding_mask = _padding_mask(hidden_states, attention_mask, block_context)
        inputs = dict(padding_mask=padding_mask, block_context=block_context, two_stream=two_stream,
                      past_key_values=cache, seq_idx=None if documents is None else documents[1])
        position_ids = None
        if self.rotary_emb is not None:
            # Positions count real tokens only, so a left-padded sequence sees the positions it has alone.
            if documents is not None:
                position_ids = documents[0]
            elif window_pass:
                position_ids = block_context.window_position_ids
            elif cache is not None:
                position_ids = cache.pass_positions
            else:
                position_ids = _position_ids(padding_mask, batch, seqlen // 2 if two_stream else seqlen,
                                             2 if two_stream else 1, hidden_states.device)
            inputs["position_embeddings"] = self.rotary_emb(position_ids, hidden_states.dtype)
            if cache is not None:  # (the cache's attention kernel reads the cache's rule itself)
                inputs["attention_mask"] = None if kernels.cache_attention else cache.attention_mask(
                    hidden_states.dtype)
            elif documents is not None:
                inputs["attention_mask"] = _document_attention_bias(self.config, hidden_states, padding_mask,
                                                                    documents[1])
            else:
                inputs["attention_mask"] = self._attention_bias(hidden_states, padding_mask, block_context, two_stream)
        if block_context is not None and not window_pass:
            block_context.record_sequence(batch, seqlen, padding_mask, position_ids)
        return inputs

    def _attention_bias(self, hidden_states, padding_mask, block_context, two_stream):
        """The padding of the keys as the attention implementation takes it (in a window pass the whole sequence's,
        outside positions first, as its keys are). Without padding, no mask: also under CUDA-graph capture, where
        transformers would build a full one and SDPA could then not use its flash or cuDNN kernels."""
        window_pass = block_context is not None and block_context.recorded
        key_padding = block_context.key_padding_mask() if window_pass else padding_mask
        if self.config.block_size is not None:
            return _block_attention_bias(self.config, hidden_states, key_padding, two_stream)
        if key_padding is None:
            return None
        # transformers drops a mask of ones for SDPA by reading it: only where that costs no synchronisation.
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=key_padding,
                                         allow_is_bidirectional_skip=_costs_no_sync(key_padding))


def _padding_mask(hidden_states, attention_mask, block_context, keep_ones: bool = False) -> Optional[torch.Tensor]:
    """(B, L) bool, True at real tokens, or None when nothing is padded (in a window pass, the recorded padding). A mask
    of ones is recognised, and the padding path skipped, only where reading it costs no device synchronisation (a CPU
    mask); a mask on a device is kept and the padding path taken, which gives the same result without waiting for the
    device. Pass attention_mask=None when nothing is padded (generate does) for the unpadded path everywhere.
    `keep_ones`: always a mask (ones when attention_mask is None), never read."""
    if block_context is not None and block_context.recorded:
        return block_context.window_padding_mask()
    if attention_mask is None:
        return hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.bool) if keep_ones else None
    if not keep_ones and _costs_no_sync(attention_mask) and bool(attention_mask.all()):
        return None
    return attention_mask.to(device=hidden_states.device, dtype=torch.bool)


def _kept_positions(hidden_states: torch.Tensor, logits_to_keep: Union[int, torch.Tensor]) -> torch.Tensor:
    """The rows of hidden_states (B, L, D) that `logits_to_keep` names (see `DiffuAprielForMaskedLM.forward`)."""
    length = hidden_states.shape[1]
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.dtype not in INTEGER_DTYPES:
            raise ValueError(f"logits_to_keep as a tensor must be 1-D integer positions, got a "
                             f"{logits_to_keep.dim()}-D {logits_to_keep.dtype} tensor")
        if _costs_no_sync(logits_to_keep) and logits_to_keep.numel() and not (
            0 <= int(logits_to_keep.min()) and int(logits_to_keep.max()) < length
        ):
            raise ValueError(f"logits_to_keep names positions outside the sequence [0, {length})")
        return hidden_states.index_select(1, logits_to_keep.to(hidden_states.device))
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
        raise TypeError(f"logits_to_keep must be an int or a tensor of positions, got {type(logits_to_keep).__name__}")
    if not 0 <= logits_to_keep <= length:
        raise ValueError(f"logits_to_keep must be in [0, {length}] (0 keeps all), got {logits_to_keep}")
    return hidden_states[:, length - logits_to_keep :] if logits_to_keep else hidden_states


def vocab_logits(hidden_states: torch.Tensor, weight: torch.Tensor, vocab_multiple: int = 1) -> torch.Tensor:
    """The LM head, hidden_states (..., D) @ weight (V, D)^T -> (..., V). The vocabulary is padded to a multiple
    of `vocab_multiple` for the product (`KernelPolicy.vocab_multiple`: 8 on CUDA, from 512 tokens) and the padding
    sliced off (a strided view): rows of an odd width such as GPT-2's 50,258 are not 16-byte aligned, which sends
    cuBLAS to a kernel 2.4x slower (24.4 vs 10.4 ms for 32K tokens on an H200); the values are the same."""
    pad = -weight.shape[0] % vocab_multiple
    if pad == 0:
        return F.linear(hidden_states, weight)
    padded = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])  # F.pad's copy kernel is 4x slower
    return F.linear(hidden_states, padded)[..., : weight.shape[0]]


def _two_streams(input_ids, attention_mask, labels):
    """The inputs of a block diffusion model's training pass: the noised sequence and the clean one after it, the clean
    tokens read from `labels` where they are given (the masked positions) and from `input_ids` elsewhere."""
    if input_ids is None:
        raise ValueError("a block diffusion model's loss needs input_ids: its clean stream is built from input_ids "
                         "and labels, which inputs_embeds cannot give")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    clean = torch.where(labels == -100, input_ids, labels)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask], dim=1)
    return torch.cat([input_ids, clean], dim=1), attention_mask


class DiffuAprielForMaskedLM(DiffusionGenerationMixin, DiffuAprielPreTrainedModel):
    """The denoiser: `DiffuAprielModel` and an LM head -> `MaskedLMOutput`. Its logits are the head's output, every
    vocabulary entry included; the mask token is excluded where probabilities are formed (the loss, the samplers)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # The loss is normalised inside forward by its own count (the positions with a positive weight), not by
    # Trainer's `num_items_in_batch` (the labelled positions): without this, Trainer would see `**kwargs`, assume the
    # model normalises by `num_items_in_batch`, and skip its division by the gradient accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: DiffuAprielConfig):
        super().__init__(config)
        self.model = DiffuAprielModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        loss_weights: Optional[torch.Tensor] = None,
        block_context: Optional[BlockContext] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        skip_logits: Optional[bool] = None,
        **kwargs,
    ) -> MaskedLMOutput:
        r"""
        labels: (B, L) the clean token at each position to predict, -100 elsewhere.
        loss_weights: (B, L) the MDLM weight 1/t of each position that counts in the loss normalisation (masked or
            not), 0 at padding and at positions never noised (an SFT prompt). Without it, the loss is the plain
            mean cross-entropy over the labelled positions.
        block_context: a `BlockContext`, as in `DiffuAprielModel.forward`.
        logits_to_keep: the positions whose logits to compute, as in transformers' language models: 0 for all, an
            int k for the last k, or a 1-D tensor of positions (logits (B, K, V) in its order). `generate` keeps
            those of the block being filled: the LM head is then a few rows, not the whole sequence's (at 64K tokens
            of a 1.3B model, 5% of a step, and its 6.6 GB of logits).
        skip_logits: compute the loss from the labelled positions' logits alone and return no logits (None), as
            Liger-Kernel's `skip_logits` does: a training step needs the loss only, and the logits of every position
            (B, L, V), in float32 for the cross-entropy, are most of its LM head's memory and time. None (default):
            when `labels` are given to a model in training mode with gradients enabled (a `Trainer` step; its
            evaluation runs in eval mode and gets the logits). The loss and its gradients are those of the full
            logits; finding the labelled positions reads the labels (a host synchronisation on CUDA).
        """
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("the loss needs the logits of every position: pass labels with logits_to_keep=0")
        if skip_logits is None:
            skip_logits = labels is not None and self.training and torch.is_grad_enabled()
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True returns the loss alone: it needs labels")
        two_stream = self.config.block_size is not None and labels is not None
        if two_stream:  # BD3-LM: the noised blocks read the clean ones before them
            input_ids, attention_mask = _two_streams(input_ids, attention_mask, labels)
        inputs = input_ids if input_ids is not None else inputs_embeds
        kernels = resolve_kernel_policy(self.config, inputs.device) if inputs is not None else REFERENCE_POLICY
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            block_context=block_context, two_stream=two_stream, kernels=kernels, return_dict=True, **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if two_stream:  # the logits of the noised stream
            hidden_states = hidden_states[:, : hidden_states.shape[1] // 2]
        hidden_states = _kept_positions(hidden_states, logits_to_keep)
        mask_token_id = self.config.mask_token_id
        if skip_logits:  # the head over the N labelled positions alone: (N, D) -> (N, V)
            positions = labelled_positions(labels, hidden_states.shape[:2])
            loss = masked_diffusion_loss(self._head(hidden_states[positions], kernels), labels, loss_weights,
                                         mask_token_id, positions, nll_function=kernels.token_nll)
            logits = None
        else:
            logits = self._head(hidden_states, kernels)
            loss = None if labels is None else masked_diffusion_loss(logits, labels, loss_weights, mask_token_id,
                                                                     nll_function=kernels.token_nll)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _head(self, hidden_states: torch.Tensor, kernels: KernelPolicy) -> torch.Tensor:
        """The LM head over hidden_states (..., D) -> (..., V)."""
        if is_plain_module(self.lm_head, nn.Linear) and self.lm_head.bias is None:
            padded = hidden_states.shape[:-1].numel() >= kernels.vocab_padding_min_tokens
            return vocab_logits(hidden_states, self.lm_head.weight, kernels.vocab_multiple if padded else 1)
        return self.lm_head(hidden_states)  # an offloaded or adapted head: called, so that its hook or adapter acts

    @torch.no_grad()
    def compute_elbo(self, input_ids, attention_mask=None, num_samples: int = 16, seed: int = 0):
        """The negative ELBO of each sequence in nats (B,), over a fixed grid of `num_samples` diffusion times and a
        fixed masking seed, so that two calls agree exactly (see `diffuapriel_hf.modeling.diffusion.negative_elbo`)."""
        return negative_elbo(self, input_ids, attention_mask=attention_mask, num_samples=num_samples, seed=seed)

    @torch.no_grad()
    def compute_conditional_elbo(self, input_ids, prompt_mask, attention_mask=None, num_samples: Optional[int] = None,
                                 seed: int = 0, estimator: Optional[str] = None):
        """The negative ELBO of each row's continuation (its real tokens outside `prompt_mask`) given its prompt, which
        is never noised: a `ConditionalNegativeELBO` of `nats`, `bits` and `num_tokens`, each (B,). `estimator`:
        "count_stratified" (the default), "time_stratified" or "time_grid", over `num_samples` passes (default 16)
        and masks drawn from `seed` row by row, so a row scores the same alone as in a padded batch (see
        `diffuapriel_hf.modeling.likelihood`)."""
        return conditional_negative_elbo(
            self, input_ids, prompt_mask, attention_mask=attention_mask,
            num_samples=DEFAULT_NUM_SAMPLES if num_samples is None else num_samples, seed=seed,
            estimator=DEFAULT_ESTIMATOR if estimator is None else estimator,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`. Where the model's code is written with it (the classes are registered
        for the Auto classes, so config.json gets `auto_map`), config.json also names the text-generation pipeline
        (`custom_pipelines`), whose file is written with the code (a relative import of this one): then
        `pipeline("text-generation", model=folder, trust_remote_code=True)` generates by diffusion."""
        if self._auto_class is not None:
            self.config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)
        return super().save_pretrained(save_directory, *args, **kwargs)


__all__ = [
    "BidirectionalMamba2Mixer",
    "DiffuAprielAttention",
    "DiffuAprielBlock",
    "DiffuAprielForMaskedLM",
    "DiffuAprielMLP",
    "DiffuAprielModel",
    "DiffuAprielPreTrainedModel",
    "DiffuAprielRMSNorm",
    "Mamba2Mixer",
    "MambaRMSNormGated",
    "MixerOutput",
    "residual_branches",
]
