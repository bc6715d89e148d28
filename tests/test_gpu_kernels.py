"""The CUDA paths: mamba-ssm / causal-conv1d kernels against the PyTorch references and against mamba-ssm's own
`Mamba2`, padding, attention through SDPA, training on the kernels, and generation replayed from CUDA graphs.

Tolerances (relative Frobenius error ||a - b|| / ||b||): the Triton SSD kernels take float32 matrix products in
tf32 (10-bit mantissa), so float32 kernel outputs sit near 1e-3 of the float32 reference, and bf16 ones (bf16
weights, activations and outputs) near 1e-2 of it.

Every test uses one set of Mamba sizes, so that Triton compiles each kernel once per dtype. The first run compiles
and autotunes them (minutes); `MAMBA_DETERMINISTIC=1` in the environment makes mamba-ssm take one configuration per
kernel instead of autotuning among about nine (and its backward deterministic), which shortens that first run.
"""

import importlib.util

import pytest
import torch

from conftest import build_tiny_model

from diffuapriel_hf import DiffuAprielForMaskedLM, preset_config
from diffuapriel_hf.modeling import cache_attention, mamba_ops
from diffuapriel_hf.modeling.configuration_diffuapriel import ATTENTION, MAMBA
from diffuapriel_hf.modeling.cuda_graphs import GraphedDenoiser, graphed_denoiser
from diffuapriel_hf.modeling.cache import BlockContext
from diffuapriel_hf.modeling.kernel_policy import (DISPATCH_THRESHOLDS, REFERENCE_POLICY, override_kernel_policy,
                                                   resolve_kernel_policy)
from diffuapriel_hf.modeling.modeling_diffuapriel import BidirectionalMamba2Mixer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_kernels = pytest.mark.skipif(mamba_ops.kernel_ops() is None, reason="needs mamba-ssm")

FP32_TOL, BF16_TOL = 3e-3, 2e-2
# Sizes that exercise what the 1.3B presets use (several heads per group, two groups, lengths that are not a whole
# number of chunks) at test scale.
SIZES = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, mamba_expand=2, mamba_d_head=32,
             mamba_d_state=32, mamba_n_groups=2, mamba_chunk_size=64, rms_norm_eps=1e-5)


