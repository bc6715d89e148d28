"""The model contract, for each of the three stacks (all Mamba, hybrid, all attention): what a transformers model
promises its users. Saving and loading, tied and untied heads, `resize_token_embeddings`, gradient checkpointing,
the attention implementations, `device_map`, the dtypes, and padding."""

import pytest
import torch
from safetensors.torch import load_file

from diffuapriel_hf import DiffuAprielForMaskedLM

pytestmark = pytest.mark.usefixtures("one_thread")

# Three layers, so that the hybrid's attention layer sits between two Mamba layers.
NUM_LAYERS = 3


def random_ids(config, *shape, seed=0):
    """Token ids of ordinary words: above the tiny preset's pad / bos / eos ids, below its mask token."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(config.eos_token_id + 1, config.mask_token_id, shape, generator=generator)


@torch.no_grad()
def logits_of(model, ids, **kwargs):
    return model(ids, **kwargs).logits


def is_tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_gives_identical_logits(stack, tie, tiny_model, tmp_path):
    model = tiny_model(stack, num_layers=NUM_LAYERS, seed=1, tie_word_embeddings=tie)
    ids = random_ids(model.config, 2, 17)
    model.save_pretrained(tmp_path)
    loaded = DiffuAprielForMaskedLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=0)
    assert is_tied(model) == is_tied(loaded) == loaded.config.tie_word_embeddings == tie
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) != tie  # a tied head is stored once
    if not tie:
        assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


@pytest.mark.parametrize("tie", [True, False])
def test_resize_token_embeddings_keeps_every_row_and_the_mask_token(stack, tie, tiny_model):
    model = tiny_model(stack, tie_word_embeddings=tie)
    vocab, mask = model.config.vocab_size, model.config.mask_token_id
    embeddings = model.get_input_embeddings().weight.detach().clone()  # (V, D)
    head = model.get_output_embeddings().weight.detach().clone()  # (V, D)
    ids = random_ids(model.config, 2, 9)
    ids[:, 4] = mask
    before = logits_of(model, ids)

    model.resize_token_embeddings(vocab + 8)
    assert model.config.vocab_size == vocab + 8 and model.config.mask_token_id == mask
    torch.testing.assert_close(model.get_input_embeddings().weight[:vocab], embeddings, rtol=0, atol=0)
    torch.testing.assert_close(model.get_output_embeddings().weight[:vocab], head, rtol=0, atol=0)
    assert is_tied(model) == tie
    after = logits_of(model, ids)  # (B, L, V + 8)
    assert after.shape[-1] == vocab + 8
    torch.testing.assert_close(after[..., :vocab], before)


def test_resize_token_embeddings_refuses_to_drop_the_mask_row(tiny_model):
    model = tiny_model("hybrid", mask_token_id=90)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    for size, multiple in ((90, None), (40, 64)):
        with pytest.raises(ValueError, match="mask_token_id is 90"):
            model.resize_token_embeddings(size, pad_to_multiple_of=multiple)
    assert model.config.vocab_size == 96
    torch.testing.assert_close(model.get_input_embeddings().weight, embeddings, rtol=0, atol=0)
    model.resize_token_embeddings(91)  # the mask token's row is the last one kept
    assert model.config.vocab_size == model.get_input_embeddings().num_embeddings == 91
    torch.testing.assert_close(model.get_input_embeddings().weight, embeddings[:91], rtol=0, atol=0)
    model.resize_token_embeddings(70, pad_to_multiple_of=32)  # rounded up to 96
    assert model.config.vocab_size == 96


def enable_gradient_checkpointing(model):
    # transformers 5.24 renamed gradient_checkpointing_enable; 5.17 only has the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(stack, tiny_model):
    losses, gradients = [], []
    for checkpointing in (False, True):
        model = tiny_model(stack, num_layers=NUM_LAYERS, seed=5).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        ids = random_ids(model.config, 2, 11)
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert all(grad is not None for grad in gradients[1].values())
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_attention_implementations_agree_with_eager_under_padding(stack, implementation, tiny_model):
    outputs = []
    for name in ("eager", implementation):
        model = tiny_model(stack, num_layers=NUM_LAYERS, seed=4, attn_implementation=name)
        assert model.config._attn_implementation == name
        ids = random_ids(model.config, 2, 10)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        outputs.append(logits_of(model, ids, attention_mask=mask))  # flex_attention has no backward on the CPU
    eager, other = outputs
    torch.testing.assert_close(other[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other[1, 4:], eager[1, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_loading_gives_the_same_logits(stack, device_map, tiny_model, tmp_path):
    model = tiny_model(stack, num_layers=NUM_LAYERS, seed=7)
    ids = random_ids(model.config, 2, 9)
    model.save_pretrained(tmp_path)
    mapped = DiffuAprielForMaskedLM.from_pretrained(tmp_path, device_map=device_map)
    assert {tensor.device.type for tensor in [*mapped.parameters(), *mapped.buffers()]} == {"cpu"}
    torch.testing.assert_close(logits_of(mapped, ids), logits_of(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_round_trip(stack, dtype, tiny_model, tmp_path):
    model = tiny_model(stack, num_layers=NUM_LAYERS, seed=8)
    ids = random_ids(model.config, 2, 12)
    reference = logits_of(model, ids)
    model.to(dtype).save_pretrained(tmp_path / "saved")
    loaded = DiffuAprielForMaskedLM.from_pretrained(tmp_path / "saved", dtype="auto").eval()
    assert {p.dtype for p in loaded.parameters()} == {dtype} and loaded.config.dtype == dtype
    saved_weights = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, saved_weights[name], rtol=0, atol=0, msg=name)
    logits = logits_of(loaded, ids)
    assert logits.dtype == dtype
    torch.testing.assert_close(logits, logits_of(model, ids), rtol=0, atol=0)
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_checkpoint_loads_in_a_lower_precision(stack, dtype, tiny_model, tmp_path):
    model = tiny_model(stack, num_layers=NUM_LAYERS, seed=9)
    ids = random_ids(model.config, 2, 12)
    model.save_pretrained(tmp_path)
    loaded = DiffuAprielForMaskedLM.from_pretrained(tmp_path, dtype=dtype).eval()
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    reference, logits = logits_of(model, ids), logits_of(loaded, ids)
    assert logits.dtype == dtype
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_gives_each_sequence_its_logits_alone(stack, side, tiny_model):
    model = tiny_model(stack, num_layers=NUM_LAYERS, seed=2, mamba_chunk_size=4)
    lengths = [19, 11, 6]
    width = max(lengths)
    ids = torch.full((len(lengths), width), model.config.pad_token_id)
    mask = torch.zeros_like(ids)
    alone = []
    for row, length in enumerate(lengths):
        sequence = random_ids(model.config, 1, length, seed=row)
        span = slice(width - length, width) if side == "left" else slice(0, length)
        ids[row, span], mask[row, span] = sequence[0], 1
        alone.append((span, logits_of(model, sequence)[0]))
    batched = logits_of(model, ids, attention_mask=mask)
    for row, (span, logits) in enumerate(alone):
        assert (batched[row, span] - logits).abs().max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_map_auto_on_a_gpu(stack, dtype, tiny_model, tmp_path):
    """Loaded onto the GPU with device_map="auto": the CPU's logits; and, over 1,024 positions, the same logits as
    the model cast in memory (whose rotary frequencies a buffer would have rounded to bf16)."""
    model = tiny_model(stack, num_layers=NUM_LAYERS, seed=10)
    ids = random_ids(model.config, 2, 1024)
    reference = logits_of(model, ids)
    model.save_pretrained(tmp_path)
    mapped = DiffuAprielForMaskedLM.from_pretrained(tmp_path, device_map="auto", dtype=dtype).eval()
    assert {tensor.device.type for tensor in mapped.parameters()} == {"cuda"}
    logits = logits_of(mapped, ids.cuda())
    assert logits.dtype == dtype
    tolerance = 1e-3 if dtype == torch.float32 else 0.1  # relative to the largest logit
    assert (logits.float().cpu() - reference).abs().max() < tolerance * reference.abs().max()
    cast = model.to("cuda", dtype)
    torch.testing.assert_close(logits_of(cast, ids.cuda()), logits)
