"""The SSD backward's kernels (`ssd_backward_triton.py`), the walk of the states' gradient, the gradient of the
chunks' inputs and the products at a chunk's pairs of positions (dCB and ddA): their PyTorch references against
autograd through the `mamba_ops` references, and the Triton kernels against the references on the CPU under Triton's
interpreter (TRITON_INTERPRET=1), in float32 (the interpreter's bf16 products are wrong, as of Triton 3.9). In bf16,
against mamba-ssm's kernels, at the 1.3B sizes: `test_gpu_kernels.py`."""

import pytest
import torch

from test_gpu_kernels import chunk_inputs, rel_err, walk_inputs

from diffuapriel_hf.modeling.mamba_ops import (chunk_scan_from_states_reference, chunk_state_reference,
                                               state_passing_reference)

pytest.importorskip("triton")

from diffuapriel_hf.modeling.ssd_backward_triton import (LAUNCH_FEW_WALKS,  # noqa: E402 (needs triton)
                                                         LAUNCH_MANY_WALKS, chunk_inputs_backward,
                                                         chunk_inputs_backward_reference, chunk_pairs_backward,
                                                         chunk_pairs_backward_reference, entering_states_backward,
                                                         entering_states_backward_reference,
                                                         launch_chunk_inputs_backward, launch_chunk_pairs_backward,
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
    return dict(errors=errors, refusals=refusals, chunk_inputs=chunk_inputs_checks(), chunk_pairs=chunk_pairs_checks())


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


# The gradient of the chunks' inputs. (batch, length, heads, head_dim, groups, state, chunk, D's dimensions, launch):
# a partial last chunk, sizes under a tile and groups under the default launch; small tiles (16) for a head's channels
# and its state over two tiles each, two programs a chunk (the second past the sequence's end in the last), the
# chunk's later positions in two products; a single chunk without D.
SMALL_TILES = dict(block_m=16, block_p=16, block_k=16, block_n=16, num_warps=4, num_stages=2)
CHUNK_INPUT_CASES = {
    "partial chunk, groups": ((2, 45, 4, 8, 2, 8, 16), 1, None),
    "two tiles of each, D per channel": ((1, 40, 2, 20, 1, 24, 32), 2, SMALL_TILES),
    "one chunk, no D": ((1, 32, 2, 16, 1, 16, 32), 0, SMALL_TILES),
}


def with_D(sizes, D_dims: int, seed: int = 0):
    """`chunk_inputs` of these sizes, and D of `D_dims` dimensions, (heads,) or (heads, head_dim) (0: None)."""
    inputs, C = chunk_inputs(*sizes, seed=seed)
    if D_dims == 0:
        return inputs, C, None
    generator = torch.Generator().manual_seed(seed)
    return inputs, C, 1 + 0.2 * torch.randn(sizes[2:4][:D_dims], generator=generator)


@pytest.mark.parametrize("D_dims", [1, 2])
def test_chunk_inputs_reference_gives_autograds_gradients(D_dims):
    """dx, ddt and dD are the gradients with respect to x, dt_chunks and D of <dy, y> + <dstates, s>, where y is the
    chunks' outputs from their own inputs (`chunk_scan_from_states_reference` from zero entering states: the part of
    y that x reaches inside its chunk, with D x) and s the state each chunk leaves (`chunk_state_reference`), on a
    sequence whose last chunk is partial, with two groups."""
    sizes = (2, 45, 4, 8, 2, 8, 16)
    (x, dt_chunks, dA_cumsum, B, CB, dy, dstates), C, D = with_D(sizes, D_dims)
    batch, length, heads, head_dim, _, state, chunk = sizes
    chunks = dt_chunks.shape[2]
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, 0, 0, chunks * chunk - length))  # noqa: E731
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, dt_chunks, D)]
    x_leaf, dt_leaf, D_leaf = leaves
    zero_states = torch.zeros(batch, chunks, heads, head_dim, state)
    y = chunk_scan_from_states_reference(pad(B), pad(C), pad(x_leaf), dt_leaf, dA_cumsum, zero_states, D=D_leaf)
    states = chunk_state_reference(B, x_leaf, dt_leaf, dA_cumsum)
    ((y[:, :length] * dy).sum() + (states * dstates).sum()).backward()

    dx, ddt, dD = chunk_inputs_backward_reference(x, dt_chunks, dA_cumsum, B, CB, dy, dstates, D=D)
    for got, expected in zip((dx, ddt, dD), leaves):
        assert got.shape == expected.shape
        assert rel_err(got, expected.grad) <= 1e-5
    assert torch.all(ddt.flatten(-2)[..., length:] == 0)


