"""The fused kernels of `fused_ops.py`: run on the CPU by Triton's interpreter against their references, and the
dispatch (references on CPU and wherever a gradient is needed). Their compiled form is tested on a GPU in
`test_gpu_kernels.py`."""

import dataclasses

import pytest
import torch

from diffuapriel_hf import DiffuAprielConfig, DiffuAprielModel
from diffuapriel_hf.modeling.fused_ops import (
    add_rms_norm,
    add_rms_norm_reference,
    add_time_reversed,
    add_time_reversed_reference,
    both_reading_orders,
    rotary,
    rotary_reference,
    swiglu,
    swiglu_of_product,
    swiglu_reference,
)
from diffuapriel_hf.modeling.mamba_ops import reverse_time
from diffuapriel_hf.modeling.modeling_diffuapriel import DiffuAprielMLP, DiffuAprielRMSNorm

# (batch, length, width): a partial last block, several time steps and batch rows within one block, a width that is
# not a power of two (the norm kernel's masked columns), odd lengths (the middle row is its own mirror).
SHAPES = [(2, 37, 24), (3, 5, 8), (1, 4100, 3)]


def interpreted_checks() -> dict:
    """The largest difference of each kernel from its reference, per shape (run with TRITON_INTERPRET=1 set)."""
    from diffuapriel_hf.modeling import fused_ops

    torch.manual_seed(0)
    errors = {}
    for shape in SHAPES:
        a, b, residual = torch.randn(shape), torch.randn(shape), torch.randn(shape)
        errors[f"add {shape}"] = (fused_ops.launch_add_time_reversed(a, b) - (a + b.flip(1))).abs().max().item()
        expected = torch.nn.functional.silu(a) * b
        errors[f"swiglu {shape}"] = (fused_ops.launch_swiglu(a, b) - expected).abs().max().item()
        halves = torch.cat([a, b], dim=-1).chunk(2, dim=-1)  # the halves of one product's output
        errors[f"swiglu halves {shape}"] = (fused_ops.launch_swiglu(*halves) - expected).abs().max().item()
        errors[f"swiglu of a product backward {shape}"] = swiglu_backward_error(torch.cat([a, b], dim=-1), residual)
        errors[f"reading orders {shape}"] = reading_orders_error(a, b, residual)
        if shape[1] > 1000:  # one program per row: thousands are slow to interpret, and add nothing here
            continue
        norm = DiffuAprielRMSNorm(shape[-1], eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1]))
        for mirrored, scale in [(None, 1.0), (b, 1.0), (b, 0.5)]:
            expected = add_rms_norm_reference(residual, a, norm, mirrored, scale)
            fused = fused_ops.launch_add_rms_norm(residual, a, norm.weight.detach(), 1e-5, mirrored, scale)
            name = f"norm {'mirrored ' if mirrored is not None else ''}x{scale} {shape}"
            errors[name] = max((f - e).abs().max().item() for f, e in zip(fused, expected))
            default_programs = fused_ops.BACKWARD_PROGRAMS
            for programs in (default_programs, 4):  # one row a program; several, the last one short
                fused_ops.BACKWARD_PROGRAMS = programs
                errors[f"{name} backward, {programs} programs"] = backward_error(residual, a, norm, mirrored, scale)
            fused_ops.BACKWARD_PROGRAMS = default_programs
    errors["MLP training on one product"] = mlp_training_error()
    errors["reading orders in a checkpointed training step"] = reading_orders_training_error()
    errors.update(rotary_errors())
    return errors


# (batch, length, query heads, key heads, head_dim, projections' dtype): grouped keys; head counts and a half head that
# are not powers of two (masked lanes); one head of each; half-precision projections with float32 angles (autocast's
# mix), which the reference promotes to float32.
ROTARY_SHAPES = [(2, 7, 4, 2, 16, torch.float32), (1, 5, 3, 3, 12, torch.float32), (3, 2, 1, 1, 4, torch.float32),
                 (2, 3, 2, 1, 8, torch.float16)]