def rel_err(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def randomised_mixer(config, seed=0):
    torch.manual_seed(seed)
    mixer = BidirectionalMamba2Mixer(config, 0)
    with torch.no_grad():
        for name, parameter in mixer.named_parameters():
            if name.endswith("A_log"):
                parameter.copy_(torch.log(torch.rand_like(parameter) * 8 + 1))
            elif name.endswith("dt_bias"):
                parameter.copy_(torch.rand_like(parameter) * 4 - 5)  # dt in about [0.007, 0.3]
            elif name.endswith("norm.weight") or name.endswith("D"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0, 0.05)
    return mixer.cuda()


@needs_kernels
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_kernel_path_matches_the_pytorch_path(dtype, tolerance):
    config = preset_config("tiny", **SIZES)
    mixer = randomised_mixer(config)
    hidden = torch.randn(2, 301, config.hidden_size, device="cuda")
    with torch.no_grad():
        expected = mixer(hidden).combined()  # float32 PyTorch reference (the default policy of a lone module)
        kernels = resolve_kernel_policy(config, hidden.device)
        assert kernels.mamba.name == "kernels" and kernels.fused_elementwise
        actual = mixer.to(dtype)(hidden.to(dtype), kernels=kernels).combined(kernels)
    assert actual.dtype == dtype
    assert rel_err(actual, expected) <= tolerance


# The mixer's training passes: the kernels one after another; whole passes through mamba-ssm's fused function; whole
# passes through `training_mixer` (our single-pass SSD always chosen).
MIXER_PASSES = {
    "step by step": dict(),
    "mamba-ssm's mixer function": dict(split_conv1d_scan=True),
    "training pass": dict(single_pass=True, split_conv1d_scan=True, training_pass=True),
}


@needs_kernels
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("mixer_pass", list(MIXER_PASSES))
def test_each_direction_matches_mamba_ssm_mamba2_forward_and_backward(dtype, tolerance, mixer_pass, monkeypatch):
    from mamba_ssm.modules.mamba2 import Mamba2

    config = preset_config("tiny", **SIZES)
    ours = randomised_mixer(config, seed=1).to(dtype)
    theirs = Mamba2(
        d_model=config.hidden_size, d_state=config.mamba_d_state, d_conv=config.mamba_d_conv,
        expand=config.mamba_expand, headdim=config.mamba_d_head, ngroups=config.mamba_n_groups,
        chunk_size=config.mamba_chunk_size, device="cuda", dtype=dtype,
    )
    hidden = torch.randn(2, 301, config.hidden_size, device="cuda", dtype=dtype)
    grad_out = torch.randn_like(hidden)
    ops = mamba_ops.kernel_ops(**MIXER_PASSES[mixer_pass])
    fused_calls, training_calls = count_fused_mixer_calls(monkeypatch), count_training_pass_calls(monkeypatch)
    for direction, inputs in ((ours.left_to_right, hidden), (ours.right_to_left, hidden.flip(1))):
        theirs.load_state_dict(direction.state_dict())
        assert theirs.norm.eps == direction.norm.variance_epsilon
        results = []
        for module, kwargs in ((theirs, {}), (direction, dict(padding_mask=None, ops=ops))):
            x = inputs.detach().clone().requires_grad_(True)
            module.zero_grad()
            out = module(x, **kwargs)
            (out.float() * grad_out.float()).sum().backward()
            grads = {name: p.grad.clone() for name, p in module.named_parameters()}
            results.append((out.detach(), x.grad, grads))
        (out_theirs, dx_theirs, g_theirs), (out_ours, dx_ours, g_ours) = results
        assert rel_err(out_ours, out_theirs) <= tolerance
        assert rel_err(dx_ours, dx_theirs) <= tolerance
        for name in g_theirs:
            assert rel_err(g_ours[name], g_theirs[name]) <= tolerance, name
    # mamba-ssm's Mamba2 trains through its fused function; our mixer through the pass asked for.
    assert len(fused_calls) == 2 * (1 + (mixer_pass == "mamba-ssm's mixer function"))
    assert len(training_calls) == 2 * (mixer_pass == "training pass")


@needs_kernels
@pytest.mark.parametrize("precision", ["bf16 weights", "autocast over fp32 weights"])
def test_training_pass_matches_mamba_ssm_mixer_function_at_the_1_3b_head_sizes(precision, monkeypatch):
    """`training_mixer`'s pass (our SSD forward writing the chunk states, mamba-ssm's backward kernels from them)
    against mamba-ssm's fused function, at the 1.3B presets' head sizes (64 channels, state 128, chunks of 128), one
    group, a length cut into segments by our kernel and not a whole number of chunks: outputs and every gradient."""
    config = preset_config("tiny", hidden_size=256, mamba_expand=2, mamba_d_head=64, mamba_d_state=128,
                           mamba_n_groups=1, mamba_chunk_size=128, rms_norm_eps=1e-5)
    mixer = randomised_mixer(config, seed=2).left_to_right
    if precision == "bf16 weights":
        mixer = mixer.to(torch.bfloat16)
    hidden = torch.randn(2, 4196, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(hidden)
    training_calls = count_training_pass_calls(monkeypatch)
    results = []
    for mixer_pass in ("mamba-ssm's mixer function", "training pass"):
        x = hidden.detach().clone().requires_grad_(True)
        mixer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision != "bf16 weights"):
            out = mixer(x, None, mamba_ops.kernel_ops(**MIXER_PASSES[mixer_pass]))
        assert out.dtype == torch.bfloat16
        (out.float() * grad_out.float()).sum().backward()
        results.append((out.detach(), x.grad, {name: p.grad.clone() for name, p in mixer.named_parameters()}))
    assert len(training_calls) == 1
    (out_theirs, dx_theirs, g_theirs), (out_ours, dx_ours, g_ours) = results
    assert rel_err(out_ours, out_theirs) <= BF16_TOL
    assert rel_err(dx_ours, dx_theirs) <= BF16_TOL
    for name in g_theirs:
        assert g_ours[name].dtype == g_theirs[name].dtype
        assert rel_err(g_ours[name], g_theirs[name]) <= BF16_TOL, name


@needs_kernels
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_state_passing_kernel_matches_the_reference_forward_and_backward(with_initial_state):
    torch.manual_seed(0)
    batch, chunks, heads, dim = 2, 37, 8, 256  # a block model's blocks in place of chunks, P * N flattened
    states = torch.randn(batch, chunks, heads, dim, device="cuda")
    log_decay = -torch.rand(batch, heads, chunks, device="cuda") * 2
    initial = torch.randn(batch, heads, dim, device="cuda") if with_initial_state else None
    upstream = [torch.randn(batch, chunks, heads, dim, device="cuda"), torch.randn(batch, heads, dim, device="cuda")]
    results = []
    for state_passing in (mamba_ops.kernel_ops().state_passing, mamba_ops.state_passing_reference):
        inputs = [t.clone().requires_grad_(True) for t in (states, log_decay, initial) if t is not None]
        outputs = state_passing(*inputs[:2], inputs[2] if with_initial_state else None)
        sum((o * u).sum() for o, u in zip(outputs, upstream)).backward()
        results.append([o.detach() for o in outputs] + [t.grad for t in inputs])
    for actual, expected in zip(*results):
        assert actual.dtype == torch.float32 and rel_err(actual, expected) <= 1e-5


@needs_kernels
def test_chunk_state_kernel_matches_the_reference_forward_and_backward():
    """mamba-ssm's chunk_state as a block model's entering states call it: bf16 x and B, float32 dt (a permuted view)
    and its running decay, chunks of 32 with a short last one."""
    torch.manual_seed(0)
    batch, length, heads, head_dim, groups, state, chunk = 2, 300, 8, 64, 2, 128, 32
    x = torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(batch, length, groups, state, device="cuda", dtype=torch.bfloat16)
    dt = torch.rand(batch, -(-length // chunk), chunk, heads, device="cuda").permute(0, 3, 1, 2) * 0.1
    A = -torch.rand(heads, device="cuda") - 0.5
    upstream = torch.randn(batch, dt.shape[2], heads, head_dim, state, device="cuda")
    results = []
    for chunk_state in (mamba_ops.kernel_ops().chunk_state, mamba_ops.chunk_state_reference):
        leaves = [t.clone().requires_grad_(True) for t in (B, x, dt)]
        states = chunk_state(*leaves, torch.cumsum(leaves[2] * A[:, None, None], dim=-1))
        (states * upstream).sum().backward()
        results.append([states.detach()] + [t.grad.float() for t in leaves])
    for actual, expected in zip(*results):
        assert rel_err(actual, expected) <= 1e-2


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, heads", [(2, 16), (2, 64)], ids=["few walks", "many walks"])
def test_states_gradient_walk_matches_mamba_ssm_two_kernels_at_the_1_3b_sizes(dtype, batch, heads):
    """`ssd_backward_triton.entering_states_backward` against mamba-ssm's `_chunk_scan_bwd_dstates` then
    `_state_passing_bwd` (what the training pass called before), at the 1.3B presets' head sizes and chunks, on a
    length that is not a whole number of chunks; and against its reference. mamba-ssm's products of float32 inputs
    are TF32, ours exact float32: hence FP32_TOL against theirs."""
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_bwd_dstates
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd

    from diffuapriel_hf.modeling.ssd_backward_triton import (entering_states_backward,
                                                             entering_states_backward_reference)

    C, dA_cumsum, dy, chunk_states = walk_inputs(batch, 4196, heads, 64, 1, 128, 256, dtype=dtype, device="cuda")
    dstates, ddA_chunk = entering_states_backward(C, dA_cumsum, dy, chunk_states, dtype)
    own = _chunk_scan_bwd_dstates(C, dA_cumsum, dy, dtype=torch.float32)
    theirs, ddA_theirs, _ = _state_passing_bwd(chunk_states.flatten(-2), dA_cumsum[..., -1], own.flatten(-2),
                                               has_initial_states=False, dstates_dtype=dtype)
    tolerance = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert dstates.dtype == dtype and dstates.shape == chunk_states.shape
    assert rel_err(dstates, theirs.unflatten(-1, (64, 128))) <= tolerance
    assert rel_err(ddA_chunk, ddA_theirs) <= tolerance
    expected, ddA_expected = entering_states_backward_reference(C, dA_cumsum, dy, chunk_states, dtype)
    assert rel_err(dstates, expected) <= (1e-5 if dtype == torch.float32 else BF16_TOL)
    assert rel_err(ddA_chunk, ddA_expected) <= 1e-5


@needs_kernels
@pytest.mark.parametrize("batch, length", [(4, 4096), (1, 16384), (1, 4196)],
                         ids=["4 x 4K", "1 x 16K", "partial last chunk"])
def test_chunk_inputs_gradient_matches_mamba_ssm_at_the_1_3b_sizes(batch, length):
    """`ssd_backward_triton.chunk_inputs_backward` against mamba-ssm's `_chunk_scan_chunk_state_bwd_dx` (what the
    training pass calls) at a 1.3B training step's sizes (64 heads of 64, state 128, one group, chunks of 128), bf16 x,
    dy, B and dstates, float32 CB, dt and decays, D per head, dx written into a view of a wider tensor as
    `training_mixer` passes it; and against its reference. Both take the same roundings; their float32 sums differ
    in order."""
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx

    from diffuapriel_hf.modeling.ssd_backward_triton import chunk_inputs_backward, chunk_inputs_backward_reference

    inputs, _ = chunk_inputs(batch, length, 64, 64, 1, 128, 128, dtype=torch.bfloat16, device="cuda")
    D = 1 + 0.2 * torch.randn(64, device="cuda")
    wide = torch.empty(batch, length, 64 * 64 + 2 * 128, device="cuda", dtype=torch.bfloat16)
    dx = wide[..., :64 * 64].unflatten(-1, (64, 64))
    ours = chunk_inputs_backward(*inputs, D=D, dx=dx)
    assert ours[0].data_ptr() == dx.data_ptr() and ours[1].dtype == torch.float32 and ours[2].dtype == D.dtype
    theirs = _chunk_scan_chunk_state_bwd_dx(*inputs, D=D)
    expected = chunk_inputs_backward_reference(*inputs, D=D)
    for name, got, mamba, reference in zip(("dx", "ddt", "dD"), ours, theirs, expected):
        tolerance = BF16_TOL if name == "dx" else FP32_TOL
        assert got.shape == mamba.shape, name
        assert rel_err(got, mamba) <= tolerance, name
        assert rel_err(got, reference) <= tolerance, name


@needs_kernels
def test_chunk_scan_from_states_kernel_matches_the_reference_forward_and_backward():
    """mamba-ssm's chunk_scan as a block model's noised stream calls it: each block of 32 from its entering state,
    bf16 x, B and C, float32 dt (a permuted view) with its running decay and the states, D per head."""
    torch.manual_seed(0)
    batch, blocks, heads, head_dim, groups, state, block = 2, 9, 8, 64, 2, 128, 32
    length = blocks * block
    x = torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    B, C = (torch.randn(batch, length, groups, state, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dt = torch.rand(batch, blocks, block, heads, device="cuda").permute(0, 3, 1, 2) * 0.1
    A, D = -torch.rand(heads, device="cuda") - 0.5, torch.randn(heads, device="cuda")
    entering = torch.randn(batch, blocks, heads, head_dim, state, device="cuda")
    upstream = torch.randn(batch, length, heads, head_dim, device="cuda")
    results = []
    for scan in (mamba_ops.kernel_ops().chunk_scan_from_states, mamba_ops.chunk_scan_from_states_reference):
        leaves = [t.clone().requires_grad_(True) for t in (B, C, x, dt, entering)]
        y = scan(*leaves[:4], torch.cumsum(leaves[3] * A[:, None, None], dim=-1), leaves[4], D=D)
        (y.float() * upstream).sum().backward()
        results.append([y.detach().float()] + [t.grad.float() for t in leaves])
    for actual, expected in zip(*results):
        assert rel_err(actual, expected) <= 1e-2


def count_calls(monkeypatch, function: type) -> list:
    """A list that grows by one at each call of this autograd Function."""
    calls, apply = [], function.apply

    def counted(*args):
        calls.append(args[0].shape)
        return apply(*args)

    monkeypatch.setattr(function, "apply", counted)
    return calls


def count_fused_mixer_calls(monkeypatch) -> list:
    """A list that grows by one at each call of mamba-ssm's fused mixer function (its autograd Function)."""
    from mamba_ssm.ops.triton.ssd_combined import MambaSplitConv1dScanCombinedFn

    return count_calls(monkeypatch, MambaSplitConv1dScanCombinedFn)


def count_training_pass_calls(monkeypatch) -> list:
    """A list that grows by one at each call of `training_mixer.MixerTrainingPass`."""
    from diffuapriel_hf.modeling.training_mixer import MixerTrainingPass

    return count_calls(monkeypatch, MixerTrainingPass)


def ssd_inputs(batch, length, heads, head_dim, groups, state, dtype, device="cuda", seed=0):
    """x, dt, A, B, C, D, dt_bias laid out as the mixer passes them: x, B, C strided views of one tensor."""
    g = torch.Generator(device=device).manual_seed(seed)
    xBC = torch.randn(batch, length, heads * head_dim + 2 * groups * state, device=device, generator=g).to(dtype)
    x, B, C = xBC.split([heads * head_dim, groups * state, groups * state], dim=-1)
    dt = torch.randn(batch, length, heads, device=device, generator=g).to(dtype)
    A = -torch.exp(torch.rand(heads, device=device, generator=g) * 2)
    D = 1 + 0.2 * torch.randn(heads, device=device, generator=g)
    dt_bias = torch.rand(heads, device=device, generator=g) * 4 - 5
    return (x.reshape(batch, length, heads, head_dim), dt, A, B.reshape(batch, length, groups, state),
            C.reshape(batch, length, groups, state), D, dt_bias)


def walk_inputs(batch, length, heads, head_dim, groups, state, chunk, dtype=torch.float32, device="cpu", seed=0):
    """What the SSD backward's walk of the states' gradient reads (`ssd_backward_triton`): C (b, l, g, n), a view of a
    wider tensor as the mixer's conv output is; dA_cumsum (b, h, c, chunk), running log decays per chunk, constant
    past the sequence's end as mamba-ssm's chunk cumsum leaves them; dy (b, l, h, p); the float32 states entering each
    chunk (b, c, h, p, n), the first zero."""
    generator = torch.Generator().manual_seed(seed)
    chunks = -(-length // chunk)
    wide = torch.randn(batch, length, groups * state + 5, generator=generator).to(device, dtype)
    dy = torch.randn(batch, length, heads, head_dim, generator=generator)
    dt = torch.rand(batch, heads, chunks * chunk, generator=generator) * 0.2
    dt[..., length:] = 0
    A = -0.5 - torch.rand(heads, generator=generator)
    dA_cumsum = torch.cumsum((dt * A[:, None]).unflatten(-1, (chunks, chunk)), dim=-1)
    chunk_states = torch.randn(batch, chunks, heads, head_dim, state, generator=generator)
    chunk_states[:, 0] = 0
    C = wide[..., 5:].unflatten(-1, (groups, state))
    return C, dA_cumsum.to(device), dy.to(device, dtype), chunk_states.to(device)


def chunk_inputs(batch, length, heads, head_dim, groups, state, chunk, dtype=torch.float32, device="cpu", seed=0):
    """What the SSD backward's gradient of the chunks' inputs reads (`ssd_backward_triton.chunk_inputs_backward`), laid
    out as `training_mixer` passes it: x and B (and C) views of one wider tensor, as the convolution's output is; dy
    (b, l, h, p); dt_chunks and dA_cumsum (b, h, c, chunk) float32, zero and constant past the sequence's end as
    mamba-ssm's chunk cumsum leaves them; CB (b, c, g, chunk, chunk) float32, C_t . B_s at [t, s]; dstates
    (b, c, h, p, n) in x's dtype. Returns those seven in the kernel's order, and C (b, l, g, n), of which CB is."""
    generator = torch.Generator().manual_seed(seed)
    chunks = -(-length // chunk)
    xBC = torch.randn(batch, length, heads * head_dim + 2 * groups * state, generator=generator).to(device, dtype)
    x, B, C = xBC.split([heads * head_dim, groups * state, groups * state], dim=-1)
    x, B, C = x.unflatten(-1, (heads, head_dim)), B.unflatten(-1, (groups, state)), C.unflatten(-1, (groups, state))
    dy = torch.randn(batch, length, heads, head_dim, generator=generator).to(device, dtype)
    dt = torch.rand(batch, heads, chunks * chunk, generator=generator) * 0.2
    dt[..., length:] = 0
    A = -0.5 - torch.rand(heads, generator=generator)
    dA_cumsum = torch.cumsum((dt * A[:, None]).unflatten(-1, (chunks, chunk)), dim=-1)
    dstates = torch.randn(batch, chunks, heads, head_dim, state, generator=generator).to(device, dtype)
    pad = chunks * chunk - length
    B_chunks, C_chunks = (torch.nn.functional.pad(t.float(), (0, 0, 0, 0, 0, pad)).unflatten(1, (chunks, chunk))
                          for t in (B, C))  # (b, c, k, g, n)
    CB = torch.einsum("bctgn,bcsgn->bcgts", C_chunks, B_chunks)
    dt_chunks = dt.unflatten(-1, (chunks, chunk)).to(device)
    return (x, dt_chunks, dA_cumsum.to(device), B, CB, dy, dstates), C


# (batch, length, heads, head_dim, groups, state): the test sizes, and the 1.3B presets' heads at batch 1 (where a
# head's channels are split over two programs), on a sequence long enough to be cut into segments walked in parallel,
# and on a block generation step's 32 tokens.
SSD_SHAPES = [(2, 301, 8, 32, 2, 32), (1, 1000, 64, 64, 1, 128), (1, 20000, 64, 64, 1, 128), (1, 32, 64, 64, 1, 128)]
SSD_CASES = {
    "dt_bias+softplus": lambda dt, dt_bias: (dt, dict(dt_bias=dt_bias, dt_softplus=True)),
    "dt_limit": lambda dt, dt_bias: (dt, dict(dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.01, 0.1))),
    "padding (dt given, zero at padding)": lambda dt, dt_bias: (
        torch.nn.functional.softplus(dt.float() + dt_bias).masked_fill(torch.rand_like(dt.float()) < 0.2, 0), {}),
}


@needs_kernels
@pytest.mark.parametrize("shape", SSD_SHAPES, ids=["small", "1.3b-heads", "1.3b-heads-segmented", "1.3b-step"])
@pytest.mark.parametrize("case", list(SSD_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("states", [False, True], ids=["zero state", "given and leaving states"])
def test_single_pass_ssd_kernel_matches_the_reference_and_mamba_ssm(shape, case, dtype, states):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from diffuapriel_hf.modeling.ssd_triton import ssd_forward

    x, dt, A, B, C, D, dt_bias = ssd_inputs(*shape, dtype=dtype)
    dt, kwargs = SSD_CASES[case](dt, dt_bias)
    if states:
        entering = torch.randn(x.shape[0], x.shape[2], x.shape[3], B.shape[3], device="cuda")
        kwargs.update(initial_states=entering, return_final_states=True)
    with torch.no_grad():
        ours = ssd_forward(x, dt, A, B, C, 64, D=D, **kwargs)
        reference = mamba_ops.mamba_chunk_scan_combined_reference(x, dt, A, B, C, 64, D=D, **kwargs)
        theirs = mamba_chunk_scan_combined(x, dt, A, B, C, 64, D=D, **kwargs)
    if not states:
        ours, reference, theirs = (ours,), (reference,), (theirs,)
    assert ours[0].dtype == dtype and ours[0].shape == x.shape
    for ours_part, reference_part, theirs_part in zip(ours, reference, theirs):  # y, and the leaving state
        # float32: exact float32 products (no tf32), so far closer to the float32 reference than mamba-ssm's kernels.
        assert rel_err(ours_part, reference_part) <= (1e-5 if dtype == torch.float32 else BF16_TOL)
        assert rel_err(ours_part, theirs_part) <= (FP32_TOL if dtype == torch.float32 else BF16_TOL)


@needs_kernels
def test_kernel_ssd_takes_the_single_pass_kernel_for_inference_and_mamba_ssm_for_gradients_and_elsewhere():
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from diffuapriel_hf.modeling.ssd_triton import ssd_forward

    # 8 heads of 32, state 32 in 2 groups: enough sequences for one (sequence, head) walk per multiprocessor.
    heads = 8
    walks_to_fill = torch.cuda.get_device_properties(0).multi_processor_count
    # 701 tokens: longer than the short sequences the single pass takes at any batch (ssd_single_pass_short_sequence).
    x, dt, A, B, C, D, dt_bias = ssd_inputs(-(-walks_to_fill // heads), 701, heads, 32, 2, 32, dtype=torch.bfloat16)
    kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=True)
    chunk_scan = mamba_ops.kernel_ops().chunk_scan
    with torch.no_grad():
        torch.testing.assert_close(chunk_scan(x, dt, A, B, C, 64, **kwargs), ssd_forward(x, dt, A, B, C, 64, **kwargs),
                                   rtol=0, atol=0)
        # One sequence: too few walks, so mamba-ssm's kernels, even without gradient.
        one = [t[:1] for t in (x, dt)]
        torch.testing.assert_close(chunk_scan(*one, A, B[:1], C[:1], 64, **kwargs),
                                   mamba_chunk_scan_combined(*one, A, B[:1], C[:1], 64, **kwargs), rtol=0, atol=0)
        # ...unless it is as short as a block model's step: ours, from a given state, handing on the one it leaves.
        short = [t[:1, :32] for t in (x, dt, B, C)]
        entering = torch.randn(1, heads, 32, 32, device="cuda")
        states = dict(kwargs, initial_states=entering, return_final_states=True)
        for got, expected in zip(chunk_scan(*short[:2], A, *short[2:], 64, **states),
                                 ssd_forward(*short[:2], A, *short[2:], 64, **states)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    x = x.detach().requires_grad_(True)
    y = chunk_scan(x, dt, A, B, C, 64, **kwargs)
    assert y.grad_fn is not None
    torch.testing.assert_close(y, mamba_chunk_scan_combined(x, dt, A, B, C, 64, **kwargs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not gate"):
        ssd_forward(x.detach(), dt, A, B, C, 64, z=x.detach(), **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_nll_kernels_match_the_reference_at_gpt2s_vocabulary(dtype):
    """`loss_triton.token_nll` against `diffusion.token_nll`: 512 rows of 50,258 tokens as the LM head's slice of its
    padded product gives them, the mask token last, some rows unlabelled; -log p and the logits' gradient."""
    from diffuapriel_hf.modeling import loss_triton
    from diffuapriel_hf.modeling.diffusion import token_nll

    g = torch.Generator(device="cuda").manual_seed(0)
    vocab, mask_token_id = 50258, 50257
    logits = (4 * torch.randn(512, vocab + 6, device="cuda", generator=g)).to(dtype)[:, :vocab]
    labels = torch.randint(0, mask_token_id, (512,), device="cuda", generator=g)
    labels[::5] = -100
    upstream = torch.rand(512, device="cuda", generator=g)
    results = []
    for nll_function in (loss_triton.token_nll, token_nll):
        leaf = logits.detach().requires_grad_(True)
        nll = nll_function(leaf, labels, mask_token_id)
        (nll * upstream).sum().backward()
        results.append((nll.detach(), leaf.grad))
    (nll, grad), (expected, expected_grad) = results
    assert nll.dtype == torch.float32 and grad.dtype == dtype
    assert (nll - expected).abs().max().item() <= 1e-4
    assert torch.all(nll[::5] == 0) and torch.all(grad[::5] == 0) and torch.all(grad[:, mask_token_id] == 0)
    tolerance = 1e-6 if dtype == torch.float32 else 2**-7 * expected_grad.float().abs().max().item()  # one ulp
    assert (grad.float() - expected_grad.float()).abs().max().item() <= tolerance


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_their_references_on_gpu(dtype):
    from diffuapriel_hf.modeling import fused_ops as fused
    from diffuapriel_hf.modeling.modeling_diffuapriel import DiffuAprielRMSNorm

    torch.manual_seed(0)
    a, b, residual = (torch.randn(3, 1001, 96, device="cuda").to(dtype) for _ in range(3))
    norm = DiffuAprielRMSNorm(96, eps=1e-5).to("cuda", dtype)
    exact = lambda t: t.float()  # noqa: E731  the references in float32: what both forms approximate
    tolerance = 1e-6 if dtype == torch.float32 else 8e-3
    with torch.no_grad():
        norm.weight.normal_()
        # One addition in a's dtype either way: the same rounding.
        torch.testing.assert_close(fused.add_time_reversed(a, b, use_kernel=True),
                                   fused.add_time_reversed_reference(a, b), rtol=0, atol=0)
        # silu(gate) * up rounded once instead of twice: at least as close to float32 as the reference.
        exact_swiglu = fused.swiglu_reference(exact(a), exact(b))
        assert rel_err(fused.swiglu(a, b, use_kernel=True), exact_swiglu) <= tolerance / 2
        gate_up = torch.cat([a, b], dim=-1)  # the one-product MLP's layout
        torch.testing.assert_close(fused.swiglu_of_product(gate_up, use_kernel=True),
                                   fused.swiglu(a, b, use_kernel=True), rtol=0, atol=0)
        assert rel_err(fused.swiglu_reference(a, b), exact_swiglu) <= tolerance
        # The direction sum, residual add and norm: the residual stream rounded once, then its norm.
        float_norm = DiffuAprielRMSNorm(96, eps=1e-5).to("cuda")
        float_norm.weight.copy_(norm.weight)
        for mirrored, scale in [(None, 1.0), (b, 1.0), (b, 0.5)]:
            fused_out = fused.add_rms_norm(residual, a, norm, mirrored, scale, use_kernel=True)
            reference_out = fused.add_rms_norm_reference(residual, a, norm, mirrored, scale)
            exact_out = fused.add_rms_norm_reference(exact(residual), exact(a), float_norm,
                                                     None if mirrored is None else exact(mirrored), scale)
            for fused_part, reference_part, exact_part in zip(fused_out, reference_out, exact_out):
                assert fused_part.dtype == dtype
                assert rel_err(fused_part, exact_part) <= tolerance
                assert rel_err(reference_part, exact_part) <= 2 * tolerance
    # A gradient needed: the references, which carry it; the residual add + norm has a backward of its own.
    a.requires_grad_(True)
    assert fused.swiglu(a, b, use_kernel=True).grad_fn is not None
    assert fused.add_time_reversed(a, b, use_kernel=True).grad_fn is not None
    outputs = fused.add_rms_norm(residual, a, norm, b, use_kernel=True)
    assert all(type(t.grad_fn).__name__ == "AddRMSNormBackward" for t in outputs)
    # The SwiGLU of one product has a backward kernel: its gradient as close to float32's as the reference's.
    upstream = torch.randn(a.shape, device="cuda")
    gradients = []
    for kernel, work_dtype in ((True, dtype), (False, dtype), (False, torch.float32)):
        leaf = torch.cat([a, b], dim=-1).detach().to(work_dtype).requires_grad_(True)
        out = fused.swiglu_of_product(leaf, use_kernel=kernel)
        assert (type(out.grad_fn).__name__ == "SwiGLUOfProductBackward") == kernel
        out.backward(upstream.to(work_dtype))
        gradients.append(leaf.grad)
    kernel_gradient, reference_gradient, exact_gradient = gradients
    assert kernel_gradient.dtype == dtype
    assert rel_err(kernel_gradient, exact_gradient) <= rel_err(reference_gradient, exact_gradient) + 1e-6


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("dtype, angles_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)], ids=["float32", "bf16", "autocast"])
def test_rotary_kernel_matches_the_reference_forward_and_backward_on_gpu(dtype, angles_dtype):
    """The 1.3B presets' attention shape (16 query heads, 8 key heads of 128) and a small odd one: the kernel's outputs
    (of the reference's dtype: float32 for bf16 projections turned by float32 angles, as under autocast) and the
    gradients (of the projections' dtype) at least as close to float32's as the reference's (bf16: one rounding
    instead of three)."""
    from diffuapriel_hf.modeling import fused_ops as fused

    torch.manual_seed(0)
    for batch, length, heads, key_heads, head_dim in [(2, 2048, 16, 8, 128), (3, 37, 3, 1, 24)]:
        angles = torch.randn(batch, length, head_dim // 2, device="cuda").repeat(1, 1, 2) * 100
        cos, sin = angles.cos().to(angles_dtype), angles.sin().to(angles_dtype)
        rows = [torch.randn(batch, length, h, head_dim, device="cuda") for h in (heads, key_heads)]
        upstream = [torch.randn(batch, h, length, head_dim, device="cuda") for h in (heads, key_heads)]
        results = []
        for kernel, work_dtype in ((True, dtype), (False, dtype), (False, torch.float32)):
            leaves = [t.to(work_dtype).requires_grad_(True) for t in rows]
            angles_of = [t if work_dtype == dtype else t.float() for t in (cos, sin)]
            outputs = fused.rotary(*[t.transpose(1, 2) for t in leaves], *angles_of, use_kernel=kernel)
            assert all(("RotaryBackward" in repr(o.grad_fn.next_functions)) == kernel for o in outputs)
            sum((o.float() * u).sum() for o, u in zip(outputs, upstream)).backward()
            results.append([o.detach() for o in outputs] + [t.grad for t in leaves])
        for index, (kernel_part, reference_part, exact_part) in enumerate(zip(*results)):
            assert kernel_part.dtype == reference_part.dtype
            assert kernel_part.dtype == (torch.promote_types(dtype, angles_dtype) if index < 2 else dtype)
            assert rel_err(kernel_part, exact_part) <= rel_err(reference_part, exact_part) + 1e-6
        with torch.no_grad():  # inference: the kernel without autograd, the same values
            plain = fused.rotary(*[t.to(dtype).transpose(1, 2) for t in rows], cos, sin, use_kernel=True)
        for plain_part, kernel_part in zip(plain, results[0]):
            torch.testing.assert_close(plain_part, kernel_part, rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(3, 1001, 96), (2, 2048, 2048)], ids=["small", "1.3b-width"])
def test_fused_residual_norm_gradients_match_the_reference_on_gpu(dtype, tolerance, shape):
    from diffuapriel_hf.modeling import fused_ops as fused
    from diffuapriel_hf.modeling.modeling_diffuapriel import DiffuAprielRMSNorm

    torch.manual_seed(0)
    inputs = [torch.randn(shape, device="cuda") for _ in range(3)]  # residual, update, time-reversed update
    upstream = [torch.randn(shape, device="cuda") for _ in range(2)]  # gradients of hidden and of its norm
    weight = torch.randn(shape[-1], device="cuda")
    gradients = []
    for kernel, work_dtype in ((True, dtype), (False, torch.float32)):
        norm = DiffuAprielRMSNorm(shape[-1], eps=1e-5).to("cuda", work_dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
        leaves = [t.to(work_dtype).requires_grad_(True) for t in inputs]
        for scale in (1.0, 0.5):
            outputs = fused.add_rms_norm(*leaves[:2], norm, leaves[2], scale, use_kernel=kernel)
            sum((o.float() * u).sum() for o, u in zip(outputs, upstream)).backward()
        gradients.append([t.grad for t in leaves] + [norm.weight.grad])
    for name, actual, expected in zip(["residual", "update", "time-reversed", "weight"], *gradients):
        assert actual.dtype == dtype
        assert rel_err(actual, expected) <= tolerance, name


def test_mlp_takes_gate_and_up_as_one_product_on_long_cuda_inputs_unless_a_projection_is_replaced(monkeypatch):
    from diffuapriel_hf.modeling import modeling_diffuapriel
    from diffuapriel_hf.modeling.modeling_diffuapriel import DiffuAprielMLP

    min_tokens = DISPATCH_THRESHOLDS["mlp_one_product_min_tokens"].value

    class ShiftedLinear(torch.nn.Linear):  # what a LoRA or quantised layer looks like to the MLP: a subclass
        def forward(self, x):
            return super().forward(x) + 1.0

    one_products = []  # the widths of what the one-product path hands to swiglu_of_product: gate and up side by side
    swiglu_of_product = modeling_diffuapriel.swiglu_of_product

    def recording_swiglu_of_product(gate_up, use_kernel=False):
        one_products.append(gate_up.shape[-1])
        return swiglu_of_product(gate_up, use_kernel=use_kernel)

    monkeypatch.setattr(modeling_diffuapriel, "swiglu_of_product", recording_swiglu_of_product)
    config = preset_config("tiny")
    torch.manual_seed(0)
    mlp = DiffuAprielMLP(config).cuda()
    with torch.no_grad():  # inference: one product from min_tokens
        kernels = resolve_kernel_policy(config, "cuda")
    with torch.enable_grad():  # training: one product always
        training_kernels = resolve_kernel_policy(config, "cuda")
    assert kernels.mlp_one_product_min_tokens == min_tokens and training_kernels.mlp_one_product_min_tokens == 0
    for tokens, one_product in [(min_tokens, True), (min_tokens - 1, False)]:
        one_products.clear()
        x = torch.randn(1, tokens, config.hidden_size, device="cuda")
        with torch.no_grad():
            separate = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
            torch.testing.assert_close(mlp(x, kernels), separate, rtol=1e-5, atol=1e-5)
        assert one_products == ([2 * config.intermediate_size] if one_product else [])
    # In training, one product at any length; the gradients reach both weights through the concatenation, as the
    # separate products' do.
    x = torch.randn(1, 64, config.hidden_size, device="cuda")
    gradients = []
    for policy in (training_kernels, REFERENCE_POLICY):
        one_products.clear()
        mlp.zero_grad()
        mlp(x, policy).sum().backward()
        assert one_products == ([2 * config.intermediate_size] if policy is training_kernels else [])
        gradients.append([p.grad.clone() for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)])
    for fused_gradient, separate_gradient in zip(*gradients):
        torch.testing.assert_close(fused_gradient, separate_gradient, rtol=1e-4, atol=1e-5)
    assert mlp.gate_proj.weight.grad.abs().sum() > 0 and mlp.up_proj.weight.grad.abs().sum() > 0
    shifted = ShiftedLinear(config.hidden_size, config.intermediate_size, bias=False).cuda()
    shifted.load_state_dict(mlp.up_proj.state_dict())
    mlp.up_proj = shifted
    one_products.clear()
    with torch.no_grad():
        separate = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x, kernels), separate, rtol=1e-5, atol=1e-5)
    assert one_products == []


def padded_batch(config, lengths, side, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), config.pad_token_id)
    mask = torch.zeros_like(ids)
    spans = []
    for row, length in enumerate(lengths):
        span = slice(width - length, width) if side == "left" else slice(0, length)
        ids[row, span] = torch.randint(3, config.mask_token_id, (length,), generator=generator)
        mask[row, span] = 1
        spans.append(span)
    return ids.cuda(), mask.cuda(), spans


@needs_kernels
@pytest.mark.parametrize("layer_types", [[MAMBA] * 3, [MAMBA, ATTENTION, MAMBA]], ids=["mamba", "hybrid"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_at_a_time_on_the_kernels(layer_types, side):
    torch.manual_seed(5)
    config = preset_config("tiny", num_hidden_layers=3, layer_types=layer_types, **SIZES)
    model = DiffuAprielForMaskedLM(config).cuda().eval()
    ids, mask, spans = padded_batch(config, [150, 77, 9], side)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for row, span in enumerate(spans):
            alone = model(ids[row : row + 1, span]).logits[0]
            assert rel_err(batched[row, span], alone) <= FP32_TOL


@needs_kernels
@pytest.mark.parametrize("layer_types", [[MAMBA] * 2, [MAMBA, ATTENTION]], ids=["mamba", "hybrid"])
def test_block_context_window_pass_on_the_kernels_gives_the_whole_pass_logits(layer_types):
    """The block cache on the kernel path: the SSD continuing from recorded states (mamba-ssm's initial and final
    states) and the convolution continuing from the recorded inputs."""
    torch.manual_seed(10)
    config = preset_config("tiny", num_hidden_layers=2, layer_types=layer_types, **SIZES)
    model = DiffuAprielForMaskedLM(config).cuda().eval()
    ids, mask, _ = padded_batch(config, [150, 77], "left")
    context = BlockContext(100, 130)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        model(ids, attention_mask=mask, block_context=context)
        window = model(ids[:, 100:130], block_context=context).logits
    assert rel_err(window, whole[:, 100:130]) <= FP32_TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_sdpa_attention_on_gpu_matches_eager(side):
    torch.manual_seed(6)
    config = preset_config("tiny", num_hidden_layers=2, layer_types=[ATTENTION] * 2, **SIZES)
    model = DiffuAprielForMaskedLM(config).cuda().eval()
    ids, mask, spans = padded_batch(config, [37, 20], side, seed=1)
    outputs = {}
    with torch.no_grad():
        for implementation in ("eager", "sdpa"):
            model.config._attn_implementation = implementation
            outputs[implementation] = model(ids, attention_mask=mask).logits
            if implementation == "sdpa":
                alone = model(ids[1:, spans[1]]).logits[0]
    for row, span in enumerate(spans):
        assert rel_err(outputs["sdpa"][row, span], outputs["eager"][row, span]) <= 1e-5
    assert rel_err(outputs["sdpa"][1, spans[1]], alone) <= 1e-5


@needs_kernels
def test_training_step_on_the_kernels_in_bf16_with_gradient_checkpointing():
    config = preset_config("tiny", num_hidden_layers=2, layer_types=[MAMBA, ATTENTION], **SIZES)
    ids = torch.randint(3, config.mask_token_id, (2, 200), device="cuda")
    labels = ids.masked_fill(torch.rand(ids.shape, device="cuda") < 0.5, -100)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(7)
        model = DiffuAprielForMaskedLM(config).cuda().to(torch.bfloat16).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(ids, labels=labels).loss
        loss.backward()
        grads.append({name: p.grad.float() for name, p in model.named_parameters()})
        assert torch.isfinite(loss)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.isfinite(grad).all(), name
        # Recomputation replays the same kernels on the same inputs; only the order of the SSD backward's atomic
        # additions may differ.
        assert rel_err(grads[1][name], grad) <= BF16_TOL, name


@needs_kernels
def test_graphed_denoiser_gives_the_eager_logits_bit_for_bit():
    torch.manual_seed(8)
    config = preset_config("tiny", num_hidden_layers=3, layer_types=[MAMBA, ATTENTION, MAMBA], **SIZES)
    model = DiffuAprielForMaskedLM(config).cuda().eval()
    denoiser = GraphedDenoiser(model)
    with torch.no_grad():
        for seed in range(3):  # the second and third calls replay the graph on new inputs
            generator = torch.Generator("cuda").manual_seed(seed)
            ids = torch.randint(3, config.mask_token_id, (2, 96), device="cuda", generator=generator)
            graphed = denoiser(ids)
            assert denoiser.graph is not None
            torch.testing.assert_close(graphed, model(ids).logits, rtol=0, atol=0)
        longer_than_graphed = GraphedDenoiser(model, max_tokens=ids.numel() - 1)
        torch.testing.assert_close(longer_than_graphed(ids), model(ids).logits, rtol=0, atol=0)
        assert longer_than_graphed.graph is None  # ran eagerly
        # Kept positions: one graph for every window of the same number of positions.
        graph = None
        for start in (0, 40, 80):
            positions = torch.arange(start, start + 16, device="cuda")
            graphed = denoiser(ids, None, positions)
            graph = graph or denoiser.graph
            assert denoiser.graph is graph
            torch.testing.assert_close(graphed, model(ids, logits_to_keep=positions).logits, rtol=0, atol=0)


@needs_kernels
def test_graphed_window_passes_give_the_eager_logits_bit_for_bit():
    torch.manual_seed(10)
    config = preset_config("tiny", num_hidden_layers=3, layer_types=[MAMBA, ATTENTION, MAMBA], **SIZES)
    model = DiffuAprielForMaskedLM(config).cuda().eval()
    denoiser = GraphedDenoiser(model)
    ids = torch.randint(3, config.mask_token_id, (2, 160), device="cuda")
    graphs = []  # the graph of each pass (held, so that identity means the same graph)
    with torch.no_grad():
        for start in (40, 72, 136):  # later windows elsewhere replay the first one's graph on their own recording
            context = BlockContext(start, start + 24)
            model(ids, block_context=context)
            for seed in range(3):  # new window tokens each time
                window = torch.randint(3, config.mask_token_id, (2, 24), device="cuda",
                                       generator=torch.Generator("cuda").manual_seed(seed))
                graphed = denoiser.window(window, context).clone()
                graphs.append(denoiser.graph[0])
                eager = model(window, block_context=context).logits
                torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
        assert all(graph is graphs[0] for graph in graphs)
        padded = torch.ones_like(ids)
        padded[1, :5] = 0
        context = BlockContext(40, 64)
        model(ids, attention_mask=padded, block_context=context)
        window = ids[:, 40:64]
        torch.testing.assert_close(denoiser.window(window, context), model(window, block_context=context).logits,
                                   rtol=0, atol=0)
        assert denoiser.graph[0] is graphs[0]  # a padded context runs eagerly


def hybrid_for_generation(seed):
    """A tiny Mamba + attention model on CUDA and a batch of two prompts."""
    torch.manual_seed(seed)
    config = preset_config("tiny", num_hidden_layers=2, layer_types=[MAMBA, ATTENTION], **SIZES)
    model = DiffuAprielForMaskedLM(config).cuda().eval()
    return model, torch.randint(3, config.mask_token_id, (2, 7), device="cuda")


@needs_kernels
@pytest.mark.parametrize("use_block_cache", [False, True])
@pytest.mark.parametrize("remasking", ["low_confidence", "ancestral"])
def test_generate_on_cuda_graphs_gives_the_same_tokens_as_eager_steps(remasking, use_block_cache, monkeypatch):
    model, prompt = hybrid_for_generation(seed=9)
    kwargs = dict(max_new_tokens=24, steps=12, block_length=8, remasking=remasking, do_sample=True, seed=3,
                  use_block_cache=use_block_cache)
    graphed = model.generate(prompt, **kwargs)
    if use_block_cache:  # the window passes were replayed from a graph
        assert graphed_denoiser(model)._static_context is not None
    monkeypatch.setattr(GraphedDenoiser, "__call__", GraphedDenoiser.eager)
    monkeypatch.setattr(GraphedDenoiser, "window", GraphedDenoiser.eager_window)
    eager = model.generate(prompt, **kwargs)
    assert torch.equal(graphed, eager)


@needs_kernels
@pytest.mark.parametrize("use_block_cache", [False, True])
def test_generate_captures_anew_after_the_parameters_move(use_block_cache):
    """A generate() call reads where the parameters lie once: the next call must see that they moved."""
    model, prompt = hybrid_for_generation(seed=12)
    other = DiffuAprielForMaskedLM(model.config).cuda().eval()
    kwargs = dict(max_new_tokens=16, steps=8, block_length=8, do_sample=False, use_block_cache=use_block_cache)
    before = model.generate(prompt, **kwargs)
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), other.parameters()):
            mine.data = theirs.data.clone()  # new storage under the same Parameter objects
    moved = model.generate(prompt, **kwargs)
    assert torch.equal(moved, other.generate(prompt, **kwargs))
    assert not torch.equal(moved, before)
    model.to(torch.bfloat16)
    assert torch.equal(model.generate(prompt, **kwargs), other.to(torch.bfloat16).generate(prompt, **kwargs))


@pytest.mark.parametrize("layer_types", [[MAMBA, MAMBA], [MAMBA, ATTENTION]], ids=["mamba", "hybrid"])
def test_an_eager_forward_never_waits_for_the_device(layer_types):
    """The forward checks values only of CPU tensors (the API boundaries check device tensors: generate, the collator,
    the loss), so an eager CUDA pass without padding, whole or with logits_to_keep positions, never synchronises; nor
    does one given a mask of ones on CUDA, which is kept (the padding path, the same logits) rather than read."""
    torch.manual_seed(0)
    config = preset_config("tiny", num_hidden_layers=2, layer_types=layer_types, **SIZES)
    model = DiffuAprielForMaskedLM(config).cuda().eval()
    ids = torch.randint(3, config.mask_token_id, (2, 301), device="cuda")
    keep = torch.arange(100, 164, device="cuda")
    ones = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(ids).logits  # the first passes compile and tune the Triton kernels, which synchronises
        model(ids, logits_to_keep=keep)
        model(ids, attention_mask=ones)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            whole = model(ids).logits
            kept = model(ids, logits_to_keep=keep).logits
            with_ones = model(ids, attention_mask=ones).logits
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(whole, expected, rtol=0, atol=0)
    torch.testing.assert_close(kept, expected[:, keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_ones, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("width, kept, buffer", [(4096, 8192, 12288), (32, 65504, 65536), (32, 1024, 1280)],
                         ids=["prefill", "step-split", "step-short"])
def test_cache_attention_kernel_matches_its_reference_in_bf16(width, kept, buffer):
    # diffuapriel-h-1.3b's heads in bf16, at a prefill chunk and at steps whose key range is split over programs.
    generator = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(2, width, 16, 128, device="cuda", dtype=torch.bfloat16, generator=generator).transpose(1, 2)
    key, value = (torch.randn(2, 8, buffer, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
                  for _ in "kv")
    valid = torch.rand(2, buffer, device="cuda", generator=generator) < 0.9
    start = torch.tensor(kept, device="cuda")
    out = cache_attention.cache_attention(query, key, value, valid, start, 32, 128**-0.5)
    expected = cache_attention.cache_attention_reference(query, key, value, valid, start, 32, 128**-0.5)
    assert rel_err(out, expected) < BF16_TOL


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("kind", [[MAMBA, ATTENTION, MAMBA], [ATTENTION] * 2], ids=["hybrid", "attention"])
def test_block_generation_through_the_cache_attention_kernel_gives_the_implementations_tokens(kind):
    model = build_tiny_model(kind, block_size=4, sharpen=30.0).cuda()
    config = model.config
    with torch.no_grad():  # (generate's grad mode: the kernel has no backward)
        assert resolve_kernel_policy(config, torch.device("cuda")).cache_attention
    ids = torch.randint(3, config.mask_token_id, (2, 10), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    settings = dict(attention_mask=mask, max_new_tokens=14, steps=14, eos_token_id=None)
    kernel = model.generate(ids, **settings)  # graphed steps and consuming passes
    with override_kernel_policy(cache_attention=False):
        assert torch.equal(model.generate(ids, **settings), kernel)
    assert torch.equal(model.generate(ids, use_cache=False, **settings), kernel)


@needs_kernels
@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["norm after gate", "norm before gate"])
def test_gated_norm_backward_matches_mamba_ssm_at_the_1_3b_sizes(norm_before_gate):
    """`gated_norm_triton.gated_rms_norm_backward` (its default launch) against mamba-ssm's `_layer_norm_bwd` as the
    training pass calls it, at a 1.3B step's norm (16,384 rows of 4,096, bf16, one group): z a view of in_proj's
    output, dz written into a view of its gradient, the output recomputed. Both compute in float32 and round dy, dz
    and the output to bf16 (at most one bf16 step apart where their float32 orders differ); dweight is summed in
    float32 over other splits of the rows."""
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd, _layer_norm_fwd

    from diffuapriel_hf.modeling.gated_norm_triton import gated_rms_norm_backward, gated_rms_norm_backward_reference

    rows, width, in_proj_width = 16384, 4096, 2 * 4096 + 2 * 128 + 64
    generator = torch.Generator(device="cuda").manual_seed(0)
    y, dout = (torch.randn(rows, width, device="cuda", generator=generator).to(torch.bfloat16) for _ in "yd")
    z = torch.randn(rows, in_proj_width, device="cuda", generator=generator).to(torch.bfloat16)[:, :width]
    weight = 1 + 0.1 * torch.randn(width, device="cuda", generator=generator)
    _, _, rstd = _layer_norm_fwd(y, weight, None, 1e-5, z, norm_before_gate=norm_before_gate, is_rms_norm=True)
    options = dict(norm_before_gate=norm_before_gate, recompute_output=True)
    dz = torch.empty(rows, in_proj_width, device="cuda", dtype=torch.bfloat16)[:, :width]
    ours = gated_rms_norm_backward(dout, y, z, weight, rstd, dz=dz, **options)
    assert ours[2].data_ptr() == dz.data_ptr() and ours[1].dtype == weight.dtype
    dy, dweight, _, dz_theirs, out = _layer_norm_bwd(dout, y, weight, None, 1e-5, None, rstd, z, group_size=width,
                                                     is_rms_norm=True, **options)
    expected = gated_rms_norm_backward_reference(dout, y, z, weight, rstd, **options)
    for name, got, theirs, reference in zip(("dy", "dweight", "dz", "out"), ours, (dy, dweight, dz_theirs, out),
                                            expected):
        assert got.dtype == theirs.dtype and got.shape == theirs.shape, name
        tolerance = 1e-5 if name == "dweight" else 4e-3
        assert rel_err(got, theirs) <= tolerance, name
        assert rel_err(got, reference) <= tolerance, name


@pytest.mark.skipif(importlib.util.find_spec("causal_conv1d") is None or importlib.util.find_spec("triton") is None,
                    reason="needs causal-conv1d and triton")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_conv1d_backward_matches_causal_conv1d_at_the_1_3b_sizes(weight_dtype):
    """`conv1d_triton.causal_conv1d_backward` (its default launch) against causal-conv1d's `causal_conv1d_bwd_function`
    as the training pass calls it, at a 1.3B step's convolution (4 x 4096 positions, 4352 channels, width 4, silu,
    bf16): x a column slice of in_proj's output, dx written into one of its gradient; and against its reference.
    Both compute in float32 and round dx to bf16 (one bf16 step apart where their orders differ); dweight and dbias
    are summed in float32 over other splits of the positions."""
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function

    from diffuapriel_hf.modeling.conv1d_triton import causal_conv1d_backward, causal_conv1d_backward_reference

    batch, length, channels, in_proj_width = 4, 4096, 4096 + 2 * 128, 2 * 4096 + 2 * 128 + 64
    generator = torch.Generator(device="cuda").manual_seed(0)
    zxbcdt = torch.randn(batch, length, in_proj_width, device="cuda", generator=generator).to(torch.bfloat16)
    x = zxbcdt[..., 4096:4096 + channels]
    dout = torch.randn(batch, length, channels, device="cuda", generator=generator).to(torch.bfloat16)
    weight = (0.5 * torch.randn(channels, 4, device="cuda", generator=generator)).to(weight_dtype)
    bias = (0.1 * torch.randn(channels, device="cuda", generator=generator)).to(weight_dtype)
    gradients = [torch.empty_like(zxbcdt) for _ in "ot"]
    dx, dx_theirs = (g[..., 4096:4096 + channels] for g in gradients)
    ours = causal_conv1d_backward(x, weight, bias, dout, True, dx=dx)
    assert ours[0].data_ptr() == dx.data_ptr()
    _, dweight, dbias, _ = causal_conv1d_bwd_function(x.transpose(1, 2), weight, bias, dout.transpose(1, 2), None,
                                                      None, None, dx_theirs.transpose(1, 2), False, True)
    expected = causal_conv1d_backward_reference(x, weight, bias, dout, True)
    for name, got, theirs, reference in zip(("dx", "dweight", "dbias"), ours, (dx_theirs, dweight, dbias), expected):
        assert got.dtype == theirs.dtype and got.shape == theirs.shape, name
        tolerance = 4e-3 if name == "dx" or weight_dtype == torch.bfloat16 else 1e-5
        assert rel_err(got, theirs) <= tolerance, name
        assert rel_err(got, reference) <= tolerance, name


@needs_kernels
@pytest.mark.parametrize("batch, length", [(4, 4096), (1, 16384)], ids=["4 x 4K", "1 x 16K"])
def test_chunk_pairs_match_mamba_ssm_two_kernels_at_the_1_3b_sizes(batch, length):
    """`ssd_backward_triton.chunk_pairs_backward` against mamba-ssm's `_chunk_scan_bwd_dcb` and
    `_chunk_scan_bwd_ddAcs_stable` (what the training pass calls) at a 1.3B training step's sizes (64 heads of 64 in
    one group, chunks of 128), bf16 x and dy, float32 CB, dt and decays; and against its reference. The same bf16
    products accumulated in float32; the float32 sums (over the heads, the pairs) differ in order."""
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_bwd_dcb, _chunk_scan_bwd_ddAcs_stable

    from diffuapriel_hf.modeling.ssd_backward_triton import chunk_pairs_backward, chunk_pairs_backward_reference

    (x, dt_chunks, dA_cumsum, _, CB, dy, _), _ = chunk_inputs(batch, length, 64, 64, 1, 128, 128,
                                                              dtype=torch.bfloat16, device="cuda")
    ours = chunk_pairs_backward(x, dt_chunks, dA_cumsum, dy, CB, 1)
    theirs = (_chunk_scan_bwd_dcb(x, dt_chunks, dA_cumsum, dy, ngroups=1),
              _chunk_scan_bwd_ddAcs_stable(x, dt_chunks, dA_cumsum, dy, CB))
    expected = chunk_pairs_backward_reference(x, dt_chunks, dA_cumsum, dy, CB, 1)
    for name, got, mamba, reference in zip(("dCB", "ddA"), ours, theirs, expected):
        assert got.dtype == mamba.dtype == torch.float32 and got.shape == mamba.shape, name
        assert rel_err(got, mamba) <= FP32_TOL, name
        assert rel_err(got, reference) <= FP32_TOL, name