def chunk_inputs_checks() -> dict:
    """The gradient of the chunks' inputs under the interpreter (see `interpreted_checks`)."""
    errors = {}
    for seed, (name, (sizes, D_dims, launch)) in enumerate(CHUNK_INPUT_CASES.items()):
        inputs, _, D = with_D(sizes, D_dims, seed)
        if launch is None:
            got = chunk_inputs_backward(*inputs, D=D)
        else:
            got = launch_chunk_inputs_backward(*inputs, D, None, **launch)
        expected = chunk_inputs_backward_reference(*inputs, D=D)
        errors[name] = dict(dx=rel_err(got[0], expected[0]), ddt=rel_err(got[1], expected[1]),
                            dD=None if D is None else rel_err(got[2], expected[2]), dD_returned=got[2] is not None)
    # dx written into a bf16 view of a wider tensor (as the mixer's gradient of the convolution's output is), from the
    # same float32 sums as the reference's.
    inputs, _, D = with_D(CHUNK_INPUT_CASES["partial chunk, groups"][0], 1)
    x = inputs[0]
    written = []
    for function in (chunk_inputs_backward, chunk_inputs_backward_reference):
        wide = torch.zeros(*x.shape[:2], x.shape[2] * x.shape[3] + 3, dtype=torch.bfloat16)
        dx = wide[..., 1:-2].unflatten(-1, x.shape[2:])
        returned = function(*inputs, D=D, dx=dx)[0]
        written.append(dict(wide=wide, same=returned.data_ptr() == dx.data_ptr()))
    errors["bf16 view"] = dict(dx=rel_err(written[0]["wide"][..., 1:-2], written[1]["wide"][..., 1:-2]),
                               in_place=written[0]["same"],
                               untouched=bool((written[0]["wide"][..., [0, -2, -1]] == 0).all()))
    x, dt_chunks, dA_cumsum, B, CB, dy, dstates = inputs
    refusals = {}
    for name, call in {
        "dy of another shape": lambda: chunk_inputs_backward(x, dt_chunks, dA_cumsum, B, CB, dy[:, 1:], dstates),
        "too few chunks": lambda: chunk_inputs_backward(x, dt_chunks[:, :, 1:], dA_cumsum, B, CB, dy, dstates),
        "CB of another chunk": lambda: chunk_inputs_backward(x, dt_chunks, dA_cumsum, B, CB[..., 1:], dy, dstates),
        "dstates of another state": lambda: chunk_inputs_backward(x, dt_chunks, dA_cumsum, B, CB, dy,
                                                                  dstates[..., 1:]),
        "D per group": lambda: chunk_inputs_backward(x, dt_chunks, dA_cumsum, B, CB, dy, dstates, D=D[:2]),
        "bf16 CB": lambda: chunk_inputs_backward(x, dt_chunks, dA_cumsum, B, CB.bfloat16(), dy, dstates),
    }.items():
        try:
            call()
        except (ValueError, TypeError) as error:
            refusals[name] = str(error)
    return dict(errors=errors, refusals=refusals)


