"""The depthwise causal convolution's backward (`conv1d_triton`): its reference against autograd through
`mamba_ops.causal_conv1d_reference`, and its kernel against the reference on the CPU under Triton's interpreter
(TRITON_INTERPRET=1), in float32 (the interpreter's bf16 products are wrong). In bf16 against causal-conv1d's kernel
at the 1.3B sizes: `test_gpu_kernels.py`."""

import pytest
import torch

from diffuapriel_hf.modeling.conv1d_triton import (DEFAULT_LAUNCH, ConvLaunch, causal_conv1d_backward,
                                                   causal_conv1d_backward_reference)
from diffuapriel_hf.modeling.mamba_ops import causal_conv1d_reference


def conv_inputs(batch, length, channels, width, with_bias, seed, wide=None):
    """x, weight, bias (None without), dout, float32; x a column slice of a (batch, length, wide) tensor where `wide`
    is given, as xBC is of in_proj's output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, wide or channels, generator=g)[..., 1:channels + 1] if wide else torch.randn(
        batch, length, channels, generator=g)
    weight = torch.randn(channels, width, generator=g) / width
    bias = torch.randn(channels, generator=g) if with_bias else None
    dout = torch.randn(batch, length, channels, generator=g)
    return x, weight, bias, dout


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("width", [2, 4])
def test_reference_matches_autograd_through_the_forward_reference(silu, with_bias, width):
    x, weight, bias, dout = conv_inputs(2, 11, 6, width, with_bias, seed=width, wide=15)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight) + ((bias,) if with_bias else ())]
    out = causal_conv1d_reference(leaves[0].transpose(1, 2), leaves[1], leaves[2] if with_bias else None,
                                  activation="silu" if silu else None)  # (b, c, l)
    out.backward(dout.transpose(1, 2))
    dx, dweight, dbias = causal_conv1d_backward_reference(x, weight, bias, dout, silu)
    torch.testing.assert_close(dx, leaves[0].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dweight, leaves[1].grad, rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(dbias, leaves[2].grad, rtol=1e-5, atol=1e-5)
    else:
        assert dbias is None


def test_the_cpu_path_is_the_reference_and_writes_dx_in_place_in_the_weights_dtype():
    x, weight, bias, dout = conv_inputs(2, 9, 8, 4, True, seed=0, wide=12)
    gradient = torch.full((2, 9, 12), float("nan"))
    dx = gradient[..., 2:10]
    ours = causal_conv1d_backward(x, weight.double(), bias.half(), dout, True, dx=dx)
    expected = causal_conv1d_backward_reference(x, weight.double(), bias.half(), dout, True)
    assert ours[0].data_ptr() == dx.data_ptr() and gradient[..., :2].isnan().all() and gradient[..., 10:].isnan().all()
    assert ours[1].dtype == torch.float64 and ours[2].dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


@pytest.mark.parametrize("change, error, argument", [
    (dict(x=torch.zeros(2, 5)), ValueError, "x"),
    (dict(x=torch.zeros(2, 8, 5).transpose(1, 2)), ValueError, "x"),
    (dict(weight=torch.zeros(8, 5)), ValueError, "weight"),
    (dict(weight=torch.zeros(8, 1)), ValueError, "weight"),
    (dict(weight=torch.zeros(7, 4)), ValueError, "weight"),
    (dict(bias=torch.zeros(5)), ValueError, "bias"),
    (dict(dout=torch.zeros(2, 4, 8)), ValueError, "dout"),
    (dict(dx=torch.zeros(2, 5, 8)[:, :, :1].expand(2, 5, 8)), ValueError, "dx"),
    (dict(dx=torch.zeros(2, 8, 5).transpose(1, 2)), ValueError, "dx"),
    (dict(dx=torch.zeros(2, 12)[:, None, :8].expand(2, 5, 8)), ValueError, "dx"),
    (dict(dout=torch.zeros(2, 5, 8, dtype=torch.float64)), TypeError, "dout"),
    (dict(dx=torch.zeros(2, 5, 8, dtype=torch.bfloat16)), TypeError, "dx"),
    (dict(weight=torch.zeros(8, 4, dtype=torch.int32)), TypeError, "weight"),
])
def test_bad_arguments_raise_errors_naming_them(change, error, argument):
    x, weight, bias, dout = conv_inputs(2, 5, 8, 4, True, seed=0)
    arguments = dict(x=x, weight=weight, bias=bias, dout=dout, silu=True)
    arguments.update(change)
    with pytest.raises(error, match=argument):
        causal_conv1d_backward(**arguments)


# (batch, length, channels, width, silu, bias, x and dx column slices of wider tensors, launch: positions and channels
# a program, warps, stages): a partial last tile of positions and a partial channel block; width 3 without silu;
# width 2 without a bias, tiles shorter than the halo; a sequence shorter than the halo; the default launch over
# several tiles with a partial channel block.
CASES = [
    (2, 37, 20, 4, True, True, True, ConvLaunch(16, 8, 1, 2)),
    (2, 50, 24, 3, False, True, False, ConvLaunch(32, 16, 1, 1)),
    (1, 9, 12, 2, True, False, True, ConvLaunch(2, 8, 1, 3)),
    (2, 2, 12, 4, True, True, True, ConvLaunch(4, 16, 1, 1)),
    (2, 300, 260, 4, True, True, True, DEFAULT_LAUNCH),
]


def interpreted_checks() -> dict:
    """Run every case in this process (which must have TRITON_INTERPRET=1 set before triton was first imported)."""
    from diffuapriel_hf.modeling.conv1d_triton import launch_causal_conv1d_backward

    torch.set_num_threads(1)
    errors = {}
    for index, (batch, length, channels, width, silu, with_bias, strided, launch) in enumerate(CASES):
        wide = 2 * channels + 3 if strided else None
        x, weight, bias, dout = conv_inputs(batch, length, channels, width, with_bias, seed=index, wide=wide)
        expected = causal_conv1d_backward_reference(x, weight, bias, dout, silu)
        # dx written into the columns of a wider gradient, whose other columns must keep their NaNs.
        gradient = torch.full((batch, length, wide), float("nan")) if strided else None
        dx = gradient[..., 1:channels + 1] if strided else None
        ours = launch_causal_conv1d_backward(x, weight, bias, dout, silu, dx=dx, launch=launch)
        errors[str(index)] = dict(
            differences=[None if a is None else (a - b).abs().max().item() for a, b in zip(ours, expected)],
            missing=[(a is None) != (b is None) for a, b in zip(ours, expected)],
            dx_in_place=dx is None or ours[0].data_ptr() == dx.data_ptr(),
            beside_dx_untouched=gradient is None or bool(gradient[..., 0].isnan().all()
                                                         and gradient[..., channels + 1:].isnan().all()),
        )
    return errors


@pytest.mark.parametrize("case", [str(index) for index in range(len(CASES))])
def test_interpreted_kernel_matches_the_reference(interpreted, case):
    errors = interpreted[case]
    assert not any(errors["missing"])
    assert all(difference is None or difference <= 1e-4 for difference in errors["differences"])
    assert errors["dx_in_place"] and errors["beside_dx_untouched"]
