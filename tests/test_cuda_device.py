"""Our Triton kernels launch on their tensors' card (`modeling/cuda_device.py`): Triton launches on the current
device, so a model split over cards (device_map) would run a block's kernels on another card's stream. On the CPU:
the guard's choice, and that every launch in the modeling code runs under it; with two GPUs: a model split over both
gives the logits and gradients it gives on one."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import build_tiny_model

from diffuapriel_hf import DiffuAprielForMaskedLM
from diffuapriel_hf.modeling import cuda_device
from diffuapriel_hf.modeling.cuda_device import on_device_of

MODELING = Path(cuda_device.__file__).resolve().parent


def test_the_guard_makes_the_tensors_card_current_only_where_another_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on_second = on_device_of(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(on_second, torch.cuda.device) and on_second.idx == 1
    assert not isinstance(on_device_of(SimpleNamespace(device=torch.device("cuda", 0))), torch.cuda.device)
    assert not isinstance(on_device_of(torch.zeros(1)), torch.cuda.device)  # the CPU, under Triton's interpreter


def launches_outside_the_guard(source: str) -> list[str]:
    """The Triton launches (`name[grid](...)`, the name a kernel's: `_..._kernel`) in `source` that no enclosing
    `with on_device_of(...)` covers."""
    found = []

    def visit(node, guarded: bool):
        if isinstance(node, ast.With):
            guarded = guarded or any(isinstance(item.context_expr, ast.Call)
                                     and getattr(item.context_expr.func, "id", "") == "on_device_of"
                                     for item in node.items)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and getattr(node.func.value, "id", "").endswith("_kernel") and not guarded):
            found.append(node.func.value.id)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(source), False)
    return found


def test_every_triton_launch_in_the_modeling_code_runs_on_its_tensors_card():
    launches = {path.name: launches_outside_the_guard(path.read_text()) for path in sorted(MODELING.glob("*.py"))}
    assert {name: kernels for name, kernels in launches.items() if kernels} == {}
    assert launches_outside_the_guard("def f(x):\n    _walk_kernel[(1,)](x)\n") == ["_walk_kernel"]
    assert launches_outside_the_guard("def f(x):\n    with on_device_of(x):\n        _walk_kernel[(1,)](x)\n") == []


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("training", [False, True])
def test_a_model_split_over_two_cards_gives_the_logits_and_gradients_it_gives_on_one(tmp_path, training):
    """Half the blocks on cuda:1 with cuda:0 current (as device_map leaves it): the fused kernels and the SSD run on
    cuda:1's tensors. Against the model on cuda:1 alone, in float32."""
    model = build_tiny_model("hybrid", num_layers=4)
    model.save_pretrained(tmp_path)
    half = len(model.model.layers) // 2
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 0}  # the head tied
    device_map.update({f"model.layers.{i}": 0 if i < half else 1 for i in range(len(model.model.layers))})
    split = DiffuAprielForMaskedLM.from_pretrained(tmp_path, device_map=device_map)
    whole = DiffuAprielForMaskedLM.from_pretrained(tmp_path, device_map={"": 1})
    ids = torch.randint(0, model.config.mask_token_id, (2, 300), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -100)
    results = []
    for mapped in (split, whole):
        mapped.train(training)
        with torch.cuda.device(0), torch.set_grad_enabled(training):
            out = mapped(input_ids=ids.to(0), labels=labels.to(0) if training else None)
            if training:
                out.loss.backward()
        grads = [None if p.grad is None else p.grad.cpu() for p in mapped.parameters()] if training else []
        results.append((out.logits.float().cpu() if out.logits is not None else out.loss.detach().cpu(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    assert len(results[0][1]) == len(results[1][1])
    for got, expected in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