def rotary_errors() -> dict:
    """The largest differences of `fused_ops.rotary` (its kernel; `Rotary` where a gradient is needed) from the
    reference, on projections laid out (B, L, heads, d) as the attention's, with angles of their own for each sequence
    and shared across the batch (stride 0): the outputs (of the reference's dtype), the inverse rotation undoing the
    rotation, and how much further the gradients of query and key (of the inputs' dtype) lie from float64's than the
    reference's (half precision: the kernel rounds once, the reference after each branch)."""
    from diffuapriel_hf.modeling import fused_ops

    torch.manual_seed(3)
    errors = {}
    for batch, length, heads, key_heads, head_dim, dtype in ROTARY_SHAPES:
        angles = torch.randn(batch, length, head_dim // 2).repeat(1, 1, 2)
        for shared in (False, True):
            cos, sin = angles.cos(), angles.sin()
            if shared:  # one row of angles for every sequence, expanded (batch stride 0)
                cos, sin = cos[:1].expand(batch, -1, -1), sin[:1].expand(batch, -1, -1)
            rows = [torch.randn(batch, length, h, head_dim).to(dtype) for h in (heads, key_heads)]
            name = f"rotary {(batch, length, heads, key_heads, head_dim, dtype)}{' shared angles' if shared else ''}"
            upstream = [torch.randn(batch, h, length, head_dim) for h in (heads, key_heads)]
            runs = {}
            for form, work_dtype in (("kernel", dtype), ("reference", dtype), ("exact", torch.float64)):
                leaves = [t.to(work_dtype, copy=True).requires_grad_(True) for t in rows]
                angles_of = [t.to(torch.float64) if form == "exact" else t for t in (cos, sin)]
                inputs = [t.transpose(1, 2) for t in leaves] + angles_of
                outputs = (fused_ops.rotary(*inputs, use_kernel=True) if form == "kernel"
                           else fused_ops.rotary_reference(*inputs))
                if form == "kernel":
                    ran_kernel = all("RotaryBackward" in graph_nodes(o.grad_fn) for o in outputs)
                sum((o * u.to(o.dtype)).sum() for o, u in zip(outputs, upstream)).backward()
                runs[form] = ([o.detach() for o in outputs], [t.grad for t in leaves])
            (kernel_out, kernel_grads), (reference_out, reference_grads), (_, exact_grads) = runs.values()
            if (not ran_kernel or [t.dtype for t in kernel_out] != [t.dtype for t in reference_out]
                    or any(g.dtype != dtype for g in kernel_grads)):
                errors[name] = float("inf")
                continue
            errors[name] = max((f - r).abs().max().item() for f, r in zip(kernel_out, reference_out))
            undone = fused_ops.launch_rotary(*[t.transpose(1, 2).contiguous() for t in kernel_out], cos, sin,
                                             inverse=True)
            errors[f"{name} inverse"] = max((u - t).abs().max().item() for u, t in zip(undone, rows))
            distance = [max((g.double() - e).abs().max().item() for g, e in zip(grads, exact_grads))
                        for grads in (kernel_grads, reference_grads)]
            errors[f"{name} backward"] = max(distance[0] - distance[1], 0.0)
    return errors


def mlp_training_error() -> float:
    """The largest difference between the input's and the weights' gradients of an MLP under training's policy on
    CUDA (gate and up as one product, `SwiGLUOfProduct`) and under the references' (two products); infinite if the
    first did not run the kernel."""
    from diffuapriel_hf.modeling.kernel_policy import REFERENCE_POLICY

    torch.manual_seed(2)
    mlp = DiffuAprielMLP(DiffuAprielConfig.from_preset("tiny"))
    x = torch.randn(2, 9, mlp.gate_proj.in_features)
    training = dataclasses.replace(REFERENCE_POLICY, fused_swiglu=True, mlp_one_product_min_tokens=0)
    gradients = []
    for policy in (training, REFERENCE_POLICY):
        leaf = x.clone().requires_grad_(True)
        mlp.zero_grad()
        out = mlp(leaf, policy)
        if policy is training and "SwiGLUOfProductBackward" not in graph_nodes(out.grad_fn):
            return float("inf")
        out.square().sum().backward()
        weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        gradients.append([leaf.grad] + [weight.grad for weight in weights])
    return max((f - e).abs().max().item() for f, e in zip(*gradients))


def reading_orders_training_error() -> float:
    """The largest difference between a training step's gradients (input embeddings and every parameter) of a tiny
    bidirectional model with gradient checkpointing, its mixers' reading orders as `BothReadingOrders` (the rest on
    the references) against the references alone; inf if the Function was not in the graph."""
    from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy

    torch.manual_seed(0)
    model = DiffuAprielModel(DiffuAprielConfig.from_preset("tiny"))
    # transformers 5.24 renamed gradient_checkpointing_enable; 5.17 only has the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    embeds = torch.randn(2, 9, model.config.hidden_size)
    gradients = []
    for fused in (True, False):
        leaf = embeds.clone().requires_grad_(True)
        model.zero_grad()
        with override_kernel_policy(fused_reading_orders=fused):
            out = model(inputs_embeds=leaf).last_hidden_state
            if fused and "BothReadingOrdersBackward" not in graph_nodes(out.grad_fn):
                return float("inf")
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        gradients.append([leaf.grad] + [p.grad for p in model.parameters() if p.grad is not None])
    return max((f - e).abs().max().item() for f, e in zip(*gradients))


def graph_nodes(node) -> set:
    """The names of the autograd nodes that `node` reaches."""
    seen, pending = set(), [node]
    while pending:
        node = pending.pop()
        if node is not None and node not in seen:
            seen.add(node)
            pending.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def reading_orders_error(x, upstream, upstream_reversed) -> float:
    """The largest difference of `BothReadingOrders` (outputs, and the gradient its backward kernel sums) from x,
    x.flip(1) and autograd's gradient of those, with both outputs used and with either alone."""
    from diffuapriel_hf.modeling import fused_ops

    x = x.clone().requires_grad_(True)
    in_order, reversed_order = fused_ops.BothReadingOrders.apply(x)
    errors = [(in_order - x).abs().max().item(), (reversed_order - x.flip(1)).abs().max().item()]
    for used, expected in [((0, 1), upstream + upstream_reversed.flip(1)), ((0,), upstream),
                           ((1,), upstream_reversed.flip(1))]:
        outputs = fused_ops.BothReadingOrders.apply(x)
        (grad,) = torch.autograd.grad(sum((outputs[i] * (upstream, upstream_reversed)[i]).sum() for i in used), x)
        errors.append((grad - expected).abs().max().item())
    return max(errors)


def backward_error(residual, update, norm, mirrored, scale) -> float:
    """The largest difference between the gradients (of the residual, the update, the time-reversed update and the
    weight) of `AddRMSNorm` and of the reference, under the same random output gradients."""
    from diffuapriel_hf.modeling import fused_ops

    generator = torch.Generator().manual_seed(1)
    upstream = [torch.randn(residual.shape, generator=generator) for _ in range(2)]
    gradients = []
    for fused in (True, False):
        inputs = [t.clone().requires_grad_(True) for t in (residual, update, mirrored) if t is not None]
        norm.zero_grad()
        if fused:
            outputs = fused_ops.AddRMSNorm.apply(inputs[0], inputs[1], inputs[2] if mirrored is not None else None,
                                                 norm.weight, norm.variance_epsilon, scale)
        else:
            outputs = add_rms_norm_reference(*inputs[:2], norm, inputs[2] if mirrored is not None else None, scale)
        sum((o * u).sum() for o, u in zip(outputs, upstream)).backward()
        gradients.append([t.grad for t in inputs] + [norm.weight.grad])
    return max((f - e).abs().max().item() for f, e in zip(*gradients))


def swiglu_backward_error(gate_up, upstream) -> float:
    """The largest difference between the gradients of gate_up from `SwiGLUOfProduct` and from the reference of its
    halves, under the output gradient `upstream`."""
    from diffuapriel_hf.modeling import fused_ops

    gradients = []
    for function in (fused_ops.SwiGLUOfProduct.apply, lambda t: swiglu_reference(*t.chunk(2, dim=-1))):
        leaf = gate_up.clone().requires_grad_(True)
        function(leaf).backward(upstream)
        gradients.append(leaf.grad)
    return (gradients[0] - gradients[1]).abs().max().item()


def test_interpreted_kernels_match_their_references(interpreted):
    assert len(interpreted) == 5 * len(SHAPES) + 3 * 2 * 3 + 2 + 3 * 2 * len(ROTARY_SHAPES)
    for name, error in interpreted.items():
        assert error <= 1e-5, (name, error)


@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 4, 2), (2, 5), (4, 6, 3, 2), (2, 0, 3)])
def test_reverse_time_is_flip_along_time_and_its_own_gradient(shape):
    """As rows of (batch x time) where those are one axis, along time where not (a view with batch and time apart)."""
    x = torch.randn(shape, requires_grad=True)
    apart = torch.randn((shape[1], shape[0]) + shape[2:]).transpose(0, 1)
    assert torch.equal(reverse_time(x), x.flip(1)) and torch.equal(reverse_time(apart), apart.flip(1))
    gradient = torch.randn(shape)
    reverse_time(x).backward(gradient)
    assert torch.equal(x.grad, gradient.flip(1))


