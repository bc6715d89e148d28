import functools

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput

from diffuapriel_hf import DiffuAprielForMaskedLM, DiffuAprielModel


@pytest.fixture
def tiny_model(tiny_model):
    """The shared tiny model with three layers, so that the hybrid's attention layer sits between two Mamba layers."""
    return functools.partial(tiny_model, num_layers=3)


def random_ids(config, *shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.mask_token_id, shape, generator=generator)


def test_forward_shapes_and_auto_classes(stack, tmp_path, tiny_model):
    model = tiny_model(stack)
    ids = random_ids(model.config, 2, 13)
    out = model(ids)
    assert isinstance(out, MaskedLMOutput)
    assert out.logits.shape == (2, 13, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoModelForMaskedLM.from_pretrained(tmp_path), DiffuAprielForMaskedLM)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DiffuAprielModel)


@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
def test_position_zero_sees_the_last_token_only_when_bidirectional(kind, tiny_model):
    ids = random_ids(tiny_model(kind).config, 1, 12)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 90 + 3
    for bidirectional in (True, False):
        model = tiny_model(kind, seed=3, bidirectional=bidirectional)
        with torch.no_grad():
            for parameter in model.parameters():  # larger than the initialisation, so that influence is visible
                parameter.normal_(0, 0.3)
            delta = (model(ids).logits[0, 0] - model(changed).logits[0, 0]).abs().max()
        if bidirectional or kind == "hybrid":  # attention layers always look both ways
            assert delta > 1e-4
        else:
            assert delta == 0


def test_causal_stack_has_no_backward_parameters(tiny_model):
    model = tiny_model("mamba", bidirectional=False)
    names = [name for name, _ in model.named_parameters()]
    assert not any("right_to_left" in name for name in names)
    assert any("left_to_right" in name for name in names)


def test_inputs_embeds_equal_input_ids(tiny_model):
    model = tiny_model("hybrid")
    ids = random_ids(model.config, 2, 9)
    with torch.no_grad():
        from_ids = model(ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(from_embeds, from_ids)


def test_hidden_states_and_attentions_follow_hybrid_conventions(tiny_model):
    model = tiny_model("hybrid", attn_implementation="eager")
    ids = random_ids(model.config, 2, 9)
    out = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1  # embeddings + one per layer
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    assert len(out.attentions) == 1  # one map per attention layer
    assert out.attentions[0].shape == (2, model.config.num_attention_heads, 9, 9)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 9))
    with pytest.raises(ValueError, match="eager"):
        tiny_model("hybrid", attn_implementation="sdpa")(ids, output_attentions=True)


def test_logits_are_untouched_and_loss_excludes_the_mask_token(tiny_model):
    model = tiny_model("mamba")
    ids = random_ids(model.config, 2, 8)
    out = model(ids)
    expected = model.lm_head(model.model(ids).last_hidden_state)
    torch.testing.assert_close(out.logits, expected)
    assert torch.isfinite(out.logits[..., model.config.mask_token_id]).all()
    labels = ids.clone()
    loss = model(ids, labels=labels).loss
    logits = out.logits.clone()
    logits[..., model.config.mask_token_id] = float("-inf")
    manual = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    torch.testing.assert_close(loss, manual)


def test_no_sequence_length_is_refused(tiny_model):
    model = tiny_model("hybrid")
    ids = random_ids(model.config, 1, model.config.max_position_embeddings + 5)
    with torch.no_grad():
        assert model(ids).logits.shape[1] == ids.shape[1]


def test_logits_to_keep_computes_the_named_positions_only(tiny_model):
    model = tiny_model("hybrid", seed=3)
    ids = random_ids(model.config, 2, 9)
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(model(ids, logits_to_keep=3).logits, full[:, -3:])
        positions = torch.tensor([4, 0, 7])
        torch.testing.assert_close(model(ids, logits_to_keep=positions).logits, full[:, positions])
        assert model(ids, logits_to_keep=0).logits.shape == full.shape
    with pytest.raises(ValueError, match="every position"):
        model(ids, labels=ids, logits_to_keep=2)
    with pytest.raises(ValueError, match="logits_to_keep must be in"):
        model(ids, logits_to_keep=10)
    with pytest.raises(ValueError, match="outside the sequence"):
        model(ids, logits_to_keep=torch.tensor([9]))
    with pytest.raises(ValueError, match="1-D integer"):
        model(ids, logits_to_keep=torch.tensor([1.0]))
    with pytest.raises(TypeError, match="logits_to_keep"):
        model(ids, logits_to_keep=1.5)


def test_bad_inputs_are_clear_errors(tiny_model):
    model = tiny_model("hybrid")
    ids = random_ids(model.config, 2, 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(ids + model.config.vocab_size)
    negative = ids.clone()
    negative[1, 2] = -1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(negative)
    with pytest.raises(ValueError, match="2-D"):
        model(ids[0])
    with pytest.raises(TypeError, match="integer"):
        model(ids.float())
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="hidden_size"):
        model(inputs_embeds=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="mask_token_id"):
        tiny_model("mamba", mask_token_id=None)(ids, labels=ids)
    with pytest.raises(ValueError, match="no tokens"):
        model(ids[:, :0])
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        model(ids, attention_mask=torch.full((2, 5), 0.5))
    for bad_label in (model.config.vocab_size, -1, model.config.mask_token_id):
        labels = torch.full_like(ids, -100)
        labels[0, 1] = bad_label
        with pytest.raises(ValueError, match="labels must be -100"):
            model(ids, labels=labels)
    with pytest.raises(TypeError, match="labels must be an integer"):
        model(ids, labels=ids.float())
