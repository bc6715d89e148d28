"""The fused elementwise kernels (`fused_elementwise.py`): run on the CPU by Triton's interpreter against their
references, and the dispatch (references on CPU and wherever a gradient is needed). Their compiled form is tested
on a GPU in `test_gpu_kernels.py`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffuapriel_hf.fused_elementwise import (
    add_time_reversed,
    add_time_reversed_reference,
    silu_mul,
    silu_mul_reference,
)
from diffuapriel_hf.mamba_ops import reverse_time

# (batch, length, width): a partial last block, and several time steps and batch rows within one block.
SHAPES = [(2, 37, 24), (3, 5, 8), (1, 4100, 3)]


def interpreted_errors() -> dict:
    """The largest difference of each kernel from its reference, per shape (run with TRITON_INTERPRET=1 set)."""
    from diffuapriel_hf import fused_elementwise

    torch.manual_seed(0)
    errors = {}
    for shape in SHAPES:
        a, b = torch.randn(shape), torch.randn(shape)
        errors[f"add {shape}"] = (fused_elementwise.launch_add_time_reversed(a, b) - (a + b.flip(1))).abs().max().item()
        errors[f"silu {shape}"] = (
            fused_elementwise.launch_silu_mul(a, b) - torch.nn.functional.silu(a) * b).abs().max().item()
    return errors


def test_interpreted_kernels_match_their_references():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import json, test_fused_elementwise as t; print(json.dumps(t.interpreted_errors()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == {f"{op} {shape}" for op in ("add", "silu") for shape in SHAPES}
    for name, error in errors.items():
        assert error <= 1e-6, name


def test_on_cpu_and_with_gradients_the_references_run():
    a = torch.randn(2, 7, 4, requires_grad=True)
    b = torch.randn(2, 7, 4)
    torch.testing.assert_close(add_time_reversed(a, b), a + b.flip(1))
    torch.testing.assert_close(add_time_reversed_reference(a, b), a + reverse_time(b))
    out = silu_mul(a, b)
    torch.testing.assert_close(out, silu_mul_reference(a, b))
    out.sum().backward()  # the references carry the gradient
    assert a.grad is not None
