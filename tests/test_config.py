import ast
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from diffuapriel_hf import DiffuAprielConfig, DiffuAprielForMaskedLM, PRESETS, preset_config
from diffuapriel_hf.modeling import presets
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
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(vocab_size=0, mask_token_id=None), "vocab_size must be a positive integer"),
        (dict(vocab_size="96"), "vocab_size"),
        (dict(hidden_size=32.0), "hidden_size"),
        (dict(num_hidden_layers=0, layer_types=[]), "num_hidden_layers must be a positive integer"),
        (dict(layer_types="mamba"), "layer_types"),
        (dict(layer_types=["attention", "attention"], num_key_value_heads=0), "num_key_value_heads"),
        (dict(layer_types=["attention", "attention"], head_dim=7), "head_dim must be even"),
        (dict(bidirectional="yes"), "bidirectional"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(attention_dropout=float("nan")), "attention_dropout"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
        (dict(mamba_dt_min=0.5, mamba_dt_max=0.1), "mamba_dt_min <= mamba_dt_max"),
        (dict(eos_token_id=[2, 96]), "eos_token_id"),
        (dict(pad_token_id=-1), "pad_token_id"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset_config("tiny", **overrides)


def test_later_assignments_and_validate_raise_value_errors(tmp_path):
    config = preset_config("tiny")
    with pytest.raises(ValueError, match="vocab_size must be a positive integer, got 0"):
        config.vocab_size = 0
    config.mask_token_id = 500  # a check across fields runs in validate(), and before saving
    with pytest.raises(ValueError, match="mask_token_id must be a token id in \\[0, vocab_size=96\\)"):
        config.validate()
    with pytest.raises(ValueError, match="mask_token_id"):
        config.save_pretrained(tmp_path)


def test_integer_valued_floats_and_tuples_are_accepted():
    config = preset_config("tiny", rope_theta=500000, attention_dropout=0, mamba_dt_limit=[0, 1],
                           layer_types=("mamba", "attention"))
    assert config.mamba_dt_limit == (0.0, 1.0) and config.layer_types == [MAMBA, ATTENTION]


def test_legacy_layer_names_in_a_saved_config_are_read_as_the_new_ones(tmp_path):
    config = preset_config("tiny", layer_types=[MAMBA, ATTENTION])
    config.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "layer_types": ["mamba", "attention"]}))
    assert AutoConfig.from_pretrained(tmp_path).layer_types == [MAMBA, ATTENTION]


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        DiffuAprielConfig.from_preset("diffuapriel-7b")


def count_parameters(name):
    with torch.device("meta"):
        model = DiffuAprielForMaskedLM(preset_config(name))
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def test_presets_are_plain_data():
    # The configuration imports the presets; the presets import nothing, so there is no cycle to break.
    tree = ast.parse(Path(presets.__file__).read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    for fields in PRESETS.values():
        assert json.loads(json.dumps(fields)) == fields  # keyword arguments of plain values only


def stated_parameter_counts():
    """The table of parameter counts in presets.py's docstring: {preset: count}."""
    rows = re.findall(r"^\| `([\w.-]+)` +\|[^|]*\| +([\d,]+) +\|$", presets.__doc__, flags=re.MULTILINE)
    return {name: int(count.replace(",", "")) for name, count in rows}


def test_preset_parameter_counts_match_the_docs():
    expected = stated_parameter_counts()
    assert set(expected) == set(PRESETS) - {"tiny"}
    counts = {name: count_parameters(name) for name in expected}
    assert counts == expected
    big = [counts[n] for n in ("diffuapriel-1.3b", "diffuapriel-h-1.3b", "diffutran-1.3b")]
    assert max(big) / min(big) < 1.05  # parameter-matched within 5%
    assert counts["diffuapriel-8m"] / counts["diffutran-8m"] < 1.02
    assert set(PRESETS) >= {"tiny", "diffuapriel-240m", "diffuapriel-1.3b", "diffuapriel-h-1.3b", "diffutran-1.3b"}
