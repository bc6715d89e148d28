"""Block diffusion's pure functions: the attention masks, folding blocks into rows, the states entering blocks (the
SSD's state passing, blocks in place of chunks) and the blocks' diffusion times."""

import pytest
import torch

from diffuapriel_hf.modeling.block_diffusion import (
    block_attention_mask,
    fold_blocks,
    num_blocks,
    sample_block_times,
    two_stream_attention_mask,
    unfold_blocks,
)
from diffuapriel_hf.modeling.mamba_ops import (
    chunk_scan_from_states_reference,
    chunk_state_reference,
    mamba_chunk_scan_combined_reference,
    state_passing_reference,
)


def test_block_attention_mask():
    mask = block_attention_mask(5, 2)
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_two_stream_attention_mask():
    mask = two_stream_attention_mask(4, 2)  # noised 0-3, clean 4-7
    expected = torch.tensor([
        # noised block 0 sees itself only; noised block 1 sees itself and clean block 0
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        # the clean stream is block-causal over itself
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("length", [8, 7])
def test_fold_and_unfold_blocks(length):
    x = torch.arange(2 * length * 3).reshape(2, length, 3)
    folded = fold_blocks(x, 4)
    assert folded.shape == (2 * num_blocks(length, 4), 4, 3)
    assert torch.equal(folded[1], x[0, 4:8]) if length == 8 else torch.equal(folded[1, :3], x[0, 4:7])
    if length == 7:
        assert torch.equal(folded[1, 3], torch.zeros(3, dtype=x.dtype))  # the last block's padding
    assert torch.equal(unfold_blocks(folded, 2, length), x)


@pytest.mark.parametrize("with_initial_state", [False, True])
def test_states_entering_blocks_continue_the_scan(with_initial_state):
    """The states a left-to-right scan carries into each block equal those of one scan over the whole sequence."""
    torch.manual_seed(0)
    batch, length, heads, head_dim, state, block = 2, 12, 3, 4, 5, 4
    x = torch.randn(batch, length, heads, head_dim)
    dt = torch.rand(batch, length, heads)
    A = -torch.rand(heads) - 0.5
    B, C = torch.randn(batch, length, 1, state), torch.randn(batch, length, 1, state)
    initial = torch.randn(batch, heads, head_dim, state) if with_initial_state else None

    def scan(x, dt, B, C, initial_states=None):
        return mamba_chunk_scan_combined_reference(x, dt, A, B, C, 2, initial_states=initial_states,
                                                   return_final_states=True)

    # As Mamba2Mixer.states_entering_blocks: each block's state from zero, then the pass over the blocks.
    blocked_dt = dt.unflatten(1, (-1, block)).permute(0, 3, 1, 2)  # (B, H, n, block)
    dA_cumsum = torch.cumsum(blocked_dt * A[:, None, None], dim=-1)
    local_states = chunk_state_reference(B, x, blocked_dt, dA_cumsum)  # (B, n, H, P, N)
    entering, final = state_passing_reference(
        local_states.flatten(-2), dA_cumsum[..., -1], None if initial is None else initial.flatten(-2),
    )
    entering, final = entering.unflatten(-1, (head_dim, state)), final.unflatten(-1, (head_dim, state))
    first = torch.zeros(batch, heads, head_dim, state) if initial is None else initial
    torch.testing.assert_close(entering[:, 0], first)
    for b in range(1, length // block + 1):
        prefix = (t[:, : b * block] for t in (x, dt, B, C))
        leaving = entering[:, b] if b < length // block else final
        torch.testing.assert_close(leaving, scan(*prefix, initial)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [12, 10])
def test_chunk_states_are_the_states_each_chunk_leaves_from_zero(length):
    """chunk_state_reference against a scan of each chunk alone from a zero state, the last chunk short when the
    length is not a multiple of the chunk (two heads a group); states_in_fp32=False returns B's dtype."""
    torch.manual_seed(0)
    batch, heads, head_dim, state, chunk = 2, 4, 3, 5, 4
    chunks = num_blocks(length, chunk)
    x, B, C = torch.randn(batch, length, heads, head_dim), torch.randn(batch, length, 2, state), torch.randn(
        batch, length, 2, state)
    dt, A = torch.rand(batch, length, heads), -torch.rand(heads) - 0.5
    chunked_dt = fold_blocks(dt, chunk).unflatten(0, (batch, chunks)).permute(0, 3, 1, 2)  # (B, H, c, k), zeros past L
    states = chunk_state_reference(B, x, chunked_dt, torch.cumsum(chunked_dt * A[:, None, None], dim=-1))
    assert states.shape == (batch, chunks, heads, head_dim, state) and states.dtype == torch.float32
    for c in range(chunks):
        part = slice(c * chunk, (c + 1) * chunk)
        _, expected = mamba_chunk_scan_combined_reference(x[:, part], dt[:, part], A, B[:, part], C[:, part], 2,
                                                          return_final_states=True)
        torch.testing.assert_close(states[:, c], expected, rtol=1e-5, atol=1e-5)
    half = chunk_state_reference(B.half(), x.half(), chunked_dt, torch.cumsum(chunked_dt * A[:, None, None], -1),
                                 states_in_fp32=False)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="do not cover"):
        chunk_state_reference(B, x, chunked_dt[..., :2], chunked_dt[..., :2])


def test_chunk_scan_from_states_is_the_recurrence_from_each_chunks_entering_state():
    """chunk_scan_from_states_reference against the SSM's recurrence step by step, each chunk restarted from its given
    state: h_t = exp(dt_t A) h_(t-1) + dt_t x_t B_t, y_t = (C_t h_t + D x_t) silu(z_t); two heads a group."""
    torch.manual_seed(0)
    batch, chunks, chunk, heads, head_dim, groups, state = 2, 3, 4, 4, 3, 2, 5
    length = chunks * chunk
    x, z = torch.randn(batch, length, heads, head_dim), torch.randn(batch, length, heads, head_dim)
    B, C = torch.randn(batch, length, groups, state), torch.randn(batch, length, groups, state)
    dt, A, D = torch.rand(batch, heads, chunks, chunk), -torch.rand(heads) - 0.5, torch.randn(heads)
    entering = torch.randn(batch, chunks, heads, head_dim, state)
    y = chunk_scan_from_states_reference(B, C, x, dt, torch.cumsum(dt * A[:, None, None], -1), entering, D=D, z=z)
    expected = torch.empty_like(y)
    for c in range(chunks):
        h = entering[:, c].clone()  # (B, H, P, N)
        for t in range(chunk):
            position, step = c * chunk + t, dt[:, :, c, t]  # step: (B, H)
            B_t, C_t = (u[:, position].repeat_interleave(heads // groups, dim=1) for u in (B, C))  # (B, H, N)
            inputs = (step[..., None] * x[:, position])[..., None] * B_t[:, :, None]  # (B, H, P, N)
            h = torch.exp(step * A)[..., None, None] * h + inputs
            out = torch.einsum("bhpn,bhn->bhp", h, C_t) + D[:, None] * x[:, position]
            expected[:, position] = out * torch.nn.functional.silu(z[:, position])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not dt's"):
        chunk_scan_from_states_reference(B, C, x[:, :-1], dt, dt, entering)


def test_sample_block_times_are_stratified():
    generator = torch.Generator().manual_seed(0)
    t = sample_block_times(3, 4, sampling_eps=1e-3, generator=generator)
    assert t.shape == (3, 4)
    u = (t.flatten() - 1e-3) / (1 - 1e-3)
    strata = torch.sort((u * 12).floor().long()).values
    assert torch.equal(strata, torch.arange(12))  # one time in each of the 12 strata
    assert torch.equal(t, sample_block_times(3, 4, 1e-3, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="sampling_eps"):
        sample_block_times(3, 4, sampling_eps=0.0)
    with pytest.raises(ValueError, match="blocks"):
        sample_block_times(3, 0)
