"""The SSD backward's walk of the states' gradient (`ssd_backward_triton.py`): its PyTorch reference against autograd
through the references' state passing, and the Triton kernel against the reference on the CPU under Triton's
interpreter (TRITON_INTERPRET=1), in float32 (the interpreter's bf16 products are wrong, as of Triton 3.9). In bf16,
against mamba-ssm's two kernels, at the 1.3B sizes: `test_gpu_kernels.py`."""

import pytest
import torch

from test_gpu_kernels import rel_err, walk_inputs

from diffuapriel_hf.modeling.mamba_ops import state_passing_reference

pytest.importorskip("triton")

from diffuapriel_hf.modeling.ssd_backward_triton import (LAUNCH_FEW_WALKS,  # noqa: E402 (needs triton)
                                                         LAUNCH_MANY_WALKS,
                                                         entering_states_backward, entering_states_backward_reference,
                                                         launch_entering_states_backward, launch_settings)

# (batch, length, heads, head_dim, groups, state, chunk): a last chunk that is partial, sizes under a tile (masked),
# groups, a head's channels and its state each over two tiles (64 is a tile's side), a single chunk.
CASES = [
    (2, 45, 4, 8, 2, 8, 16),
    (1, 100, 2, 20, 1, 24, 32),
    (1, 40, 2, 70, 1, 72, 16),
    (2, 64, 2, 16, 1, 16, 64),
]


