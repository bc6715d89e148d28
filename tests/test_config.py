import pytest
import torch
from transformers import AutoConfig

from diffuapriel_hf import DiffuAprielConfig, DiffuAprielForMaskedLM, PRESETS, preset_config
from diffuapriel_hf.modeling.configuration_diffuapriel import ATTENTION, MAMBA


def test_defaults_and_legacy_layer_names():
    config = DiffuAprielConfig(num_hidden_layers=3, layer_types=["mamba", "attention", "linear_attention"])
    assert config.layer_types == [MAMBA, ATTENTION, MAMBA]
    assert DiffuAprielConfig(num_hidden_layers=2).layer_types == [MAMBA, MAMBA]


def test_round_trip_through_auto_config(tmp_path):
    config = preset_config("tiny", layer_types=["mamba", "attention"])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DiffuAprielConfig)
    assert loaded.layer_types == [MAMBA, ATTENTION]
    assert loaded.mamba_dt_limit == config.mamba_dt_limit
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(loaded.to_dict()) == drop(config.to_dict())


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_hidden_layers=3, layer_types=["mamba", "mamba"]), "layer_types has 2 entries"),
        (dict(layer_types=["mamba", "conv"]), "unknown entries"),
        (dict(layer_types=["attention", "attention"], num_attention_heads=5, head_dim=None), "divisible by num_attention_heads"),
        (dict(layer_types=["attention", "attention"], num_key_value_heads=3), "num_key_value_heads"),
        (dict(mamba_d_head=7), "mamba_d_head"),
        (dict(mamba_n_groups=3), "mamba_n_groups"),
        (dict(mask_token_id=96), "mask_token_id"),
        (dict(eos_token_id=-1), "eos_token_id"),
        (dict(intermediate_size=-1), "intermediate_size"),
        (dict(bidirectional_strategy="concat"), "bidirectional_strategy"),
        (dict(sampling_eps=0.0), "sampling_eps"),
        (dict(mamba_dt_limit=(1.0, 0.5)), "mamba_dt_limit"),
        (dict(hidden_size=0), "hidden_size"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset_config("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        DiffuAprielConfig.from_preset("diffuapriel-7b")


def count_parameters(name):
    with torch.device("meta"):
        model = DiffuAprielForMaskedLM(preset_config(name))
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def test_preset_parameter_counts_match_the_docs():
    # The counts stated in presets.py's docstring and the README.
    expected = {
        "diffuapriel-240m": 247_639_296,
        "diffuapriel-1.3b": 1_388_559_872,
        "diffuapriel-h-1.3b": 1_377_453_824,
        "diffutran-1.3b": 1_336_154_112,
        "diffuapriel-8m": 8_617_280,
        "diffutran-8m": 8_523_008,
    }
    counts = {name: count_parameters(name) for name in expected}
    assert counts == expected
    big = [counts[n] for n in ("diffuapriel-1.3b", "diffuapriel-h-1.3b", "diffutran-1.3b")]
    assert max(big) / min(big) < 1.05  # parameter-matched within 5%
    assert counts["diffuapriel-8m"] / counts["diffutran-8m"] < 1.02
    assert set(PRESETS) >= {"tiny", "diffuapriel-240m", "diffuapriel-1.3b", "diffuapriel-h-1.3b", "diffutran-1.3b"}