@pytest.mark.parametrize("case", list(CHUNK_INPUT_CASES))
def test_interpreted_chunk_inputs_gradient_matches_the_reference(interpreted, case):
    errors = interpreted["chunk_inputs"]["errors"][case]
    assert errors["dx"] <= 1e-5 and errors["ddt"] <= 1e-5
    assert errors["dD"] <= 1e-5 if CHUNK_INPUT_CASES[case][1] else not errors["dD_returned"]


def test_interpreted_chunk_inputs_gradient_writes_dx_into_the_bf16_view_given(interpreted):
    errors = interpreted["chunk_inputs"]["errors"]["bf16 view"]
    assert errors["in_place"] and errors["untouched"]
    # The interpreter rounds float32 to bf16 toward zero (Triton 3.9; a GPU to nearest, as the reference does): half
    # the values one bf16 step apart.
    assert errors["dx"] <= 1e-2


def test_chunk_inputs_gradient_refuses_inconsistent_inputs(interpreted):
    refusals = interpreted["chunk_inputs"]["refusals"]
    assert "dy must be x's shape (2, 45, 4, 8)" in refusals["dy of another shape"]
    assert "dt_chunks' 2 chunks of 16 must cover x's 45 positions" in refusals["too few chunks"]
    assert "CB must be (2, 3, 2, 16, 16)" in refusals["CB of another chunk"]
    assert "dstates must be (2, 3, 4, 8, 8)" in refusals["dstates of another state"]
    assert "D must be (4,) or (4, 8)" in refusals["D per group"]
    assert "CB must be float32" in refusals["bf16 CB"]


# The products at a chunk's pairs of positions. (batch, length, heads, head_dim, groups, state, chunk, launch): a
# partial last chunk, two groups of two heads and sizes under a tile under the default launch (one row tile of 16);
# two row tiles of 16 a chunk and a group's three heads split in two and one, a head's 20 channels masked in a tile of
# 32; one chunk of two row tiles under the default launch (32 rows a program), one group of three heads.
CHUNK_PAIR_CASES = {
    "partial chunk, groups": ((2, 45, 4, 8, 2, 8, 16), None),
    "row tiles, head splits": ((1, 100, 6, 20, 2, 24, 32), dict(block_m=16, head_splits=2, num_warps=4, num_stages=2)),
    "one chunk, one group": ((1, 64, 3, 16, 1, 8, 64), None),
}


def pairs_inputs(sizes, seed: int = 0):
    """x, dt_chunks, dA_cumsum, dy, CB and the number of groups (`chunk_pairs_backward`'s arguments), and B and C."""
    (x, dt_chunks, dA_cumsum, B, CB, dy, _), C = chunk_inputs(*sizes, seed=seed)
    return (x, dt_chunks, dA_cumsum, dy, CB, sizes[4]), B, C


@pytest.mark.parametrize("case", list(CHUNK_PAIR_CASES))
def test_chunk_pairs_reference_gives_autograds_gradients(case):
    """Through `chunk_scan_from_states_reference` from zero entering states (the part of y that x reaches inside its
    chunk, CB[t, s] = C_t . B_s), with dA_cumsum the running sum of leaf increments dA inside each chunk: dA's
    gradient is ddA (mamba-ssm's stable kernel's: the chunk's own outputs' part, which is all of it here), and C's and
    B's are dCB's products with B and C, dC_t = sum_s dCB[t, s] B_s and dB_s = sum_t dCB[t, s] C_t."""
    sizes = CHUNK_PAIR_CASES[case][0]
    (x, dt_chunks, dA_cumsum, dy, CB, groups), B, C = pairs_inputs(sizes)
    batch, length, heads, head_dim, _, state, chunk = sizes
    chunks = dt_chunks.shape[2]
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, 0, 0, chunks * chunk - length))  # noqa: E731
    B_leaf, C_leaf = (t.detach().float().requires_grad_(True) for t in (B, C))
    increments = torch.diff(dA_cumsum, dim=-1, prepend=torch.zeros_like(dA_cumsum[..., :1])).requires_grad_(True)
    zero_states = torch.zeros(batch, chunks, heads, head_dim, state)
    y = chunk_scan_from_states_reference(pad(B_leaf), pad(C_leaf), pad(x), dt_chunks, torch.cumsum(increments, -1),
                                         zero_states)
    (y[:, :length] * dy).sum().backward()

    dCB, ddA = chunk_pairs_backward_reference(x, dt_chunks, dA_cumsum, dy, CB, groups)
    assert dCB.shape == CB.shape and ddA.shape == dA_cumsum.shape
    assert dCB.dtype == ddA.dtype == torch.float32
    assert rel_err(ddA, increments.grad) <= 1e-5
    assert torch.all(ddA[..., 0] == 0) and torch.all(dCB.triu(1) == 0)
    B_chunks, C_chunks = (pad(t.float()).unflatten(1, (chunks, chunk)) for t in (B, C))  # (b, c, k, g, n)
    dC = torch.einsum("bcgts,bcsgn->bctgn", dCB, B_chunks).flatten(1, 2)[:, :length]
    dB = torch.einsum("bcgts,bctgn->bcsgn", dCB, C_chunks).flatten(1, 2)[:, :length]
    assert rel_err(dC, C_leaf.grad) <= 1e-5
    assert rel_err(dB, B_leaf.grad) <= 1e-5