def test_on_cpu_and_with_gradients_the_references_run():
    a = torch.randn(2, 7, 4, requires_grad=True)
    b, residual = torch.randn(2, 7, 4), torch.randn(2, 7, 4)
    torch.testing.assert_close(add_time_reversed(a, b), a + b.flip(1))
    torch.testing.assert_close(add_time_reversed_reference(a, b), a + reverse_time(b))
    in_order, reversed_order = both_reading_orders(a, use_kernel=False)
    assert in_order is a
    torch.testing.assert_close(reversed_order, a.flip(1))
    out = swiglu(a, b)
    torch.testing.assert_close(out, torch.nn.functional.silu(a) * b)
    torch.testing.assert_close(swiglu_reference(a, b), out)
    product_out = swiglu_of_product(torch.cat([a, b], dim=-1))  # needs a gradient through a
    torch.testing.assert_close(product_out, out)
    norm = DiffuAprielRMSNorm(4, eps=1e-6)
    hidden, normed = add_rms_norm(residual, a, norm, b, 0.5)
    torch.testing.assert_close(hidden, residual + (a + b.flip(1)) * 0.5)
    torch.testing.assert_close(normed, norm(hidden))
    (out.sum() + normed.sum() + product_out.sum()).backward()  # the references carry the gradient
    assert a.grad is not None and norm.weight.grad is not None
    query, key = torch.randn(2, 3, 5, 8, requires_grad=True), torch.randn(2, 1, 5, 8)  # (B, heads, L, d)
    angles = torch.randn(2, 5, 8)
    rotated = rotary(query, key, angles.cos(), angles.sin(), use_kernel=True)  # laid out (B, H, L, d): no kernel
    for actual, expected in zip(rotated, rotary_reference(query, key, angles.cos(), angles.sin())):
        torch.testing.assert_close(actual, expected)
    rotated[0].sum().backward()
    assert query.grad is not None