def test_reference_gives_autograds_gradients_through_the_state_passing():
    """dstates and ddA_chunk are the gradients of <dy, y_from_states> with respect to each chunk's own leaving state
    and its total log decay, where y_from_states_t = exp(dA_cumsum_t) C_t s_c reads the state entering its chunk and
    the states pass as `state_passing_reference` passes them."""
    batch, length, heads, head_dim, groups, state, chunk = 2, 45, 4, 8, 2, 8, 16
    C, dA_cumsum, dy, _ = walk_inputs(batch, length, heads, head_dim, groups, state, chunk)
    chunks = dA_cumsum.shape[2]
    own = torch.randn(batch, chunks, heads, head_dim, state, requires_grad=True)
    dA_chunk = dA_cumsum[..., -1].clone().requires_grad_(True)
    entering, _ = state_passing_reference(own.flatten(-2), dA_chunk)
    entering = entering.unflatten(-1, (head_dim, state))  # (b, c, h, p, n)
    C_chunks = torch.nn.functional.pad(C, (0, 0, 0, 0, 0, chunks * chunk - length)).unflatten(1, (chunks, chunk))
    C_heads = C_chunks.repeat_interleave(heads // groups, dim=3)  # (b, c, k, h, n)
    y = torch.einsum("bckhn,bchpn->bckhp", C_heads, entering) * torch.exp(dA_cumsum).permute(0, 2, 3, 1)[..., None]
    loss = (y.flatten(1, 2)[:, :length] * dy).sum()
    loss.backward()

    dstates, ddA_chunk = entering_states_backward_reference(C, dA_cumsum, dy, entering.detach(), torch.float32)
    assert rel_err(dstates, own.grad) <= 1e-5
    assert rel_err(ddA_chunk, dA_chunk.grad) <= 1e-5
    assert torch.all(dstates[:, -1] == 0) and torch.all(ddA_chunk[..., 0] == 0)


def difference(got, expected) -> float:
    """The relative error, or where nothing is expected (one chunk: its state leaves the sequence) the largest value."""
    return rel_err(got, expected) if expected.any() else got.abs().max().item()


def interpreted_checks() -> dict:
    """Run every case in this process (which must have TRITON_INTERPRET=1 set before triton was first imported)."""
    torch.set_num_threads(1)
    errors = {}
    for index, sizes in enumerate(CASES):
        C, dA_cumsum, dy, chunk_states = walk_inputs(*sizes, seed=index)
        got = entering_states_backward(C, dA_cumsum, dy, chunk_states, torch.float32)
        expected = entering_states_backward_reference(C, dA_cumsum, dy, chunk_states, torch.float32)
        errors[str(index)] = dict(dstates=difference(got[0], expected[0]), ddA_chunk=difference(got[1], expected[1]))
    # The settings for many walks (a whole head's state of 128 in one program), on the case of two tiles of each side.
    C, dA_cumsum, dy, chunk_states = walk_inputs(*CASES[2], seed=2)
    got = launch_entering_states_backward(C, dA_cumsum, dy, chunk_states, torch.float32, **LAUNCH_MANY_WALKS)
    expected = entering_states_backward_reference(C, dA_cumsum, dy, chunk_states, torch.float32)
    errors["many walks"] = dict(dstates=difference(got[0], expected[0]), ddA_chunk=difference(got[1], expected[1]))
    # Each chunk's products unrolled (16 tokens each: one to four a chunk), with a partial last chunk.
    for index in (0, 1, 3):
        C, dA_cumsum, dy, chunk_states = walk_inputs(*CASES[index], seed=index)
        got = launch_entering_states_backward(C, dA_cumsum, dy, chunk_states, torch.float32,
                                              **dict(LAUNCH_FEW_WALKS, block_k=16, unroll_chunk=True))
        expected = entering_states_backward_reference(C, dA_cumsum, dy, chunk_states, torch.float32)
        errors[f"unrolled {index}"] = dict(dstates=difference(got[0], expected[0]),
                                           ddA_chunk=difference(got[1], expected[1]))
    # dstates in another dtype than the inputs' (mamba-ssm's: x's), from the same float32 sums.
    C, dA_cumsum, dy, chunk_states = walk_inputs(*CASES[1])
    rounded = entering_states_backward(C, dA_cumsum, dy, chunk_states, torch.bfloat16)[0]
    expected = entering_states_backward_reference(C, dA_cumsum, dy, chunk_states, torch.bfloat16)[0]
    errors["rounded"] = dict(dtype=str(rounded.dtype), dstates=rel_err(rounded, expected))
    C, dA_cumsum, dy, chunk_states = walk_inputs(*CASES[0])
    refusals = {}
    for name, call in {
        "C of another length": lambda: entering_states_backward(C[:, :-1], dA_cumsum, dy, chunk_states, C.dtype),
        "too few chunks": lambda: entering_states_backward(C, dA_cumsum[:, :, 1:], dy, chunk_states, C.dtype),
        "bf16 states": lambda: entering_states_backward(C, dA_cumsum, dy, chunk_states.bfloat16(), C.dtype),
        "states of another shape": lambda: entering_states_backward(C, dA_cumsum, dy, chunk_states[:, 1:], C.dtype),
    }.items():
        try:
            call()
        except (ValueError, TypeError) as error:
            refusals[name] = str(error)
    return dict(errors=errors, refusals=refusals)


@pytest.mark.parametrize("case", [str(index) for index in range(len(CASES))]
                         + ["many walks", "unrolled 0", "unrolled 1", "unrolled 3"])
def test_interpreted_walk_matches_the_reference(interpreted, case):
    assert interpreted["errors"][case]["dstates"] <= 1e-5
    assert interpreted["errors"][case]["ddA_chunk"] <= 1e-5


def test_launch_settings_give_a_whole_1_3b_head_state_to_one_program_from_128_walks():
    assert launch_settings(2, 64) == LAUNCH_MANY_WALKS and launch_settings(16, 64) == LAUNCH_MANY_WALKS
    assert launch_settings(1, 64)["block_n"] * 4 == 128  # four programs a walk where there are fewer


def test_interpreted_walk_writes_dstates_in_the_dtype_asked_for(interpreted):
    # rounded to bf16 from float32 sums whose order may differ in the last bit
    assert interpreted["errors"]["rounded"]["dtype"] == "torch.bfloat16"
    assert interpreted["errors"]["rounded"]["dstates"] <= 1e-2


def test_walk_refuses_inconsistent_inputs(interpreted):
    refusals = interpreted["refusals"]
    assert "C must be (batch, length, groups, state)" in refusals["C of another length"]
    assert "dA_cumsum must be (batch, heads, chunks, chunk) covering 45 positions" in refusals["too few chunks"]
    assert "must be float32" in refusals["bf16 states"]
    assert "chunk_states must be (2, 3, 4, 8, 8)" in refusals["states of another shape"]
