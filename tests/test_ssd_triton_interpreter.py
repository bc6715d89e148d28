"""Our single-pass Triton SSD kernel (`ssd_triton.py`) on the CPU, run by Triton's interpreter (TRITON_INTERPRET=1)
against the PyTorch reference: its indexing, masking and arithmetic, for several tile sizes. The compiled kernel, its
bf16 results and its speed are tested on a GPU (`test_gpu_kernels.py`)."""


import pytest
import torch
import torch.nn.functional as F

from test_gpu_kernels import rel_err, ssd_inputs

from diffuapriel_hf.modeling.mamba_ops import (chunk_state_reference, mamba_chunk_scan_combined_reference,
                                               state_passing_reference)

pytest.importorskip("triton")


# (batch, length, heads, head_dim, groups, state, chunk, block_p, segments): lengths that are not a whole number of
# chunks, head and state sizes under the smallest tile (masked), a head's channels split over two programs, groups,
# and the sequence cut into segments walked in parallel (the last one shorter). The interpreter runs every program in
# Python, one at a time, so the first, fourth and fifth cases are as short as what they cover allows: two chunks, the
# second partial; three segments of one chunk, the last shorter; two segments of two chunks, the last partial.
CASES = [
    (2, 45, 4, 8, 2, 8, 32, 16, 1),
    (1, 64, 2, 32, 1, 16, 32, 16, 1),
    (1, 50, 2, 32, 1, 32, 16, 32, 1),
    (2, 40, 4, 8, 2, 8, 16, 16, 3),
    (1, 50, 2, 32, 1, 16, 16, 16, 2),
]


DT_MODES = ["bias+softplus", "bias+softplus+limit", "given"]


def reference_chunk_states(x, dt, A, B, every: int, initial_states):
    """The state entering every `every` tokens (b, c, h, p, n), from the references' chunk states and state passing;
    dt: (b, l, h) as the SSD uses it (after the softplus and limit)."""
    pad = -x.shape[1] % every
    dt = F.pad(dt, (0, 0, 0, pad)).unflatten(1, (-1, every)).permute(0, 3, 1, 2)  # (b, h, c, every)
    dA_cumsum = torch.cumsum(dt * A[:, None, None], dim=-1)
    local = chunk_state_reference(B, x, dt, dA_cumsum)  # (b, c, h, p, n)
    entering, _ = state_passing_reference(local.flatten(-2), dA_cumsum[..., -1], initial_states.flatten(-2))
    return entering.unflatten(-1, local.shape[-2:])


