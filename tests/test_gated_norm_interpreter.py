"""The gated RMSNorm's backward (`gated_norm_triton`): its reference against autograd through a plain PyTorch forward,
and its kernel against the reference on the CPU under Triton's interpreter (TRITON_INTERPRET=1), in float32 (the
interpreter's bf16 products are wrong)."""

import pytest
import torch
import torch.nn.functional as F

from diffuapriel_hf.modeling.gated_norm_triton import (DEFAULT_LAUNCH, NormLaunch, gated_rms_norm_backward,
                                                       gated_rms_norm_backward_reference)

EPS = 1e-5


def gated_norm_forward(y, z, weight, group_size, norm_before_gate):
    """The norm the backward differentiates, in plain PyTorch: (output, rstd (groups * rows,), group-major as
    mamba-ssm's `_layer_norm_fwd` keeps it)."""
    x = y * F.silu(z) if z is not None and not norm_before_gate else y
    groups = x.unflatten(-1, (-1, group_size))  # (rows, groups, group_size)
    rstd = torch.rsqrt(groups.square().mean(-1, keepdim=True) + EPS)
    output = (groups * rstd).flatten(1) * weight
    if z is not None and norm_before_gate:
        output = output * F.silu(z)
    return output, rstd.squeeze(-1).t().reshape(-1)


def norm_inputs(rows, width, group_size, with_z, seed, wide=None):
    """dout, y, z (None without), weight and rstd, float32; z a column slice of a (rows, wide) tensor where `wide` is
    given, as the gate is a slice of in_proj's output."""
    g = torch.Generator().manual_seed(seed)
    y, dout = torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g)
    z = torch.randn(rows, wide or width, generator=g)[:, :width] if with_z else None
    weight = 1 + 0.2 * torch.randn(width, generator=g)
    return dout, y, z, weight


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("with_z, group_size", [(True, 8), (True, 24), (False, 12)])
def test_reference_matches_autograd_through_the_plain_forward(norm_before_gate, with_z, group_size):
    dout, y, z, weight = norm_inputs(5, 24, group_size, with_z, seed=group_size)
    leaves = [t.clone().requires_grad_(True) for t in (y, weight) + ((z,) if with_z else ())]
    output, rstd = gated_norm_forward(leaves[0], leaves[2] if with_z else None, leaves[1], group_size,
                                      norm_before_gate)
    output.backward(dout)
    dy, dweight, dz, normed = gated_rms_norm_backward_reference(
        dout, y, z, weight, rstd.detach(), group_size=group_size, norm_before_gate=norm_before_gate,
        recompute_output=True)
    torch.testing.assert_close(dy, leaves[0].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dweight, leaves[1].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normed, output.detach(), rtol=1e-5, atol=1e-5)
    if with_z:
        torch.testing.assert_close(dz, leaves[2].grad, rtol=1e-5, atol=1e-5)
    else:
        assert dz is None


def test_the_cpu_path_is_the_reference_and_leaves_the_output_out_unless_asked():
    dout, y, z, weight = norm_inputs(3, 16, 16, True, seed=0)
    _, rstd = gated_norm_forward(y, z, weight, 16, False)
    ours = gated_rms_norm_backward(dout, y, z, weight, rstd, norm_before_gate=False)
    expected = gated_rms_norm_backward_reference(dout, y, z, weight, rstd, norm_before_gate=False)
    assert ours[3] is None and all(torch.equal(a, b) for a, b in zip(ours[:3], expected[:3]))


@pytest.mark.parametrize("change, argument", [
    (dict(y=torch.zeros(4, 16)), "y"),
    (dict(z=torch.zeros(3, 8)), "z"),
    (dict(weight=torch.zeros(8)), "weight"),
    (dict(rstd=torch.zeros(3, dtype=torch.float64)), "rstd"),
    (dict(group_size=5), "group_size"),
    (dict(dy=torch.zeros(3, 16, dtype=torch.float64)), "dy"),
    (dict(dz=torch.zeros(16, 3).t()), "dz"),
    (dict(out=torch.zeros(3, 16)), "out"),
    (dict(z=None, dz=torch.zeros(3, 16)), "dz"),
    (dict(dout=torch.zeros(3, 16, dtype=torch.int32)), "dout"),
])
def test_bad_arguments_raise_a_value_error_naming_them(change, argument):
    dout, y, z, weight = norm_inputs(3, 16, 16, True, seed=0)
    arguments = dict(dout=dout, y=y, z=z, weight=weight, rstd=torch.ones(3))
    arguments.update(change)
    with pytest.raises(ValueError, match=argument):
        gated_rms_norm_backward(**arguments)


# (rows, width, group size, z: None, contiguous or a slice of a wider tensor, norm before the gate, recompute the
# output, launch: rows per tile, programs per multiprocessor (the interpreter's one), warps, stages): several groups
# with several programs each and a partial last tile; a group narrower than its block; no gate; training_mixer's
# layout (z and dz views of in_proj's output and gradient, the output recomputed) under the default launch; tiles of
# several rows over a group narrower than its block.
CASES = [
    (7, 96, 32, "wide", False, True, NormLaunch(2, 6, 4, 2)),
    (5, 48, 48, "wide", True, True, NormLaunch(1, 2, 4, 1)),
    (4, 64, 32, None, True, False, NormLaunch(4, 1, 4, 3)),
    (9, 128, 128, "wide", False, True, DEFAULT_LAUNCH),
    (9, 40, 20, "contiguous", True, True, NormLaunch(4, 4, 2, 2)),
]


def interpreted_checks() -> dict:
    """Run every case in this process (which must have TRITON_INTERPRET=1 set before triton was first imported)."""
    from diffuapriel_hf.modeling.gated_norm_triton import launch_gated_rms_norm_backward

    torch.set_num_threads(1)
    errors = {}
    for index, (rows, width, group_size, gate, norm_before_gate, recompute, launch) in enumerate(CASES):
        wide = 2 * width + 3 if gate == "wide" else None
        dout, y, z, weight = norm_inputs(rows, width, group_size, gate is not None, seed=index, wide=wide)
        _, rstd = gated_norm_forward(y, z, weight, group_size, norm_before_gate)
        options = dict(group_size=group_size, norm_before_gate=norm_before_gate, recompute_output=recompute)
        expected = gated_rms_norm_backward_reference(dout, y, z, weight, rstd, **options)
        # dz written into the columns of a wider gradient, whose other columns must keep their NaNs.
        gradient = torch.full((rows, wide), float("nan")) if wide else None
        dz = gradient[:, :width] if wide else None
        ours = launch_gated_rms_norm_backward(dout, y, z, weight, rstd, dz=dz, launch=launch, **options)
        errors[str(index)] = dict(
            differences=[None if a is None else (a - b).abs().max().item() for a, b in zip(ours, expected)],
            missing=[(a is None) != (b is None) for a, b in zip(ours, expected)],
            dz_in_place=dz is None or ours[2].data_ptr() == dz.data_ptr(),
            beside_dz_untouched=gradient is None or bool(gradient[:, width:].isnan().all()),
        )
    return errors


@pytest.mark.parametrize("case", [str(index) for index in range(len(CASES))])
def test_interpreted_kernel_matches_the_reference(interpreted, case):
    errors = interpreted[case]
    assert not any(errors["missing"])
    assert all(difference is None or difference <= 1e-5 for difference in errors["differences"])
    assert errors["dz_in_place"] and errors["beside_dz_untouched"]
