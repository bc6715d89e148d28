"""The initialisation: Mamba-2's own (A, D, dt, the convolution, the residual projections), transformers' defaults
elsewhere, and what loading relies on (loaded weights untouched, missing ones initialised like a fresh model's)."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffuapriel_hf import DiffuAprielForMaskedLM
from diffuapriel_hf.modeling.modeling_diffuapriel import (
    DiffuAprielAttention,
    DiffuAprielMLP,
    DiffuAprielRMSNorm,
    Mamba2Mixer,
    MambaRMSNormGated,
    residual_branches,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def residual_projections(model):
    """Every projection that writes into the residual stream: (name, nn.Linear)."""
    for name, module in model.named_modules():
        if isinstance(module, Mamba2Mixer):
            yield f"{name}.out_proj", module.out_proj
        elif isinstance(module, DiffuAprielAttention):
            yield f"{name}.o_proj", module.o_proj
        elif isinstance(module, DiffuAprielMLP):
            yield f"{name}.down_proj", module.down_proj


def assert_uniform_within(weight: torch.Tensor, bound: float, name: str):
    """Drawn from uniform(-bound, bound): inside it, and reaching near both ends (thousands of draws)."""
    assert weight.abs().max() <= bound, name
    assert weight.max() > 0.9 * bound and weight.min() < -0.9 * bound, name


def assert_initialised(model):
    """Every part of a freshly initialised model as `_init_weights` draws it."""
    config = model.config
    branches = residual_branches(config)
    for name, module in model.named_modules():
        if isinstance(module, Mamba2Mixer):
            heads = module.num_heads
            torch.testing.assert_close(-torch.exp(module.A_log), -torch.arange(1.0, heads + 1), msg=name)
            assert torch.equal(module.D, torch.ones(heads)), name
            dt = F.softplus(module.dt_bias)
            assert (dt >= config.mamba_dt_min * 0.999).all() and (dt <= config.mamba_dt_max * 1.001).all(), name
            assert_uniform_within(module.conv1d.weight, 1 / math.sqrt(config.mamba_d_conv), f"{name}.conv1d")
            assert module.conv1d.bias is None or not module.conv1d.bias.any(), name
        elif isinstance(module, (DiffuAprielRMSNorm, MambaRMSNormGated)):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
    for name, linear in residual_projections(model):
        assert_uniform_within(linear.weight, 1 / math.sqrt(linear.in_features * branches), name)
    # The other projections and the embeddings: transformers' normal(0, initializer_range).
    in_proj = model.model.layers[0].mixer
    other = in_proj.left_to_right.in_proj.weight if hasattr(in_proj, "left_to_right") else in_proj.q_proj.weight
    assert abs(other.std().item() - config.initializer_range) < 0.1 * config.initializer_range
    embeddings = model.model.embed_tokens.weight
    # The mask token's row drawn as every other (the token every noised position holds), the LM head tied to it.
    assert abs(embeddings[config.mask_token_id].std().item() - config.initializer_range) < 0.3 * config.initializer_range
    assert model.lm_head.weight is embeddings


@pytest.mark.parametrize(
    "kind, overrides, branches",
    [
        ("mamba", {}, 3 * 3),  # per layer: two summed directions and the MLP
        ("hybrid", {}, 3 + 2 + 3),  # Mamba, attention, Mamba
        ("attention", {}, 2 * 3),
        ("mamba", dict(bidirectional=False), 2 * 3),
        ("mamba", dict(bidirectional_strategy="mean"), 2 * 3),
        ("mamba", dict(intermediate_size=0), 2 * 3),
    ],
)
def test_a_fresh_model_has_mamba2s_initialisation(kind, overrides, branches, tiny_model):
    model = tiny_model(kind, num_layers=3, **overrides)
    assert residual_branches(model.config) == branches
    assert_initialised(model)


def test_initialising_again_draws_again_rather_than_rescaling(tiny_model):
    model = tiny_model("hybrid", num_layers=3)
    before = model.model.layers[0].mixer.left_to_right.out_proj.weight.clone()
    with torch.no_grad():
        for module in model.modules():
            model._init_weights(module)
    assert not torch.equal(model.model.layers[0].mixer.left_to_right.out_proj.weight, before)
    assert_initialised(model)  # the same bounds: the residual projections were not scaled down a second time


def test_a_model_made_on_the_meta_device_and_initialised_is_a_fresh_model(tiny_model):
    config = tiny_model("hybrid", num_layers=3).config
    with torch.device("meta"):
        model = DiffuAprielForMaskedLM(config)
    model = model.to_empty(device="cpu")
    model.init_weights()
    assert_initialised(model)


def test_loading_keeps_every_loaded_weight_and_initialises_the_missing_ones(tiny_model, tmp_path):
    torch.manual_seed(1)
    model = tiny_model("hybrid", num_layers=3)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = [
        "model.layers.0.mixer.right_to_left.conv1d.weight",
        "model.layers.0.mixer.right_to_left.out_proj.weight",
        "model.layers.0.mixer.right_to_left.dt_bias",
        "model.layers.1.mixer.o_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    ]
    save_file({key: value for key, value in weights.items() if key not in missing}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = DiffuAprielForMaskedLM.from_pretrained(tmp_path)
    state = loaded.state_dict()
    for key, value in weights.items():
        if key not in missing:
            assert torch.equal(state[key], value), key
    for key in missing:
        assert not torch.equal(state[key], weights[key]), key  # drawn afresh
    assert_initialised(loaded)  # and drawn as a fresh model's