def interpreted_checks() -> dict:
    """Run every case in this process (which must have TRITON_INTERPRET=1 set before triton was first imported): the
    relative error against the reference for each, and the error messages of bad calls."""
    from diffuapriel_hf.modeling import ssd_triton

    torch.set_num_threads(1)
    errors, states_dt_as_passed = {}, {}
    for index, (*sizes, chunk, block_p, segments) in enumerate(CASES):
        for dt_mode in DT_MODES:
            x, dt, A, B, C, D, dt_bias = ssd_inputs(*sizes, dtype=torch.float32, device="cpu")
            if dt_mode == "given":  # the padding path: dt computed by the mixer, zero at padding
                padding = torch.rand(dt.shape, generator=torch.Generator().manual_seed(1)) < 0.2
                dt = F.softplus(dt + dt_bias).masked_fill(padding, 0)
                bias, softplus, limit = None, False, (0.0, float("inf"))
            else:
                bias, softplus = dt_bias, True
                limit = (0.05, 0.5) if dt_mode.endswith("limit") else (0.0, float("inf"))
            y = ssd_triton.launch_ssd_forward(x, dt, A, B, C, D, bias, softplus, limit, segments=segments,
                                              chunk=chunk, block_p=block_p, num_warps=4, num_stages=1)
            expected = mamba_chunk_scan_combined_reference(x, dt, A, B, C, 16, D=D, dt_bias=bias,
                                                           dt_softplus=softplus, dt_limit=limit)
            assert y.shape == x.shape and y.dtype == x.dtype
            errors[f"{index}/{dt_mode}"] = rel_err(y, expected)
            # From a given state, handing on the one it leaves (a block model's generation step).
            entering = torch.randn(x.shape[0], x.shape[2], x.shape[3], B.shape[3],
                                   generator=torch.Generator().manual_seed(index))
            y_from_state, leaving = ssd_triton.launch_ssd_forward(
                x, dt, A, B, C, D, bias, softplus, limit, segments=segments, chunk=chunk, block_p=block_p,
                num_warps=4, num_stages=1, initial_states=entering, return_final_states=True)
            expected_from_state, expected_leaving = mamba_chunk_scan_combined_reference(
                x, dt, A, B, C, 16, D=D, dt_bias=bias, dt_softplus=softplus, dt_limit=limit, initial_states=entering,
                return_final_states=True)
            errors[f"{index}/{dt_mode}/states"] = max(rel_err(y_from_state, expected_from_state),
                                                      rel_err(leaving, expected_leaving))
            if dt_mode == "bias+softplus+limit":  # the states entering every two chunks, for mamba-ssm's backward
                y_with_states, chunk_states = ssd_triton.launch_ssd_forward(
                    x, dt, A, B, C, D, bias, softplus, limit, segments=segments, chunk=chunk, block_p=block_p,
                    num_warps=4, num_stages=1, initial_states=entering, chunk_states_every=2 * chunk)
                used_dt = F.softplus(dt + dt_bias).clamp(*limit)
                errors[f"{index}/chunk states"] = max(
                    rel_err(y_with_states, expected_from_state),
                    rel_err(chunk_states, reference_chunk_states(x, used_dt, A, B, 2 * chunk, entering)))
            if segments > 1:  # the segment-states kernel reading dt as passed rather than by head: the same output
                as_passed = ssd_triton.launch_ssd_forward(
                    x, dt, A, B, C, D, bias, softplus, limit, segments=segments, chunk=chunk, block_p=block_p,
                    num_warps=4, num_stages=1, states_dt_by_head=False)
                states_dt_as_passed[f"{index}/{dt_mode}"] = bool(torch.equal(as_passed, y))
    x, dt, A, B, C, D, dt_bias = ssd_inputs(1, 16, 2, 16, 1, 16, dtype=torch.float32, device="cpu")
    refusals = {}
    for name, call in {
        "z": lambda: ssd_triton.ssd_forward(x, dt, A, B, C, 16, z=x),
        "initial_states": lambda: ssd_triton.ssd_forward(x, dt, A, B, C, 16, initial_states=x),
        "short dt": lambda: ssd_triton.ssd_forward(x, dt[:, :8], A, B, C, 16),
        "float64 B": lambda: ssd_triton.ssd_forward(x, dt, A, B.double(), C, 16),
        "chunk states every 48": lambda: ssd_triton.ssd_forward(x, dt, A, B, C, 48, return_chunk_states=True),
    }.items():
        try:
            call()
        except ValueError as error:
            refusals[name] = str(error)
    return dict(errors=errors, states_dt_as_passed=states_dt_as_passed, refusals=refusals)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dt_mode", DT_MODES)
@pytest.mark.parametrize("states", ["", "/states"], ids=["zero state", "given and leaving states"])
def test_interpreted_kernel_matches_the_reference(interpreted, case, dt_mode, states):
    assert interpreted["errors"][f"{case}/{dt_mode}{states}"] <= 1e-5


def test_ssd_forward_refuses_what_it_does_not_compute(interpreted):
    refusals = interpreted["refusals"]
    assert "does not gate" in refusals["z"]
    assert "initial_states must be" in refusals["initial_states"]
    assert "dt must be" in refusals["short dt"]
    assert "share one floating dtype" in refusals["float64 B"]
    assert "multiple of 32, got 48" in refusals["chunk states every 48"]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_interpreted_kernel_writes_the_states_entering_each_chunk(interpreted, case):
    """The states that mamba-ssm's backward reads (`return_chunk_states`), from a given initial state, segments
    included, and the same output as without them."""
    assert interpreted["errors"][f"{case}/chunk states"] <= 1e-5


def test_segment_states_read_dt_as_passed_give_the_same_output(interpreted):
    segmented = [f"{case}/{dt_mode}" for case, (*_, segments) in enumerate(CASES) if segments > 1
                 for dt_mode in DT_MODES]
    assert segmented and all(interpreted["states_dt_as_passed"][key] for key in segmented)
