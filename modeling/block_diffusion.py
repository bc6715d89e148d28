"""Block diffusion (BD3-LM's factorisation, with Mamba-2's scans): small pure functions on tensors.

A block model cuts the sequence into blocks of `block_size` tokens from its first position. The left-to-right scan
runs over the whole sequence; the right-to-left scan and attention's view of the future stop at the end of each
block. So the logits of a block depend on that block and the blocks before it, never on later ones, and
    -log p(x) <= sum_b NELBO(x_b | x_<b),
each block a masked diffusion model conditioned on the clean blocks before it.

Training computes every block's term in one forward of two streams side by side, the noised sequence first and the
clean one after it (BD3-LM's layout): a noised block reads its own tokens both ways and the clean blocks before it;
the clean stream is the block model run on the clean sequence.
"""

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "block_attention_mask",
    "fold_blocks",
    "num_blocks",
    "sample_block_times",
    "two_stream_attention_mask",
    "unfold_blocks",
]


def num_blocks(length: int, block_size: int) -> int:
    """How many blocks a sequence of `length` tokens has (the last may be shorter)."""
    return -(-length // block_size)


def block_attention_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """(L, L) bool, True where query i may attend to key j: j's block is i's block or an earlier one."""
    block = torch.arange(length, device=device) // block_size  # (L,)
    return block[None, :] <= block[:, None]


def two_stream_attention_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """(2L, 2L) bool over the noised stream (positions 0..L-1) followed by the clean stream (L..2L-1), BD3-LM's mask:
    a noised token sees its own noised block and the clean blocks before it; a clean token sees the clean stream
    block-causally; nothing sees a later block, and the clean stream never sees the noised one."""
    block = torch.arange(length, device=device) // block_size  # (L,)
    same_block = block[:, None] == block[None, :]
    earlier_block = block[None, :] < block[:, None]
    block_causal = same_block | earlier_block
    noised_rows = torch.cat([same_block, earlier_block], dim=1)  # (L, 2L)
    clean_rows = torch.cat([torch.zeros_like(block_causal), block_causal], dim=1)
    return torch.cat([noised_rows, clean_rows], dim=0)


def fold_blocks(x: torch.Tensor, block_size: int, value=0) -> torch.Tensor:
    """(B, L, ...) -> (B * n, block_size, ...): each block a row of its own, the last padded with `value` at its end
    when L is not a multiple of block_size."""
    pad = -x.shape[1] % block_size
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad), value=value)
    return x.reshape(x.shape[0] * (x.shape[1] // block_size), block_size, *x.shape[2:])


def unfold_blocks(x: torch.Tensor, batch_size: int, length: int) -> torch.Tensor:
    """The inverse of `fold_blocks`: (B * n, block_size, ...) -> (B, length, ...), the last block's padding dropped."""
    return x.reshape(batch_size, -1, *x.shape[2:])[:, :length]


def sample_block_times(
    batch_size: int, blocks: int, sampling_eps: float = 1e-3, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Diffusion times for every block of a batch, stratified across all B * n of them (MDLM's antithetic sampling,
    as `diffusion.sample_times` does per sequence): one shared uniform offset u, t_k = (u + k / (B n)) mod 1 for the
    blocks in a random order, mapped to [sampling_eps, 1). Returns (B, n) float32 on the CPU."""
    if batch_size < 1 or blocks < 1:
        raise ValueError(f"batch_size and blocks must be >= 1, got {batch_size} and {blocks}")
    if not 0 < sampling_eps < 1:
        raise ValueError(f"sampling_eps must be in (0, 1), got {sampling_eps}")
    count = batch_size * blocks
    offset = torch.rand(1, generator=generator)
    strata = torch.randperm(count, generator=generator)  # which stratum each block draws from
    u = (offset + strata / count) % 1.0
    return (sampling_eps + (1.0 - sampling_eps) * u).reshape(batch_size, blocks)