def chunk_pairs_checks() -> dict:
    """The products at a chunk's pairs of positions under the interpreter (see `interpreted_checks`)."""
    errors = {}
    for seed, (name, (sizes, launch)) in enumerate(CHUNK_PAIR_CASES.items()):
        inputs, _, _ = pairs_inputs(sizes, seed)
        got = chunk_pairs_backward(*inputs) if launch is None else launch_chunk_pairs_backward(*inputs, **launch)
        expected = chunk_pairs_backward_reference(*inputs)
        errors[name] = dict(dCB=rel_err(got[0], expected[0]), ddA=rel_err(got[1], expected[1]),
                            shapes=[list(t.shape) for t in got] == [list(t.shape) for t in expected],
                            float32=all(t.dtype == torch.float32 for t in got))
    x, dt_chunks, dA_cumsum, dy, CB, groups = pairs_inputs(CHUNK_PAIR_CASES["partial chunk, groups"][0])[0]
    refusals = {}
    for name, call in {
        "dy of another shape": lambda: chunk_pairs_backward(x, dt_chunks, dA_cumsum, dy[:, 1:], CB, groups),
        "another number of groups": lambda: chunk_pairs_backward(x, dt_chunks, dA_cumsum, dy, CB, 1),
        "bf16 decays": lambda: chunk_pairs_backward(x, dt_chunks, dA_cumsum.bfloat16(), dy, CB, groups),
        "groups not dividing the heads": lambda: chunk_pairs_backward(x, dt_chunks, dA_cumsum, dy, CB, 3),
    }.items():
        try:
            call()
        except (ValueError, TypeError) as error:
            refusals[name] = f"{type(error).__name__}: {error}"
    return dict(errors=errors, refusals=refusals)


@pytest.mark.parametrize("case", list(CHUNK_PAIR_CASES))
def test_interpreted_chunk_pairs_match_the_reference(interpreted, case):
    errors = interpreted["chunk_pairs"]["errors"][case]
    assert errors["shapes"] and errors["float32"]
    assert errors["dCB"] <= 1e-5 and errors["ddA"] <= 1e-5


def test_chunk_pairs_refuse_inconsistent_inputs(interpreted):
    refusals = interpreted["chunk_pairs"]["refusals"]
    assert refusals["dy of another shape"] == "ValueError: dy must be x's shape (2, 45, 4, 8), got (2, 44, 4, 8)"
    assert refusals["another number of groups"].startswith("ValueError: CB must be (2, 3, 1, 16, 16)")
    assert refusals["bf16 decays"] == "TypeError: dA_cumsum must be float32, got torch.bfloat16"
    assert refusals["groups not dividing the heads"] == "ValueError: ngroups must divide x's 4 heads, got 3"
