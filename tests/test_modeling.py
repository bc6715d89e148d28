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


def test_save_load_round_trip_gives_identical_logits(stack, tmp_path, tiny_model):
    model = tiny_model(stack, seed=1)
    ids = random_ids(model.config, 2, 17)
    model.save_pretrained(tmp_path)
    loaded = DiffuAprielForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_leaks(stack, side, tiny_model):
    model = tiny_model(stack, seed=2, mamba_chunk_size=4)
    lengths = [19, 11, 6]
    width = max(lengths)
    ids = torch.full((len(lengths), width), model.config.pad_token_id)
    mask = torch.zeros_like(ids)
    alone = []
    for row, length in enumerate(lengths):
        seq = random_ids(model.config, 1, length, seed=row)
        span = slice(width - length, width) if side == "left" else slice(0, length)
        ids[row, span], mask[row, span] = seq[0], 1
        with torch.no_grad():
            alone.append((span, model(seq).logits[0]))
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
    for row, (span, logits) in enumerate(alone):
        assert (batched[row, span] - logits).abs().max() <= 1e-5


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


@pytest.mark.parametrize("implementation", ["sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_attention_implementations_agree_with_eager_under_padding(implementation, tiny_model):
    ids = random_ids(tiny_model("attention").config, 2, 10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    outputs = []
    for name in ("eager", implementation):
        with torch.no_grad():  # flex_attention has no backward on the CPU
            model = tiny_model("attention", seed=4, attn_implementation=name)
            outputs.append(model(ids, attention_mask=mask).logits)
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0][1, 4:], outputs[1][1, 4:], rtol=1e-5, atol=1e-5)


def test_device_map_auto_and_fp16_loading(tmp_path, tiny_model):
    model = tiny_model("hybrid", seed=7)
    ids = random_ids(model.config, 2, 9)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reference = model(ids).logits
        mapped = DiffuAprielForMaskedLM.from_pretrained(tmp_path, device_map="auto")
        torch.testing.assert_close(mapped(ids).logits, reference)
        half = DiffuAprielForMaskedLM.from_pretrained(tmp_path, dtype=torch.float16)
        assert half(ids).logits.dtype == torch.float16


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


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("hybrid", seed=5).train()
        if checkpointing:
            # transformers 5.24 renamed gradient_checkpointing_enable; 5.17 only has the old name.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        ids = random_ids(model.config, 2, 11)
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_forward_is_close_to_fp32(tiny_model):
    model = tiny_model("hybrid", seed=6)
    ids = random_ids(model.config, 2, 12)
    with torch.no_grad():
        reference = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()


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