def test_the_rotary_reference_turns_each_pair_of_halves_by_its_angle():
    """transformers' form x * cos + rotate_half(x) * sin is the rotation of each (x[i], x[i + d/2]) by angle i."""
    query, key = torch.randn(1, 2, 3, 4, dtype=torch.float64), torch.randn(1, 1, 3, 4, dtype=torch.float64)
    theta = torch.randn(1, 3, 2, dtype=torch.float64)
    angles = theta.repeat(1, 1, 2)
    rotated, _ = rotary_reference(query, key, angles.cos(), angles.sin())
    x1, x2 = query[..., :2], query[..., 2:]
    c, s = theta.cos()[:, None], theta.sin()[:, None]
    torch.testing.assert_close(rotated, torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1))


@pytest.mark.parametrize("strategy", ["add", "mean"])
@pytest.mark.parametrize("intermediate_size", [0, 16])
def test_blocks_with_the_fused_residual_path_equal_the_mixer_forward(strategy, intermediate_size):
    """The block takes the mixer's directions apart to fuse their sum into its residual add and norm: the same
    hidden states as adding the mixer's own output, with and without an MLP, for the sum and the mean."""
    config = DiffuAprielConfig.from_preset("tiny", bidirectional_strategy=strategy, intermediate_size=intermediate_size)
    torch.manual_seed(0)
    model = DiffuAprielModel(config).eval()
    block = next(b for b in model.layers if b.layer_type == "linear_attention")
    hidden = torch.randn(2, 9, config.hidden_size)
    with torch.no_grad():
        expected = hidden + block.mixer(block.input_layernorm(hidden)).combined()
        if block.mlp is not None:
            expected = expected + block.mlp(block.post_mixer_layernorm(expected))
        torch.testing.assert_close(block(hidden)[0], expected)
